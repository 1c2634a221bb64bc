"""The one exception type yoloprune raises for problems a user can fix, and how entry points report it.

Library calls raise; only the entry points (the CLI's ``main``, each DVC stage script,
the tools) set up the process and turn errors into exit codes, all through
``run_main`` / ``exit_on_error`` here: a ``YoloPruneError`` prints one line and exits
2, Ctrl-C prints one line and exits 130, SIGTERM raises ``SystemExit(143)`` so that
``finally`` clauses and context managers (``io.atomic_path``) delete their temporary
files on the way out. Anything else is a bug and keeps Python's traceback.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType

from yoloprune.offline import configure_offline

INTERRUPTED = "interrupted; outputs already written are intact"
EXIT_ERROR, EXIT_INTERRUPTED = 2, 130  # 2: usage error (as argparse); 130 = 128 + SIGINT, as a shell reports Ctrl-C


class YoloPruneError(Exception):
    """A problem with the user's input, stated with its fix; the CLI prints it as one line."""


def check_imgsz(imgsz: object, stride: int = 32) -> None:
    """Raise ``YoloPruneError`` unless ``imgsz`` is a positive multiple of ``stride``, naming the nearest valid size."""
    if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz <= 0 or imgsz % stride:
        nearest = max(stride, round(imgsz / stride) * stride) if isinstance(imgsz, (int, float)) else 640
        raise YoloPruneError(f"imgsz must be a positive multiple of the model stride {stride}, got {imgsz!r}; "
                             f"use {nearest}")


def exit_code(error: BaseException, prog: str = "yoloprune", interrupted: str = INTERRUPTED) -> int | None:
    """Return the exit code of an error an entry point reports as one line (printed to stderr), or None for a bug."""
    if isinstance(error, YoloPruneError):
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    if isinstance(error, KeyboardInterrupt):
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return None


def run_main(func: Callable[[], int], prog: str = "yoloprune", debug: bool = False,
             interrupted: str = INTERRUPTED) -> int:
    """Return ``func()``'s exit code, run as an entry point: offline, SIGTERM cleans up, errors are one line.

    ``debug`` re-raises a ``YoloPruneError`` with its traceback. The SIGTERM handler is
    the caller's again on return, so ``main()`` can be called in-process (tests).
    """
    configure_offline()
    with sigterm_raises():
        try:
            return func()
        except (YoloPruneError, KeyboardInterrupt) as e:
            if debug and isinstance(e, YoloPruneError):
                raise
            return exit_code(e, prog, interrupted)  # type: ignore[return-value]  # never None for these two


def exit_on_error() -> None:
    """Make this script an entry point as ``run_main`` makes a function one: for the DVC stages' module-level code.

    Call it once, before the work. ``YOLOPRUNE_DEBUG=1`` shows the traceback instead of
    the line.
    """
    configure_offline()
    previous = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        debug = os.environ.get("YOLOPRUNE_DEBUG") == "1" and issubclass(kind, YoloPruneError)
        code = None if debug else exit_code(error)
        if code is None:
            previous(kind, error, tb)
            code = EXIT_ERROR if debug else 1
        raise SystemExit(code)  # Python exits with this code when the excepthook raises SystemExit

    sys.excepthook = hook
    if _may_set_sigterm():
        signal.signal(signal.SIGTERM, _terminated)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` (as Ctrl-C raises), so cleanup runs; restored after."""
    if not _may_set_sigterm():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _may_set_sigterm() -> bool:
    # Python can only set handlers in the main thread; a handler someone else set is theirs to keep.
    return threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def _terminated(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # the shell's exit status for a signal; finally clauses run on the way out
