"""Exact resume of a fine-tuning run: per-epoch random streams, the fp32 state beside last.pt, run fingerprints.

Ultralytics' ``last.pt`` holds only the EMA and the optimiser in fp16 and no random
state, so a resumed run drifts from an uninterrupted one. Here every epoch draws its
augmentation and shuffling streams from ``(seed, epoch)`` alone, and ``resume_fp32.pt``
beside ``last.pt`` keeps the raw model, the EMA, the optimiser (and a distillation's
adapters) in fp32, so a run killed and resumed ends with the same weights and metrics
as one never interrupted (tested). Exact with ``workers=0`` (worker processes keep
random streams of their own) and one optimiser step per batch (``nbs`` no larger than
``batch``; otherwise the first step after a resume comes early, and a warning says so).

The functions taking a ``trainer`` are called by ``yoloprune.train``'s trainer mixin.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler
from ultralytics.utils import RANK
from ultralytics.utils.patches import torch_load
from ultralytics.utils.torch_utils import unwrap_model

from yoloprune.errors import YoloPruneError
from yoloprune.io import atomic_path, load_model

LOGGER = logging.getLogger("yoloprune")

BEST_FP32 = "best_fp32.pt"  # fp32 twin of best.pt, kept beside it during training (survives an interruption)
RESUME_STATE = "resume_fp32.pt"  # beside last.pt while a run is unfinished: what an exact resume needs and it lacks
SOURCE = "source.json"  # in a run folder: what the run started from, so a later call can tell it may resume it


class EpochShuffle(Sampler[int]):
    """A random order of ``n`` indices drawn from ``(seed, epoch)`` alone; ``set_epoch`` picks the epoch.

    As ``DistributedSampler.set_epoch`` does for DDP: the same epoch gets the same order
    in any process, so a resumed run shuffles as an uninterrupted one.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle the next pass over the data as epoch ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(epoch_seed(self.seed, self.epoch))
        yield from torch.randperm(self.n, generator=generator).tolist()


def epoch_seed(seed: int, epoch: int) -> int:
    """Return the 32-bit seed of one training epoch's random streams (a function of ``seed`` and ``epoch`` alone)."""
    return int.from_bytes(hashlib.sha256(f"yoloprune:{seed}:{epoch}:{RANK}".encode()).digest()[:4], "little")


def seed_epoch(trainer) -> None:
    """Seed the epoch's augmentation (python, numpy), torch and shuffle streams from the run's seed and the epoch.

    Ultralytics seeds once per process, so the streams of epoch ``k`` depend on every
    epoch before it, and a resumed run (a new process) draws other ones. Seeded per
    epoch, a run resumed at epoch ``k`` augments and shuffles epoch ``k`` as an
    uninterrupted run does. An ``on_train_epoch_start`` callback.
    """
    seed = epoch_seed(int(trainer.args.seed), int(trainer.epoch))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if getattr(trainer, "shuffler", None) is not None:
        trainer.shuffler.set_epoch(int(trainer.epoch))


def save_state(trainer, writes_best: bool) -> None:
    """Write the fp32 state an exact resume needs beside last.pt, and the fp32 twin of best.pt when it was written."""
    state = {  # fp32: the tensors the run trains with; saved after last.pt, so its epoch matches last.pt's or lags
        "epoch": trainer.epoch,
        "model": unwrap_model(trainer.model).state_dict(),
        "ema": trainer.ema.ema.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
    }
    adapters = getattr(getattr(trainer, "distiller", None), "adapters", None)
    if adapters is not None:  # trained beside the model, never part of it (see yoloprune.distill)
        state["adapters"] = adapters.state_dict()
    with atomic_path(trainer.wdir / RESUME_STATE) as tmp:
        torch.save(state, tmp)
    if writes_best:
        model = strip(deepcopy(trainer.ema.ema).float().cpu())
        with atomic_path(trainer.wdir / BEST_FP32) as tmp:
            torch.save({"model": model, "epoch": trainer.epoch, "fitness": trainer.fitness}, tmp)


def load_state(trainer, ckpt: dict) -> None:
    """Put back the fp32 model, EMA, optimiser (and adapters) of ``ckpt``'s epoch that its fp16 ``last.pt`` lacks."""
    path = trainer.wdir / RESUME_STATE
    try:
        state = torch_load(path, map_location=trainer.device) if path.is_file() else None
    except Exception as e:  # noqa: BLE001  (unreadable: fall back to Ultralytics' own resume, with a warning)
        LOGGER.debug("%s: %s", path, e)
        state = None
    adapters = getattr(getattr(trainer, "distiller", None), "adapters", None)
    if not isinstance(state, dict) or state.get("epoch") != ckpt.get("epoch"):
        LOGGER.warning("%s: no fp32 state of epoch %s beside it; resuming from its fp16 EMA as Ultralytics does, "
                       "so the run ends slightly differently than an uninterrupted one%s", trainer.last,
                       ckpt.get("epoch"), " (and the distillation adapters start again)" if adapters else "")
        return
    unwrap_model(trainer.model).load_state_dict(state["model"])
    trainer.ema.ema.load_state_dict(state["ema"])
    for saved, group in zip(state["optimizer"]["param_groups"], trainer.optimizer.param_groups, strict=True):
        saved["fused"] = group.get("fused")  # as BaseTrainer: the runtime device picks the kernel
    trainer.optimizer.load_state_dict(state["optimizer"])
    if adapters is not None:
        if "adapters" not in state:
            raise YoloPruneError(f"{path}: a run without distillation adapters; resume it with the distillation "
                                 "settings it started with, or start a new run")
        adapters.load_state_dict(state["adapters"])
    LOGGER.info("resumed the fp32 model, EMA and optimiser of epoch %d from %s", state["epoch"] + 1, path)
    if trainer.accumulate > 1:  # BaseTrainer keeps the last optimiser step's batch in a local: it restarts at -1
        LOGGER.warning("this run steps the optimiser every %d batches (nbs=%s, batch=%s): the first step after "
                       "the resume comes early, so the run ends slightly differently than an uninterrupted one; "
                       "set nbs to the batch size for an exact resume", trainer.accumulate, trainer.args.nbs,
                       trainer.batch_size)


def strip(model: nn.Module) -> nn.Module:
    """Make a trained module a plain checkpoint model in place: no loss state, plain-dict args, frozen."""
    if hasattr(model, "criterion"):
        model.criterion = None
    if hasattr(model, "args") and not isinstance(model.args, dict):
        model.args = dict(vars(model.args))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def restore_fp32(best: Path, twin: Path) -> None:
    """Rewrite ``best`` (stripped by Ultralytics, fp16) with the fp32 model saved in ``twin``; keep its metadata."""
    ckpt = torch_load(best, map_location="cpu")
    if twin.exists():
        ckpt["model"] = torch_load(twin, map_location="cpu")["model"]
    else:  # e.g. a run trained by another trainer: upcasting keeps fp16's rounding but gives fp32 tensors
        LOGGER.warning("%s: no fp32 copy beside it; saving its fp16 weights as fp32", best)
    ckpt["model"] = strip(ckpt["model"].float())
    with atomic_path(best) as tmp:
        torch.save(ckpt, tmp)
    twin.unlink(missing_ok=True)


def weights_digest(path: str | Path) -> str:
    """Return the sha256 of a checkpoint's weights (names, shapes, dtypes, values), not of the file's bytes."""
    digest = hashlib.sha256()
    for name, tensor in load_model(path).state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def fingerprint(model: Path, data: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Return what identifies a run: the starting weights (not the file's bytes, which hold a date), data, settings."""
    return {"weights_sha256": weights_digest(model), "data": str(Path(data).resolve()), **settings}


def same_run(out_dir: str | Path, expected: dict[str, Any]) -> bool:
    """Return True if ``out_dir`` holds an unfinished run whose recorded fingerprint is ``expected``."""
    out_dir = Path(out_dir)
    try:
        check_resumable(out_dir / "weights" / "last.pt")
        recorded = json.loads((out_dir / SOURCE).read_text())
    except (YoloPruneError, OSError, ValueError):
        return False
    return recorded == json.loads(json.dumps(expected))


def check_resumable(last: Path) -> None:
    """Raise YoloPruneError unless ``last`` is a readable Ultralytics checkpoint of an unfinished run."""
    if not last.is_file():
        raise YoloPruneError(f"{last}: no checkpoint to resume; start the run with resume=False")
    try:
        ckpt = torch_load(last, map_location="cpu")
    except Exception as e:  # truncated, not a checkpoint: pickle raises many kinds
        raise YoloPruneError(f"{last}: unreadable checkpoint ({type(e).__name__}); start the run again with "
                             "resume=False") from e
    if not isinstance(ckpt, dict):
        raise YoloPruneError(f"{last}: not an Ultralytics training checkpoint; start the run again with resume=False")
    epoch, total = ckpt.get("epoch", -1), (ckpt.get("train_args") or {}).get("epochs", 0)
    if epoch < 0 or ckpt.get("optimizer") is None or epoch + 1 >= total:
        raise YoloPruneError(f"{last}: that run already finished; start a new run (resume=False) or choose "
                             "another out_dir")
