"""The harness's command line: one module per command, each registered in pyproject.toml's
``vqa_constraints.commands`` group, plus what they share (``args``, ``distributed``).

This is the top floor (docs/development.md): it turns flags into the library's options and prints results;
library code never imports from here.
"""
