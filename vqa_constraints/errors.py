"""The one exception type that the CLI turns into a one-line message and exit code 1."""


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
