"""Editing track: edit methods, requests, metrics and the runner."""
