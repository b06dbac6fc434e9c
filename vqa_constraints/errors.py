"""The one exception type for bad input; the CLI (vqa_constraints/cli.py) turns it into one line and exit code 1.

Anything else that reaches the CLI is a bug: one line saying so and where to
report it (``REPORT_BUGS``), exit code 70, the traceback only with ``--debug``.
"""

# Where the one-line message of an internal error sends the user.
REPORT_BUGS = "on the project's issue tracker"


class UserError(Exception):
    """Bad input from the user: a file, row or option that is wrong.

    The message must name where the problem is (file, row, field) and what is
    wrong, in one line; the CLI prints it without a traceback.
    """


def where(path=None, row=None, field=None) -> str:
    """Format a location prefix like ``data.csv row 3 field 'answers'``."""
    parts = []
    if path is not None:
        parts.append(str(path))
    if row is not None:
        parts.append(f"row {row}")
    if field is not None:
        parts.append(f"field {field!r}")
    return " ".join(parts)


def one_line(text: str, limit: int = 500) -> str:
    """``text`` with every run of whitespace (newlines included) made one space, cut to ``limit`` characters.

    For messages that embed a library's error text, which may span lines.
    """
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
