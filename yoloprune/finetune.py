"""Fine-tune a pruned model with Ultralytics' training engine, keeping its pruned architecture.

Ultralytics' ``YOLO(...).train()`` and its trainers' ``get_model`` rebuild the network
from ``model.yaml`` and copy over the weights whose shapes match
(``DetectionModel.load`` -> ``intersect_dicts``): on a pruned model every pruned layer
silently goes back to its full width and random weights. The trainers here subclass
Ultralytics' task trainers at their ``get_model`` seam and return the pruned module
itself. The model is always loaded from the checkpoint path in the trainer's
arguments (``model=``, or ``last.pt`` on resume), never held in memory, so a fresh
process rebuilds the same trainer from its arguments: Ultralytics' DDP launcher
pickles the trainer class by module path and re-creates it in each worker.

Each run also:
- drops Ultralytics' integration callbacks (DVC, MLflow, ClearML, Comet, Ray Tune,
  platform, analytics) for this trainer only, so training writes nothing outside its
  run folder;
- turns plots off by default and gives Ultralytics a local font, since it fetches
  Arial over the network when the font is missing (``check_font``);
- writes ``best.pt`` with fp32 weights: Ultralytics saves checkpoints in fp16, which
  would round the weights the next stage (export, another pruning step) starts from;
- resumes exactly: Ultralytics' ``last.pt`` holds only the EMA and the optimiser in
  fp16 and no random state, so a resumed run drifts from an uninterrupted one. Here
  every epoch draws its augmentation and shuffling streams from ``(seed, epoch)``
  alone, and ``resume_fp32.pt`` beside ``last.pt`` keeps the raw model, the EMA and
  the optimiser in fp32, so a run killed and resumed ends with the same weights and
  metrics as one never interrupted (tested). Exact with ``workers=0`` (the default;
  worker processes keep random streams of their own) and one optimiser step per batch
  (``nbs`` no larger than ``batch``, as in params.yaml; otherwise the first step after
  a resume comes early, and a warning says so);
- writes ``last.pt`` and ``best.pt`` atomically (Ultralytics writes them in place, so
  a kill during the save would leave neither old nor new).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import RandomSampler, Sampler
from ultralytics.models.yolo.classify import ClassificationTrainer
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.obb import OBBTrainer
from ultralytics.models.yolo.pose import PoseTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer
from ultralytics.utils import DEFAULT_CFG, DEFAULT_CFG_DICT, RANK, USER_CONFIG_DIR
from ultralytics.utils import callbacks as ul_callbacks
from ultralytics.utils.patches import torch_load
from ultralytics.utils.torch_utils import unwrap_model

from yoloprune.curves import map_curve, read_results
from yoloprune.errors import YoloPruneError
from yoloprune.export import torch_threads_kept
from yoloprune.io import atomic_path, load_model, write_json

LOGGER = logging.getLogger("yoloprune")

BEST_FP32 = "best_fp32.pt"  # fp32 twin of best.pt, kept beside it during training (survives an interruption)
RESUME_STATE = "resume_fp32.pt"  # beside last.pt while a run is unfinished: what an exact resume needs and it lacks
DEFAULTS = {"plots": False, "workers": 0}  # plots fetch fonts and cost CPU time; workers: see finetune()
# Settings finetune() sets itself; "pretrained" would load another checkpoint's weights over the pruned ones.
RESERVED = {"model", "data", "resume", "project", "name", "exist_ok", "save_dir", "mode", "task", "pretrained"}


def _is_integration(fn: Callable) -> bool:
    """Return True for Ultralytics' logging/analytics integration callbacks (all but its no-op defaults)."""
    module = getattr(fn, "__module__", None) or ""
    return module == "ultralytics.utils.events" or (
        module.startswith("ultralytics.utils.callbacks.") and module != "ultralytics.utils.callbacks.base"
    )


def provide_fonts() -> None:
    """Give Ultralytics a local font so its plotting never downloads one.

    ``check_font`` (ultralytics/utils/checks.py) returns ``USER_CONFIG_DIR/Arial.ttf``
    when it exists and otherwise asks the network, on every dataset check, plots or not.
    Matplotlib's DejaVu Sans (installed with Ultralytics) stands in for Arial, and for
    Arial Unicode (non-ASCII class names), as the file Ultralytics would have downloaded.
    """
    from matplotlib import get_data_path

    source = Path(get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        target = Path(USER_CONFIG_DIR) / name
        if target.exists() or not source.is_file():
            continue
        try:
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
        except OSError as e:  # a read-only config dir: Ultralytics falls back to asking the network
            LOGGER.debug("cannot write %s: %s", target, e)


class PrunedTrainerMixin:
    """Train the pruned module in a checkpoint as it is; mixed into each Ultralytics task trainer."""

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict | None = None, _callbacks: dict | None = None) -> None:
        provide_fonts()  # before super().__init__: its dataset check calls check_font
        workers = (overrides or {}).get("workers")
        super().__init__(cfg, overrides, _callbacks)
        if workers is not None:  # BaseTrainer sets workers=0 on CPU; the caller's explicit choice stands
            self.args.workers = workers
        for event, fns in self.callbacks.items():  # the validator gets this dict: drop integrations for it too
            self.callbacks[event] = [f for f in fns if not _is_integration(f)]
        self.shuffler: EpochShuffle | None = None  # the training loader's sampler, once built (see get_dataloader)
        self.cpu_threads: int | None = None  # torch threads on the CPU (None: every core); set before train()
        # Called on the unwrapped model between backward and the optimiser step (e.g. sparsity's gradient penalty)
        self.regularizer: Callable[[nn.Module], None] | None = None
        self.callbacks["on_train_epoch_start"].insert(0, seed_epoch)
        if RANK in {-1, 0} and not self.resume:
            for name in (BEST_FP32, RESUME_STATE):  # a previous run's files must not become this run's
                (self.wdir / name).unlink(missing_ok=True)

    def _setup_train(self) -> None:
        """Set up as Ultralytics does, with torch on ``cpu_threads`` threads when training on the CPU.

        ``select_device("cpu")`` gives torch ``os.cpu_count() - 1`` threads: one of two
        cores. Measured here (2 cores, yolov8n, imgsz 160, batch 8): 15 s an epoch of 192
        images on one thread, 9.3 s on two. ``finetune`` restores the count afterwards.
        """
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(self.cpu_threads))
        super()._setup_train()

    def optimizer_step(self) -> None:
        """Step as Ultralytics does, after ``regularizer`` (if set) has changed the unscaled gradients.

        The regularizer sees true gradients: under AMP they are unscaled first, and
        ``GradScaler.unscale_`` raises when called twice in one step, so the second call
        inside ``BaseTrainer.optimizer_step`` is skipped for this step only.
        """
        if self.regularizer is None:
            super().optimizer_step()
            return
        self.scaler.unscale_(self.optimizer)
        self.regularizer(unwrap_model(self.model))
        self.scaler.unscale_ = lambda optimizer: None  # on this trainer's scaler only, for this step only
        try:
            super().optimizer_step()
        finally:
            del self.scaler.unscale_  # the instance attribute goes; GradScaler's method shows again

    def run_callbacks(self, event: str) -> None:
        """Run the event's callbacks except integrations (they are added inside ``BaseTrainer.__init__``)."""
        for fn in self.callbacks.get(event, []):
            if not _is_integration(fn):
                fn(self)

    def get_model(self, cfg=None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
        """Return the pruned module itself, never a model rebuilt from ``cfg`` (the unpruned yaml).

        ``weights`` is the module ``setup_model`` loaded from ``args.model`` (or the one
        ``YOLO(...).train(trainer=...)`` passes); without one, it is loaded from ``args.model``.
        """
        model = weights if isinstance(weights, nn.Module) else load_model(self.args.model)
        model.float()
        for p in model.parameters():
            p.requires_grad_(p.dtype.is_floating_point)  # checkpoints load frozen; the trainer re-freezes DFL itself
        if hasattr(model, "criterion"):
            model.criterion = None  # rebuilt on the first batch from this run's hyperparameters
        if self.args.task != "classify":  # classification heads are resized by ClassificationTrainer.setup_model
            match_dataset(model, self.data)
        return model

    def get_dataloader(self, dataset_path: str, batch_size: int = 16, rank: int = 0, mode: str = "train"):
        """Return Ultralytics' loader; the training one shuffles each epoch from the seed and the epoch alone.

        Its ``RandomSampler`` draws from one generator for the whole run, so the order of
        epoch ``k`` depends on the epochs before it (and a drained iteration draws once
        more before it stops); an ``EpochShuffle`` in its place does not. DDP's
        ``DistributedSampler`` is seeded by epoch already and stays.
        """
        loader = super().get_dataloader(dataset_path, batch_size=batch_size, rank=rank, mode=mode)
        batches = getattr(loader.batch_sampler, "sampler", None)  # InfiniteDataLoader: _RepeatSampler(BatchSampler)
        if mode == "train" and isinstance(getattr(batches, "sampler", None), RandomSampler) \
                and not batches.sampler.replacement:
            self.shuffler = batches.sampler = EpochShuffle(len(batches.sampler), int(self.args.seed))
        return loader

    def save_model(self) -> bool:
        """Save Ultralytics' checkpoints atomically, then the fp32 state an exact resume needs and the fp32 best.

        ``BaseTrainer.save_model`` writes ``last.pt`` (and ``best.pt`` on the epoch whose
        fitness is the best) in place; here it writes them to temporary files that are
        renamed over the old ones once complete.
        """
        writes_best = self.best_fitness == self.fitness  # the condition BaseTrainer.save_model writes best.pt on
        last, best = self.last, self.best
        with ExitStack() as stack:
            self.last = stack.enter_context(atomic_path(last))
            if writes_best:
                self.best = stack.enter_context(atomic_path(best))
            try:
                saved = super().save_model()
            finally:
                self.last, self.best = last, best
        if not saved:
            return saved
        state = {  # fp32: the tensors the run trains with; saved after last.pt, so its epoch matches last.pt's or lags
            "epoch": self.epoch,
            "model": unwrap_model(self.model).state_dict(),
            "ema": self.ema.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        with atomic_path(self.wdir / RESUME_STATE) as tmp:
            torch.save(state, tmp)
        if writes_best:
            model = _strip(deepcopy(self.ema.ema).float().cpu())
            with atomic_path(self.wdir / BEST_FP32) as tmp:
                torch.save({"model": model, "epoch": self.epoch, "fitness": self.fitness}, tmp)
        return saved

    def resume_training(self, ckpt: dict | None) -> None:
        """Resume as Ultralytics does, then put back the fp32 model, EMA and optimiser its fp16 ``last.pt`` lacks."""
        super().resume_training(ckpt)
        if ckpt is None or not self.resume:
            return
        path = self.wdir / RESUME_STATE
        try:
            state = torch_load(path, map_location=self.device) if path.is_file() else None
        except Exception as e:  # noqa: BLE001  (unreadable: fall back to Ultralytics' own resume, with a warning)
            LOGGER.debug("%s: %s", path, e)
            state = None
        if not isinstance(state, dict) or state.get("epoch") != ckpt.get("epoch"):
            LOGGER.warning("%s: no fp32 state of epoch %s beside it; resuming from its fp16 EMA as Ultralytics does, "
                           "so the run ends slightly differently than an uninterrupted one", self.last,
                           ckpt.get("epoch"))
            return
        unwrap_model(self.model).load_state_dict(state["model"])
        self.ema.ema.load_state_dict(state["ema"])
        for saved, group in zip(state["optimizer"]["param_groups"], self.optimizer.param_groups, strict=True):
            saved["fused"] = group.get("fused")  # as BaseTrainer: the runtime device picks the kernel
        self.optimizer.load_state_dict(state["optimizer"])
        LOGGER.info("resumed the fp32 model, EMA and optimiser of epoch %d from %s", state["epoch"] + 1, path)
        if self.accumulate > 1:  # BaseTrainer keeps the last optimiser step's batch in a local: it restarts at -1
            LOGGER.warning("this run steps the optimiser every %d batches (nbs=%s, batch=%s): the first step after "
                           "the resume comes early, so the run ends slightly differently than an uninterrupted one; "
                           "set nbs to the batch size for an exact resume", self.accumulate, self.args.nbs,
                           self.batch_size)

    def final_eval(self) -> None:
        """Validate best.pt as Ultralytics does, then replace its fp16 model with the fp32 one."""
        super().final_eval()
        if RANK in {-1, 0}:
            (self.wdir / RESUME_STATE).unlink(missing_ok=True)  # a finished run cannot be resumed
            if self.best.exists():
                _restore_fp32(self.best, self.wdir / BEST_FP32)


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


def cpu_threads(threads: int | None = None) -> int:
    """Return the torch thread count to train with on the CPU: ``threads``, or every core this process may use.

    The count is a result setting, not only a speed one: the weights a run ends with differ
    in their last bits between thread counts (measured: five AdamW steps of yolov8n on one
    and on two threads), so a run is repeated exactly only on as many threads.
    """
    if threads is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise YoloPruneError(f"threads must be an integer >= 1 or None (every core), got {threads!r}")
    return threads


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


def _strip(model: nn.Module) -> nn.Module:
    """Make a trained module a plain checkpoint model in place: no loss state, plain-dict args, frozen."""
    if hasattr(model, "criterion"):
        model.criterion = None
    if hasattr(model, "args") and not isinstance(model.args, dict):
        model.args = dict(vars(model.args))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _restore_fp32(best: Path, twin: Path) -> None:
    """Rewrite ``best`` (stripped by Ultralytics, fp16) with the fp32 model saved in ``twin``; keep its metadata."""
    ckpt = torch_load(best, map_location="cpu")
    if twin.exists():
        ckpt["model"] = torch_load(twin, map_location="cpu")["model"]
    else:  # e.g. a run trained by another trainer: upcasting keeps fp16's rounding but gives fp32 tensors
        LOGGER.warning("%s: no fp32 copy beside it; saving its fp16 weights as fp32", best)
    ckpt["model"] = _strip(ckpt["model"].float())
    with atomic_path(best) as tmp:
        torch.save(ckpt, tmp)
    twin.unlink(missing_ok=True)


def match_dataset(model: nn.Module, data: dict) -> nn.Module:
    """Give ``model``'s head the dataset's class count in place; the new class outputs start untrained.

    Every other layer keeps its pruned width and weights. As Ultralytics does when its
    model yaml's ``nc`` differs from the data's, the class convolutions are replaced,
    with Ultralytics' prior-probability bias.
    """
    import math

    head = model.model[-1]
    nc = int(data["nc"])
    kpt_shape = data.get("kpt_shape")
    if kpt_shape is not None and hasattr(head, "kpt_shape") and list(head.kpt_shape) != list(kpt_shape):
        raise YoloPruneError(f"the model predicts keypoints of shape {list(head.kpt_shape)} but the data has "
                             f"{list(kpt_shape)}; prune a pose model trained with kpt_shape {list(kpt_shape)}")
    if getattr(head, "nc", nc) == nc:
        return model
    branches = [getattr(head, name, None) for name in ("cv3", "one2one_cv3")]
    branches = [b for b in branches if isinstance(b, nn.ModuleList)]
    outs = [(seq, len(seq) - 1) for b in branches for seq in b if isinstance(seq, nn.Sequential)]
    semseg = getattr(getattr(head, "proto", None), "semseg", None)
    if isinstance(semseg, nn.Sequential):  # YOLO26 segmentation's semantic branch: one channel per class
        outs.append((semseg, len(semseg) - 1))
    if not outs or not all(isinstance(seq[i], nn.Conv2d) and seq[i].out_channels == head.nc for seq, i in outs):
        raise YoloPruneError(f"the model has {head.nc} classes but the data has {nc}, and its {type(head).__name__} "
                             f"head's class outputs cannot be resized; prune a model trained with {nc} classes")
    LOGGER.warning("the model has %d classes but the data has %d: its class outputs are replaced and start "
                   "untrained (pass data with the model's %d classes to keep them)", head.nc, nc, head.nc)
    strides = getattr(head, "stride", None)
    for k, (seq, i) in enumerate(outs):
        old = seq[i]
        new = nn.Conv2d(old.in_channels, nc, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
        if new.bias is not None and strides is not None and len(strides) and seq is not semseg:
            s = float(strides[k % len(strides)])
            new.bias.data[:] = math.log(5 / nc / (640 / s) ** 2)  # Detect.bias_init: ~0.01 objects per cell
        seq[i] = new.to(old.weight.device, old.weight.dtype)
    head.nc = nc
    if hasattr(head, "reg_max"):
        head.no = nc + head.reg_max * 4
    if isinstance(getattr(model, "yaml", None), dict):
        model.yaml["nc"] = nc
    model.nc = nc
    return model


class PrunedDetectionTrainer(PrunedTrainerMixin, DetectionTrainer):
    """Ultralytics' DetectionTrainer, training the pruned checkpoint in ``model=`` as it is."""


class PrunedSegmentationTrainer(PrunedTrainerMixin, SegmentationTrainer):
    """Ultralytics' SegmentationTrainer, training the pruned checkpoint in ``model=`` as it is."""


class PrunedPoseTrainer(PrunedTrainerMixin, PoseTrainer):
    """Ultralytics' PoseTrainer, training the pruned checkpoint in ``model=`` as it is."""


class PrunedOBBTrainer(PrunedTrainerMixin, OBBTrainer):
    """Ultralytics' OBBTrainer, training the pruned checkpoint in ``model=`` as it is."""


class PrunedClassificationTrainer(PrunedTrainerMixin, ClassificationTrainer):
    """Ultralytics' ClassificationTrainer, training the pruned checkpoint in ``model=`` as it is."""


TRAINERS: dict[str, type] = {
    "detect": PrunedDetectionTrainer,
    "segment": PrunedSegmentationTrainer,
    "pose": PrunedPoseTrainer,
    "obb": PrunedOBBTrainer,
    "classify": PrunedClassificationTrainer,
}


@dataclass(frozen=True)
class FinetuneResult:
    """Where a fine-tuning run wrote its checkpoints, and the validation metrics of best.pt."""

    best: Path  # fp32, the stage output
    last: Path  # Ultralytics' own (fp16); resumable only while the run is unfinished
    save_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)  # Ultralytics' names, e.g. "metrics/mAP50-95(B)"
    rows: tuple[dict[str, str], ...] = ()  # results.csv, one row per epoch (``read_results``): losses, metrics, lr

    @property
    def results_csv(self) -> Path:
        """Return Ultralytics' per-epoch record of the run (losses, metrics, learning rates): its results.csv."""
        return self.save_dir / "results.csv"

    @property
    def epochs(self) -> int:
        """Return the epochs completed in the run folder, resumed runs included."""
        return len(self.rows)

    @property
    def curve(self) -> tuple[float, ...]:
        """Return box mAP50-95 of each epoch's validation (empty for a task without boxes)."""
        return map_curve(self.rows)

    @property
    def map50(self) -> float | None:
        """Return box mAP at IoU 0.5, or None for a task without boxes."""
        return self.metrics.get("metrics/mAP50(B)")

    @property
    def map50_95(self) -> float | None:
        """Return box mAP averaged over IoU 0.5:0.95, or None for a task without boxes."""
        return self.metrics.get("metrics/mAP50-95(B)")


def finetune(
    model: str | Path,
    data: str | Path,
    epochs: int = 10,
    imgsz: int = 640,
    batch: int = 16,
    device: str = "cpu",
    out_dir: str | Path = "runs/finetune",
    resume: bool = False,
    workers: int = 0,
    threads: int | None = None,
    callbacks: dict[str, list[Callable]] | None = None,
    regularizer: Callable[[nn.Module], None] | None = None,
    **overrides: Any,
) -> FinetuneResult:
    """Fine-tune the pruned checkpoint ``model`` on ``data``; return where best.pt (fp32) and last.pt are.

    ``out_dir`` is the run folder (Ultralytics' project/name), owned by the run: a new
    run replaces its checkpoints. ``resume=True`` continues the unfinished run in
    ``out_dir`` from ``weights/last.pt`` with that run's settings (Ultralytics lets
    only device, workers, batch, imgsz, cache and a few others change). ``workers=0``
    loads batches in the training process, which is what Ultralytics does on CPU
    anyway. ``threads`` is torch's thread count on the CPU (None: every core; see
    ``cpu_threads``). ``callbacks`` adds functions to Ultralytics' trainer events
    (``{"on_fit_epoch_end": [fn]}``); ``overrides`` are other Ultralytics training
    settings (lr0, optimizer, cache, amp, plots, ...). ``regularizer`` is called on the
    unwrapped model after each backward pass and before the optimiser step (it may
    change the gradients, e.g. add a sparsity penalty's); it is not resumed state.
    """
    from ultralytics.nn.tasks import guess_model_task

    model, data, out_dir = Path(model), Path(data), Path(out_dir).resolve()
    for name, value, low in (("epochs", epochs, 1), ("imgsz", imgsz, 32), ("batch", batch, 1), ("workers", workers, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise YoloPruneError(f"{name} must be an integer >= {low}, got {value!r}")
    cpu_threads(threads)  # checked before anything is written
    reserved = sorted(set(overrides) & RESERVED)
    if reserved:
        raise YoloPruneError(f"finetune() sets {', '.join(reserved)} itself; pass the model, data, out_dir and "
                             "resume arguments instead (the pruned weights are the starting point)")
    unknown = sorted(k for k in overrides if k not in DEFAULT_CFG_DICT)
    if unknown:
        raise YoloPruneError(f"unknown training setting(s) {', '.join(unknown)}; use Ultralytics' train settings "
                             "(ultralytics/cfg/default.yaml), e.g. lr0, optimizer, cache")
    if model.suffix != ".pt":
        raise YoloPruneError(f"{model}: fine-tuning needs a pruned .pt checkpoint (yoloprune prune writes one), "
                             "not a model yaml")
    task = guess_model_task(load_model(model))
    if task not in TRAINERS:
        raise YoloPruneError(f"{model}: a {task} model; yoloprune fine-tunes {', '.join(TRAINERS)} models")
    if task != "classify":  # classification data is a folder tree that Ultralytics checks itself
        from yoloprune.data import check_data_yaml

        check_data_yaml(data)

    args: dict[str, Any] = {"data": str(data), "device": device, "workers": workers}
    last = out_dir / "weights" / "last.pt"
    if resume:
        _check_resumable(last)
        args.update(model=str(last), resume=str(last))
    else:
        args.update(DEFAULTS, model=str(model), task=task, epochs=epochs, imgsz=imgsz, batch=batch,
                    project=str(out_dir.parent), name=out_dir.name, exist_ok=True)
    args.update(overrides)

    events = ul_callbacks.get_default_callbacks()
    for event, fns in (callbacks or {}).items():
        if event not in events:
            raise YoloPruneError(f"unknown callback event {event!r}; use one of {', '.join(sorted(events))}")
        events[event].extend(fns)

    with torch_threads_kept():  # the trainer changes the process-wide torch thread count
        trainer = TRAINERS[task](overrides=args, _callbacks=events)
        trainer.cpu_threads = threads
        trainer.regularizer = regularizer
        if not resume and RANK in {-1, 0}:
            fingerprint = _fingerprint(model, data, {"epochs": epochs, "imgsz": imgsz, "batch": batch, **overrides})
            write_json(fingerprint, Path(trainer.save_dir) / SOURCE)
        trainer.train()
    return _result(trainer)


SOURCE = "source.json"  # in a run folder: what the run started from, so a later call can tell it may resume it


def _fingerprint(model: Path, data: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Return what identifies a run: the starting weights (not the file's bytes, which hold a date), data, settings."""
    digest = hashlib.sha256()
    for name, tensor in load_model(model).state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {"weights_sha256": digest.hexdigest(), "data": str(Path(data).resolve()), **settings}


def can_resume(out_dir: str | Path, model: str | Path, data: str | Path, **settings: Any) -> bool:
    """Return True if ``out_dir`` holds an unfinished run of this very model, data and settings.

    For re-runs that should pick up where a killed run stopped (a DVC stage run again
    after an interruption): the run folder must have a resumable ``last.pt`` and have
    been started by ``finetune`` from a file with the same bytes, the same data yaml
    and the same ``settings`` (epochs, imgsz, batch, ...). Anything else starts over.
    The starting point is compared by its weights, so a checkpoint saved again (or a
    yaml model built again under the same seed) still matches.
    """
    out_dir = Path(out_dir)
    try:
        _check_resumable(out_dir / "weights" / "last.pt")
        recorded = json.loads((out_dir / SOURCE).read_text())
    except (YoloPruneError, OSError, ValueError):
        return False
    return recorded == json.loads(json.dumps(_fingerprint(Path(model), Path(data), settings)))


def _check_resumable(last: Path) -> None:
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


def _result(trainer) -> FinetuneResult:
    metrics = trainer.metrics if isinstance(trainer.metrics, dict) else None
    if metrics is None and trainer.best.exists():  # DDP: the launching process trained nothing itself
        metrics = torch_load(trainer.best, map_location="cpu").get("train_metrics") or {}
    return FinetuneResult(
        best=trainer.best,
        last=trainer.last,
        save_dir=Path(trainer.save_dir),
        metrics={k: float(v) for k, v in (metrics or {}).items() if k.startswith("metrics/")},
        rows=tuple(read_results(trainer.csv)) if trainer.csv.exists() else (),
    )
