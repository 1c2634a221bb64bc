"""yoloprune: structured pruning for Ultralytics YOLO detectors (YOLOv8, YOLO11, YOLO26).

The public API, imported on first use (``import yoloprune`` alone loads no model code and
changes nothing in the process): ``load_model`` -> ``convert_model`` -> ``prune_model``
(``PruneConfig``) -> ``save_model``; ``export_model`` (``ExportConfig``); the modules
``yoloprune.finetune`` and ``yoloprune.benchmark`` for recovery and measurement.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {  # name -> the module that defines it
    "YoloPruneError": "errors",
    "load_model": "io",
    "save_model": "io",
    "convert_model": "convert",
    "PruneConfig": "prune",
    "prune_model": "prune",
    "ExportConfig": "export",
    "export_model": "export",
    "BenchmarkConfig": "benchmark",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f"yoloprune.{_API[name]}"), name)
    raise AttributeError(f"module 'yoloprune' has no attribute {name!r}")
