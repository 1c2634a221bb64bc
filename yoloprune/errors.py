"""The one exception type yoloprune raises for problems a user can fix, and how scripts report it."""

from __future__ import annotations

import os
import signal
import sys
from types import TracebackType


class YoloPruneError(Exception):
    """A problem with the user's input, stated with its fix; the CLI prints it as one line."""


def check_imgsz(imgsz: object, stride: int = 32) -> None:
    """Raise ``YoloPruneError`` unless ``imgsz`` is a positive multiple of ``stride``, naming the nearest valid size."""
    if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz <= 0 or imgsz % stride:
        nearest = max(stride, round(imgsz / stride) * stride) if isinstance(imgsz, (int, float)) else 640
        raise YoloPruneError(f"imgsz must be a positive multiple of the model stride {stride}, got {imgsz!r}; "
                             f"use {nearest}")


def exit_on_error() -> None:
    """Make this script end as the CLI does: a ``YoloPruneError`` prints one line and exits with code 2.

    For the DVC stage scripts, whose code runs at module level: call it once before the
    work. ``YOLOPRUNE_DEBUG=1`` shows the traceback instead of the line. Ctrl-C prints one
    line and exits 130; SIGTERM (``kill``, a stopped ``dvc repro``) raises ``SystemExit(143)``
    so that ``finally`` clauses and context managers delete their temporary files first.
    Any other exception keeps Python's traceback.
    """
    previous = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, YoloPruneError):
            if os.environ.get("YOLOPRUNE_DEBUG") == "1":
                previous(kind, error, tb)
            else:
                print(f"yoloprune: error: {error}", file=sys.stderr)
            raise SystemExit(2)  # Python exits with this code when the excepthook raises SystemExit
        if issubclass(kind, KeyboardInterrupt):
            print("yoloprune: interrupted; outputs already written are intact", file=sys.stderr)
            raise SystemExit(130)
        previous(kind, error, tb)

    sys.excepthook = hook
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
