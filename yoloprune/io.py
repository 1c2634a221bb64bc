"""Load and save Ultralytics models: one checked entry point in, atomic files out.

Loading a ``.pt`` file unpickles it, which runs code from the file: only load
checkpoints you trust. ``load_model`` is the single place yoloprune does so; it
refuses URLs and anything that is not a regular file before unpickling.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yoloprune.errors import YoloPruneError

SUPPORTED = "YOLOv8, YOLO11 and YOLO26 (detect, segment, pose, obb, classify)"
SUPPORTED_HEADS = {"Detect", "Segment", "Segment26", "Pose", "Pose26", "OBB", "OBB26", "Classify"}


def _check_supported(model: nn.Module, source: str) -> nn.Module:
    layers = getattr(model, "model", None)
    head = type(layers[-1]).__name__ if isinstance(layers, nn.Sequential) and len(layers) else type(model).__name__
    if head not in SUPPORTED_HEADS:
        raise YoloPruneError(f"{source}: a {type(model).__name__} with a {head} head is not supported; "
                             f"yoloprune prunes {SUPPORTED}")
    return model


def load_model(source: str | Path) -> nn.Module:
    """Return the Ultralytics model in a ``.pt`` checkpoint, or built from a model yaml (random weights)."""
    text = str(source)
    if "://" in text:
        raise YoloPruneError(f"{text}: URLs are not loaded (a checkpoint runs code when unpickled); download it, "
                             "check it, and pass the local file")
    path = Path(text)
    if path.suffix in {".yaml", ".yml"} and not path.exists():
        return _from_yaml(text)
    if not path.exists():
        raise YoloPruneError(f"{text}: no such file; pass a YOLO .pt checkpoint or a model yaml such as yolo11n.yaml")
    if not path.is_file():
        raise YoloPruneError(f"{text}: is a directory, not a file; pass a YOLO .pt checkpoint")
    if path.suffix in {".yaml", ".yml"}:
        return _from_yaml(text)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle, zip and EOF errors all mean the same to the user
        raise YoloPruneError(f"{text}: not a readable PyTorch checkpoint ({type(e).__name__}); "
                             "pass a .pt file saved by Ultralytics or yoloprune") from e
    model = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, nn.Module):
        kind = "a plain state_dict" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise YoloPruneError(f"{text}: holds {kind}, not an Ultralytics model; save the whole model "
                             "(YOLO(...).save or a trainer's best.pt)")
    if not hasattr(model, "yaml") or not isinstance(getattr(model, "model", None), nn.Sequential):
        raise YoloPruneError(f"{text}: holds a {type(model).__name__}, not an Ultralytics YOLO model; "
                             f"yoloprune prunes {SUPPORTED}")
    model = _check_supported(model, text).float()
    if isinstance(ckpt.get("train_args"), dict):
        model.args = ckpt["train_args"]  # as Ultralytics' own loader does
    return model


def _from_yaml(name: str) -> nn.Module:
    from ultralytics import YOLO

    try:
        model = YOLO(name, verbose=False).model
    except NotImplementedError as e:  # a yaml of another family (RT-DETR, ...) that YOLO() cannot build
        raise YoloPruneError(f"{name}: this model family is not supported; yoloprune prunes {SUPPORTED}") from e
    except (FileNotFoundError, KeyError, ValueError, TypeError) as e:
        raise YoloPruneError(f"{name}: not a known Ultralytics model yaml ({e}); try yolov8n.yaml, yolo11n.yaml "
                             "or yolo26n.yaml") from e
    return _check_supported(model, name)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success rename it into place, else delete it.

    A reader (or a killed run) never sees a half-written file: the previous one stays
    until the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write ``data`` as indented JSON, atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return Path(path)


def save_model(model: nn.Module, path: str | Path, record: dict[str, Any] | None = None) -> Path:
    """Save ``model`` as an ordinary Ultralytics checkpoint in fp32, atomically; return the path.

    ``YOLO(path)`` loads it in a process that never imported yoloprune (pickle imports
    ``yoloprune.modules`` by itself). ``record`` is stored under the ``yoloprune`` key.
    """
    import ultralytics

    model = model.float()
    for p in model.parameters():
        p.requires_grad_(False)
    args = getattr(model, "args", {})
    ckpt = {
        "date": datetime.now(timezone.utc).isoformat(),
        "version": ultralytics.__version__,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "epoch": -1,
        "best_fitness": None,
        "model": model,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": dict(args) if isinstance(args, dict) else vars(args),
        "train_metrics": None,
        "train_results": None,
        "yoloprune": record or {},
    }
    try:
        with atomic_path(path) as tmp:
            torch.save(ckpt, tmp)
    except OSError as e:
        raise YoloPruneError(f"{path}: cannot write ({e.strerror}); choose a writable output path with -o") from e
    return Path(path)
