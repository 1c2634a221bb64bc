"""The trainer seam: Ultralytics' task trainers, training a pruned checkpoint as it is.

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
- gives Ultralytics a local font, since it fetches Arial over the network when the
  font is missing (``check_font``);
- writes ``best.pt`` with fp32 weights (Ultralytics saves fp16, which would round the
  weights the next stage starts from) and ``last.pt``/``best.pt`` atomically, and
  resumes exactly (``yoloprune.resume``);
- calls an optional ``regularizer`` on the model between backward and the optimiser
  step, and distils from an optional teacher (``yoloprune.distill``).

The caller sets ``cpu_threads``, ``regularizer``, ``teacher`` and ``distill`` on the
trainer before ``train()``; they are not Ultralytics settings, so a DDP worker (built
from the settings alone) does not get them.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import RandomSampler
from ultralytics.models.yolo.classify import ClassificationTrainer
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.obb import OBBTrainer
from ultralytics.models.yolo.pose import PoseTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer
from ultralytics.utils import DEFAULT_CFG, RANK, USER_CONFIG_DIR
from ultralytics.utils.torch_utils import unwrap_model

from yoloprune.config import DistillConfig
from yoloprune.distill import Distiller
from yoloprune.errors import YoloPruneError
from yoloprune.io import atomic_path, load_model
from yoloprune.resume import BEST_FP32, RESUME_STATE, EpochShuffle, load_state, restore_fp32, save_state, seed_epoch
from yoloprune.threads import cpu_threads

LOGGER = logging.getLogger("yoloprune")
TEACHER_SECONDS = "teacher_s"  # results.csv column: seconds of the teacher's forward passes in the epoch


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
        # False: the weights are trained already (fine-tune, sparsity), so an end-to-end head's loss keeps its final
        # branch weights (see settle_e2e_loss); True: a run from initial weights anneals them as Ultralytics does
        self.from_scratch = False
        self.teacher: str | Path | None = None  # the unpruned checkpoint to distil from; set before train()
        self.distill = DistillConfig()  # how; method none: no distillation
        self.distiller: Distiller | None = None  # built with the optimiser (its adapters train)
        self.callbacks["on_train_epoch_start"].insert(0, seed_epoch)
        self.callbacks["on_train_epoch_start"].append(_reset_teacher_clock)
        if RANK in {-1, 0} and not self.resume:
            for name in (BEST_FP32, RESUME_STATE):  # a previous run's files must not become this run's
                (self.wdir / name).unlink(missing_ok=True)

    def _setup_train(self) -> None:
        """Set up as Ultralytics does, with torch on ``cpu_threads`` threads on the CPU, then attach the distiller.

        ``select_device("cpu")`` gives torch ``os.cpu_count() - 1`` threads: one of two
        cores. Measured here (2 cores, yolov8n, imgsz 160, batch 8): 15 s an epoch of 192
        images on one thread, 9.3 s on two. ``finetune`` restores the count afterwards.
        The distiller goes on after the EMA copy of the model is made (inside
        ``_setup_train``), so the EMA, and every checkpoint saved from it, never holds it.
        """
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(self.cpu_threads))
        super()._setup_train()  # builds the model's attributes and, on resume, Ultralytics' own criterion
        if not self.from_scratch:
            settle_e2e_loss(unwrap_model(self.model))
        if self.distiller is not None:
            self.distiller.attach(unwrap_model(self.model))

    def build_optimizer(self, model: nn.Module, *args, **kwargs) -> torch.optim.Optimizer:
        """Build Ultralytics' optimiser; with distillation, build the distiller and train its adapters with the weights.

        The adapters join as one more parameter group with the weights' settings (decay
        included), before the scheduler is built over the groups and before a resume loads
        the optimiser's state, so a resumed run's optimiser has the same groups.
        """
        optimizer = super().build_optimizer(model, *args, **kwargs)
        if self.teacher is None or not self.distill.terms:
            return optimizer
        self.distiller = Distiller(unwrap_model(model), load_model(self.teacher), self.distill, self.args.task)
        if self.distiller.adapters is not None:
            weights = next(g for g in optimizer.param_groups if g.get("param_group") == "weight")
            optimizer.add_param_group({**{k: v for k, v in weights.items() if k != "params"},
                                       "params": list(self.distiller.adapters.parameters())})
        LOGGER.info("distilling from %s (%s, weight %g, temperature %g)", self.teacher, self.distill.method,
                    self.distill.weight, self.distill.temperature)
        return optimizer

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

    def save_metrics(self, metrics: dict) -> None:
        """Write the epoch's row of results.csv as Ultralytics does, with the teacher's seconds when distilling."""
        if self.distiller is not None:
            metrics = {**metrics, TEACHER_SECONDS: self.distiller.seconds}
        super().save_metrics(metrics)

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
        if saved:
            save_state(self, writes_best)
        return saved

    def resume_training(self, ckpt: dict | None) -> None:
        """Resume as Ultralytics does, then put back the fp32 model, EMA and optimiser its fp16 ``last.pt`` lacks."""
        super().resume_training(ckpt)
        if ckpt is not None and self.resume:
            load_state(self, ckpt)

    def final_eval(self) -> None:
        """Take the distiller off, validate best.pt as Ultralytics does, then replace its fp16 model with the fp32 one."""
        if self.distiller is not None:
            self.distiller.detach(unwrap_model(self.model))
        super().final_eval()
        if RANK in {-1, 0}:
            (self.wdir / RESUME_STATE).unlink(missing_ok=True)  # a finished run cannot be resumed
            if self.best.exists():
                restore_fp32(self.best, self.wdir / BEST_FP32)


def settle_e2e_loss(model: nn.Module) -> None:
    """Give an end-to-end head's loss (YOLO26, YOLOv10) its final branch weights from the first epoch on.

    Ultralytics' ``E2ELoss`` anneals the one-to-many branch's weight from 0.8 to 0.1 over a
    run, the one-to-one branch (the one inference uses) taking the rest. Rebuilt for a
    fine-tune it would start that schedule again: the deployed branch's weight falls from
    0.9 back to 0.2 and the trained head drifts (measured in the study: a yolo26n baseline
    lost mAP50-95 over 10 more epochs, 0.226 -> 0.197). A fine-tune continues where the
    baseline ended instead; the per-epoch ``update`` keeps the final weights.
    """
    if getattr(model, "criterion", None) is None and hasattr(model, "init_criterion"):
        model.criterion = model.init_criterion()
    criterion = getattr(model, "criterion", None)
    if hasattr(criterion, "decay") and hasattr(criterion, "update"):
        criterion.updates = 10**9 - 1  # past the end of any schedule: decay() is at its final value from here on
        criterion.update()


def _reset_teacher_clock(trainer) -> None:
    """Start the epoch's count of the teacher's forward seconds (an ``on_train_epoch_start`` callback)."""
    if getattr(trainer, "distiller", None) is not None:
        trainer.distiller.seconds = 0.0


def match_dataset(model: nn.Module, data: dict) -> nn.Module:
    """Give ``model``'s head the dataset's class count in place; the new class outputs start untrained.

    Every other layer keeps its pruned width and weights. As Ultralytics does when its
    model yaml's ``nc`` differs from the data's, the class convolutions are replaced,
    with Ultralytics' prior-probability bias.
    """
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
