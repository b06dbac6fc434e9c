"""Harness: model access, prompting, scoring, runs, tracing and the leaderboard."""
