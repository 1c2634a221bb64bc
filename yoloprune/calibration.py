"""Real training batches and the model's own loss on them, for gradient-based importance (``taylor``).

``real_loss`` draws ``n_batches`` batches from the training split of a dataset
(no augmentation: letterboxed as validation does, so the scores depend on the data,
not on a random crop), keeps them in memory, and returns ``loss_fn(model)``: the
model's own Ultralytics training loss (``model.loss``, built by ``init_criterion`` for
its task: v8 detection, end-to-end YOLO26, segment, pose, OBB, classify) summed over
those batches. Every call sees the same batches, so the channel scores of successive
pruning steps differ only because the network did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yoloprune.errors import YoloPruneError

LOGGER = logging.getLogger("yoloprune")

Batch = dict[str, Any]
CALIB_BATCHES = 4  # default batches of 8: measured on yolov8n at 2x, 16 batches scored no better than 4 (0.181/0.180)
_UNSET = object()


def _yolo_batches(model: nn.Module, data: Path, cfg: Any, count: int, batch: int, seed: int) -> list[Batch]:
    """Return ``count`` collated batches of a detect/segment/pose/obb data yaml's training split, images in [0, 1]."""
    from ultralytics.data import build_yolo_dataset

    from yoloprune.data import check_data_yaml

    info = check_data_yaml(data)
    if info["nc"] != int(model.model[-1].nc):
        raise YoloPruneError(f"{data}: has {info['nc']} classes but the model predicts {int(model.model[-1].nc)}; "
                             "calibrate on the data the model was trained on")
    stride = max(int(model.stride.max()), 32) if hasattr(model, "stride") else 32
    # mode "val": no augmentation, letterboxed to imgsz; rect off so every batch has the same square shape
    dataset = build_yolo_dataset(cfg, info["train"], batch, info, mode="val", rect=False, stride=stride)
    batches = []
    for idxs in _chunks(len(dataset), count, batch, seed):
        b = dataset.collate_fn([dataset[i] for i in idxs])
        b["img"] = b["img"].float() / 255
        batches.append(b)
    return batches


def _classify_batches(model: nn.Module, data: Path, cfg: Any, count: int, batch: int, seed: int) -> list[Batch]:
    """Return ``count`` batches of a classification dataset folder's ``train`` split (class sub-folders)."""
    from ultralytics.data.dataset import ClassificationDataset

    root = Path(data) / "train"
    if not root.is_dir():
        raise YoloPruneError(f"{data}: no train/ folder; pass a classification dataset folder with train/<class>/ "
                             "images")
    dataset = ClassificationDataset(str(root), cfg, augment=False, prefix="train", names=getattr(model, "names", None))
    return [torch.utils.data.default_collate([dataset[i] for i in idxs])
            for idxs in _chunks(len(dataset), count, batch, seed)]


# Ultralytics task -> builder of calibration batches in the form that task's model.loss reads
BATCHES: dict[str, Callable[[nn.Module, Path, Any, int, int, int], list[Batch]]] = {
    "detect": _yolo_batches,
    "segment": _yolo_batches,
    "pose": _yolo_batches,
    "obb": _yolo_batches,
    "classify": _classify_batches,
}


def _chunks(n: int, count: int, batch: int, seed: int) -> list[list[int]]:
    """Return ``count`` disjoint index lists of ``batch`` images drawn by ``seed`` (fewer if the split is small)."""
    if n == 0:
        raise YoloPruneError("the training split has no images; calibration needs real training images")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    chunks = [order[i:i + batch] for i in range(0, min(n, count * batch), batch)]
    if len(chunks) < count:
        LOGGER.warning("calibration: %d training images give %d batches of %d, not %d", n, len(chunks), batch, count)
    return chunks


def calibration_batches(model: nn.Module, data: str | Path, imgsz: int, n_batches: int = CALIB_BATCHES, batch: int = 8,
                        seed: int = 0) -> list[Batch]:
    """Return ``n_batches`` un-augmented training batches of ``data`` for ``model``'s task (drawn by ``seed``)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import guess_model_task
    from ultralytics.utils import DEFAULT_CFG

    for name, value in (("n_batches", n_batches), ("batch", batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise YoloPruneError(f"calibration {name} must be an integer >= 1, got {value!r}")
    task = guess_model_task(model)
    if task not in BATCHES:
        raise YoloPruneError(f"calibration does not support task '{task}'; use a method without gradients (lamp)")
    cfg = get_cfg(DEFAULT_CFG, {"imgsz": imgsz, "task": task, "cache": False, "fraction": 1.0})
    return BATCHES[task](model, Path(data), cfg, n_batches, batch, seed)


def loss_hyperparameters(model: nn.Module) -> Any:
    """Return Ultralytics' defaults updated with the model's own training settings, as ``model.args`` in training."""
    from ultralytics.utils import DEFAULT_CFG_DICT, IterableSimpleNamespace

    own = getattr(model, "args", None)
    own = vars(own) if hasattr(own, "__dict__") else own if isinstance(own, dict) else {}
    return IterableSimpleNamespace(**{**DEFAULT_CFG_DICT, **{k: v for k, v in own.items() if k in DEFAULT_CFG_DICT}})


@contextmanager
def loss_mode(model: nn.Module, hyp: Any) -> Iterator[nn.Module]:
    """Put ``model`` in training mode with frozen BatchNorm statistics and a fresh criterion; restore it afterwards.

    Training mode gives the heads' training outputs that the loss reads; BatchNorm stays in
    eval mode so calibration changes no running statistics. The criterion is rebuilt each
    time because pruning changes the network between calls, and removed afterwards so it
    never reaches a saved checkpoint.
    """
    saved = model.training, getattr(model, "args", _UNSET), getattr(model, "criterion", _UNSET)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    model.args, model.criterion = hyp, None
    try:
        yield model
    finally:
        model.train(saved[0])
        for name, value in (("args", saved[1]), ("criterion", saved[2])):
            if value is _UNSET:
                delattr(model, name)
            else:
                setattr(model, name, value)


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batches_loss(batches: list[Batch]) -> Callable[[nn.Module], torch.Tensor]:
    """Return ``loss_fn(model)``: the model's own training loss, averaged over ``batches``.

    All batches but the last are back-propagated inside the call, and the last one's loss
    is returned for the caller's ``backward()``: gradients accumulate over every batch
    while only one batch's graph is held in memory. The caller zeroes the gradients first.
    """
    if not batches:
        raise YoloPruneError("no calibration batches; give calib_batches >= 1 and a training split with images")

    def loss_fn(model: nn.Module) -> torch.Tensor:
        device, n = next(model.parameters()).device, len(batches)
        with loss_mode(model, loss_hyperparameters(model)):
            for b in batches[:-1]:
                (model.loss(_to(b, device))[0].sum() / n).backward()
            return model.loss(_to(batches[-1], device))[0].sum() / n

    return loss_fn


def real_loss(model: nn.Module, data: str | Path, imgsz: int, n_batches: int = CALIB_BATCHES, batch: int = 8,
              seed: int = 0) -> Callable[[nn.Module], torch.Tensor]:
    """Return ``loss_fn(model)``: ``model``'s own loss on ``n_batches`` real training batches of ``data``."""
    return batches_loss(calibration_batches(model, data, imgsz, n_batches, batch, seed))
