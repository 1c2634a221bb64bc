"""``python -m yoloprune``: the same as the ``yoloprune`` command."""

import sys

from yoloprune.cli import main

sys.exit(main())
