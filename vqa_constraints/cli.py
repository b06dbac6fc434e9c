"""The `vqa-constraints` console entry point, and the one place where errors become exit codes.

Subcommands are discovered from the ``vqa_constraints.commands`` entry-point
group (see pyproject.toml): each entry point is a function ``add(subparsers)``
that adds its parser and sets ``func``. The dispatcher therefore knows nothing
about the harness or editing packages, which sit downstream of the dataset.

Every exception that reaches ``dispatch`` ends as exactly one ``error:`` line
on stderr: a ``UserError`` (bad input, including argparse usage errors) exits
``EXIT_USER``; anything else is a bug in this package and exits ``EXIT_BUG``
with where to report it. ``--debug`` adds the traceback.
"""

from __future__ import annotations

import _thread
import argparse
import logging
import math
import re
import signal
import sys
import threading
import traceback
import weakref
from importlib.metadata import entry_points
from pathlib import Path

from vqa_constraints import __version__
from vqa_constraints.errors import REPORT_BUGS, UserError, one_line

COMMAND_GROUP = "vqa_constraints.commands"
EXIT_USER = 1  # bad input: a file, row, field or option
EXIT_BUG = 70  # an internal error (sysexits' EX_SOFTWARE): please report it
EXIT_INTERRUPTED = 130


class UsageError(UserError):
    """A command line argparse rejects (unknown flag, missing or malformed value)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a ``UsageError`` (one line, exit 1) instead of usage text and exit 2.

    Subparsers inherit the class, so this holds for every subcommand.
    """

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {_flag_first(message)} (see {self.prog} --help)")


def _flag_first(message: str) -> str:
    """argparse's "argument --x: ..." in the project's style: "--x 'value': problem" / "--x must be ..."."""
    match = re.fullmatch(r"argument (\S+): (.*)", message, flags=re.S)
    if not match:
        return message
    flag, detail = match.group(1).split("/")[-1], match.group(2)
    choice = re.fullmatch(r"invalid choice: (.*) \(choose from (.*)\)", detail, flags=re.S)
    if choice:
        noun = flag.lstrip("-").replace("-", " ").lower()
        return f"{flag} {choice.group(1)}: unknown {noun}; choose from {choice.group(2).replace(chr(39), '')}"
    value = re.fullmatch(r"invalid (\w+) value: (.*)", detail, flags=re.S)
    if value:
        kind = {"int": "whole number", "float": "number"}.get(value.group(1), value.group(1))
        return f"{flag} {value.group(2)}: not a {kind}"
    # "must be at least 1, got 0" and "'3/3': I must be in 0..2" read on from the flag; anything else after a colon.
    return f"{flag} {detail}" if detail.startswith(("must ", "'", '"')) else f"{flag}: {detail}"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vqa-constraints",
        description="Build, score, trace and edit with the VQA-Constraints benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="print the traceback of any error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            add_command = entry.load()
        except (ImportError, AttributeError) as error:
            if _SIGINT_RECEIVED.is_set():
                # Ctrl-C mid-import can surface as an ImportError of a half-initialised module (transformers'
                # lazy modules): it is the interrupt, not a broken plugin.
                raise KeyboardInterrupt from error
            # A broken or half-installed plugin must not take the other commands down.
            print(f"warning: command {entry.name!r} unavailable: {error}", file=sys.stderr)
            continue
        add_command(subparsers)
    parser.set_defaults(command_names=sorted(subparsers.choices))
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; return the exit code (never raises, never exits)."""
    installed = _install_sigint_handler()
    stderr, unraisable_hook = sys.stderr, sys.unraisablehook
    sys.stderr = _LineTracking(stderr)
    sys.unraisablehook = _unraisable(unraisable_hook)
    try:
        return _run(argv)
    except KeyboardInterrupt:  # while the commands are imported, before any command runs (dispatch has its own)
        return _interrupted(KeyboardInterrupt("before the command started; nothing was read or written"))
    finally:
        sys.stderr, sys.unraisablehook = stderr, unraisable_hook
        if installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _unraisable(previous):
    """A Ctrl-C that lands in code whose exceptions Python can only print and drop (a generator finalised by the
    garbage collector, such as a progress bar's loop; a ``__del__``; a weak reference's callback) is delivered
    again a moment later, outside it, instead of printing a traceback and being lost."""

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            threading.Timer(0.05, _thread.interrupt_main).start()
            return
        previous(unraisable)

    return hook


class _LineTracking:
    """stderr, remembering whether its last write left a line open (a progress bar mid-draw), so the one
    ``interrupted:`` / ``error:`` line can start a line of its own. Everything else goes to the real stream."""

    def __init__(self, stream):
        self._stream = stream
        self.line_open = False

    def write(self, text: str) -> int:
        if text:
            self.line_open = not text.endswith("\n")
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


_SIGINT_RECEIVED = threading.Event()


def _on_sigint(signum, frame) -> None:
    """Python's Ctrl-C, except inside a finalizer (``__del__``, e.g. of a ``datasets`` table while the model
    loads, or a weak reference's callback): an exception there is printed with a traceback and then dropped, so
    the interrupt is delivered again a moment later, outside it."""
    _SIGINT_RECEIVED.set()
    while frame is not None:
        if frame.f_code.co_name == "__del__" or frame.f_code.co_filename == weakref.__file__:
            threading.Timer(0.05, _thread.interrupt_main).start()
            return
        frame = frame.f_back
    raise KeyboardInterrupt


def _install_sigint_handler() -> bool:
    """Install ``_on_sigint`` where Python's default Ctrl-C handler is active (the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return False
    signal.signal(signal.SIGINT, _on_sigint)
    return True


def _end_progress_bars() -> None:
    """Close the progress bars an exception left open (their loop never finished), so the one line that follows
    starts a line of its own instead of trailing a half-drawn bar ("Loading weights:   0%|  |interrupted: ...")."""
    tqdm_class = getattr(sys.modules.get("tqdm.std"), "tqdm", None)  # only if something drew a bar
    for bar in list(getattr(tqdm_class, "_instances", ())):
        try:
            bar.close()
        except Exception:  # a bar broken by the interrupt must not hide the message
            pass
    # A bar's own close can be what the interrupt cut short (its final newline never written): end the line here.
    if getattr(sys.stderr, "line_open", False):
        sys.stderr.write("\n")
    sys.stderr.flush()


def _interrupted(interrupt: KeyboardInterrupt) -> int:
    # A command that wrote partial results says where in the interrupt's message (harness/outputs.py).
    detail = str(interrupt) or "evaluate keeps what it scored and resumes when rerun; other commands start over"
    sys.stdout.flush()
    _end_progress_bars()
    print(f"interrupted: {one_line(detail)}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _run(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv[: argv.index("--")] if "--" in argv else "--debug" in argv
    _SIGINT_RECEIVED.clear()  # this run's Ctrl-C only, not one an earlier in-process run already reported
    parser = build_parser()
    if _SIGINT_RECEIVED.is_set():
        # A Ctrl-C while the commands were imported that a library swallowed (it can leave a half-initialised
        # module behind, which fails later as a bug) is still the interrupt: stop before any command runs.
        raise KeyboardInterrupt
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help and --version
        return int(done.code or 0)
    except Exception as error:  # a UsageError, or a bug in an argument type
        return report(error, debug)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        commands = ", ".join(args.command_names)
        return report(UsageError(f"vqa-constraints: choose a command: {commands} (see vqa-constraints --help)"), debug)
    return dispatch(args.func, args, debug=args.debug)


def dispatch(func, args: argparse.Namespace, debug: bool = False) -> int:
    """Run ``func(args)``; turn whatever it raises into one line on stderr and an exit code."""
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt as interrupt:
        return _interrupted(interrupt)
    except Exception as error:
        return report(error, debug)


def report(error: BaseException, debug: bool) -> int:
    """Print ``error`` as one ``error:`` line (after its traceback with ``--debug``); return the exit code."""
    sys.stdout.flush()
    _end_progress_bars()
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    if isinstance(error, UserError):
        print(f"error: {one_line(str(error))}", file=sys.stderr)
        return EXIT_USER
    attach = "the traceback above" if debug else "the output of the same command run with --debug (the traceback)"
    print(f"error: internal error ({type(error).__name__}: {one_line(str(error))}): a bug in vqa-constraints "
          f"{__version__}; please report it {REPORT_BUGS} with the command line and {attach}", file=sys.stderr)
    return EXIT_BUG


def main() -> None:
    code = EXIT_INTERRUPTED
    try:
        _install_sigint_handler()  # kept until exit: run() leaves a handler it did not install alone
        code = run()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the command is over: a late Ctrl-C changes nothing
        sys.stdout.flush()
    except KeyboardInterrupt:  # between run() returning and the line above
        pass
    sys.exit(code)


# --- argument types: a bad value is a usage error at parse time, before any model or data is loaded ----------


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    """``type=`` for counts that must be at least 1 (limits, sizes, batch sizes)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """``type=`` for counts where 0 means "none" (e.g. edit --preserve)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def finite_float(text: str) -> float:
    """``type=`` for numbers that end up in JSON: NaN and infinities are refused (JSON has no such values)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def choice_list(choices):
    """``type=`` for a comma-separated list of names from ``choices`` (at least one); returns a tuple."""
    allowed = tuple(choices)

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = [name for name in names if name not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown))} in {text!r}; "
                                             f"choose from {', '.join(allowed)}")
        if not names:
            raise argparse.ArgumentTypeError(f"{text!r} names nothing; choose from {', '.join(allowed)}")
        return names

    return parse


def output_path(text: str) -> Path:
    """``type=`` for an output folder or file: refuse a path that can never be written (a folder inside a file)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    path = Path(text)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{path}: {parent} is a file, not a folder")
            break
    return path


def output_folder(text: str) -> Path:
    """``type=`` for an output folder: ``output_path``, and not an existing file."""
    path = output_path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    return path


def output_file(text: str) -> Path:
    """``type=`` for an output file: ``output_path``, and not an existing folder."""
    path = output_path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder, not a file")
    return path
