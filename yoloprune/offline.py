"""Keep Ultralytics offline and quiet: the switches it reads once, when it is first imported.

Ultralytics checks for updates, syncs settings, downloads fonts and auto-installs
missing requirements, each of which stalls or fails on a machine without internet.
These switches are environment variables it reads at import time, so an entry point
(``yoloprune.errors.run_main`` for the CLI, ``exit_on_error`` for a stage) calls
``configure_offline`` before anything imports ``ultralytics``. Importing yoloprune
sets nothing. A user's own setting of a variable wins (``setdefault``).
"""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "YOLO_OFFLINE": "1",  # ultralytics.utils.ONLINE = False: no update check, no event sync, no hub calls
    "YOLO_AUTOINSTALL": "false",  # never pip-install a missing requirement at run time
}


def configure_offline() -> None:
    """Set the environment switches that keep Ultralytics from reaching the network (entry points only)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
