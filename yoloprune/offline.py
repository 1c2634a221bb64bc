"""Keep Ultralytics offline and quiet: the one place that sets what it reads at import time.

Ultralytics checks for updates, syncs settings, downloads fonts and auto-installs
missing requirements, each of which stalls or fails on a machine without internet.
These switches are environment variables it reads when first imported, so this
module must run before ``ultralytics`` is imported; ``yoloprune/__init__.py`` does
that. A user's own setting of a variable wins (``setdefault``).
"""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "YOLO_OFFLINE": "1",  # ultralytics.utils.ONLINE = False: no update check, no event sync, no hub calls
    "YOLO_AUTOINSTALL": "false",  # never pip-install a missing requirement at run time
}


def configure_offline() -> None:
    """Set the environment switches that keep Ultralytics from reaching the network."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


configure_offline()
