"""yoloprune: structured pruning for Ultralytics YOLO detectors (YOLOv8, YOLO11, YOLO26)."""

from yoloprune import offline  # noqa: F401  (first: sets Ultralytics' offline switches before it is imported)

__version__ = "0.1.0"
