"""Where a YOLO model's head is, and which of its branches inference runs (a leaf module: no yoloprune imports)."""

from __future__ import annotations

from torch import nn
from ultralytics.nn.modules import Detect

__all__ = ["deployed_branch", "head_of"]


def head_of(model: nn.Module) -> nn.Module:
    """Return the model's head (its last layer)."""
    return model.model[-1]


def deployed_branch(model: nn.Module, branch: str = "auto") -> tuple[str, list[nn.Module]]:
    """Return the name of the head branch inference runs and the modules of the branch it skips.

    End-to-end heads (YOLO26, YOLOv10) carry a one-to-one and a one-to-many branch; ``auto``
    is the one predict and export use. Other heads have a single branch.
    """
    head = head_of(model)
    if not isinstance(head, Detect) or getattr(head, "one2one_cv2", None) is None:
        return "single", []
    if branch == "auto":
        branch = "one2one" if head.end2end else "one2many"
    unused = head.one2many if branch == "one2one" else head.one2one
    return branch, [m for m in unused.values() if m is not None]
