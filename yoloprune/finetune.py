"""Fine-tune a pruned model with Ultralytics' training engine, keeping its pruned architecture.

``finetune`` checks its arguments, builds the task's trainer (``yoloprune.train``),
records what the run started from so an interrupted run can be resumed exactly
(``yoloprune.resume``), optionally distils from the unpruned model
(``yoloprune.distill``), and returns where the fp32 ``best.pt`` is with its metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from ultralytics.utils import DEFAULT_CFG_DICT, RANK
from ultralytics.utils import callbacks as ul_callbacks
from ultralytics.utils.patches import torch_load

from yoloprune.config import DistillConfig
from yoloprune.curves import map_curve, read_results
from yoloprune.errors import YoloPruneError
from yoloprune.io import load_model, write_json
from yoloprune.resume import SOURCE, check_resumable, fingerprint, same_run, weights_digest
from yoloprune.threads import cpu_threads, torch_threads_kept
from yoloprune.train import TEACHER_SECONDS, TRAINERS

LOGGER = logging.getLogger("yoloprune")

DEFAULTS = {"plots": False, "workers": 0}  # plots fetch fonts and cost CPU time; workers: see finetune()
# Settings finetune() sets itself; "pretrained" would load another checkpoint's weights over the pruned ones.
RESERVED = {"model", "data", "resume", "project", "name", "exist_ok", "save_dir", "mode", "task", "pretrained"}
# Ultralytics' own distillation wraps the model in a DistillationModel that the pruned-model trainers do not expect.
OWN_DISTILLATION = {"distill_model", "dis"}


@dataclass(frozen=True)
class FinetuneResult:
    """Where a fine-tuning run wrote its checkpoints, and the validation metrics of best.pt."""

    best: Path  # fp32, the stage output
    last: Path  # Ultralytics' own (fp16); resumable only while the run is unfinished
    save_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)  # Ultralytics' names, e.g. "metrics/mAP50-95(B)"
    rows: tuple[dict[str, str], ...] = ()  # results.csv, one row per epoch (``read_results``): losses, metrics, lr
    distill: DistillConfig = field(default_factory=DistillConfig)  # how the run distilled (method none: it did not)

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
    def teacher_seconds(self) -> tuple[float, ...]:
        """Return the seconds of the teacher's forward passes in each epoch (empty without distillation)."""
        return map_curve(self.rows, TEACHER_SECONDS)

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
    teacher: str | Path | None = None,
    distill: DistillConfig | dict[str, Any] | None = None,
    from_scratch: bool = False,
    **overrides: Any,
) -> FinetuneResult:
    """Fine-tune the pruned checkpoint ``model`` on ``data``; return where best.pt (fp32) and last.pt are.

    ``out_dir`` is the run folder (Ultralytics' project/name), owned by the run: a new
    run replaces its checkpoints. ``resume=True`` continues the unfinished run in
    ``out_dir`` from ``weights/last.pt`` with that run's settings (Ultralytics lets
    only device, workers, batch, imgsz, cache and a few others change; pass the same
    ``teacher`` and ``distill`` again). ``workers=0`` loads batches in the training
    process, which is what Ultralytics does on CPU anyway. ``threads`` is torch's thread
    count on the CPU (None: every core; see ``cpu_threads``). ``callbacks`` adds functions
    to Ultralytics' trainer events (``{"on_fit_epoch_end": [fn]}``). ``regularizer`` is
    called on the unwrapped model after each backward pass and before the optimiser step
    (it may change the gradients, e.g. add a sparsity penalty's); it is not resumed
    state. ``teacher`` (the unpruned checkpoint) and ``distill`` (a ``DistillConfig`` or
    its dict) turn on distillation, on one device. ``overrides`` are other Ultralytics
    training settings (lr0, optimizer, cache, amp, plots, ...).
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
    own = sorted(set(overrides) & OWN_DISTILLATION)
    if own:
        raise YoloPruneError(f"Ultralytics' {', '.join(own)} setting is not supported on pruned models; distil "
                             "with teacher= and distill= (yoloprune finetune --teacher PATH --distill cwd)")
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
    distill, teacher = _check_distill(distill, teacher, task, device)
    if task != "classify":  # classification data is a folder tree that Ultralytics checks itself
        from yoloprune.data import check_data_yaml

        check_data_yaml(data)

    args: dict[str, Any] = {"data": str(data), "device": device, "workers": workers}
    last = out_dir / "weights" / "last.pt"
    if resume:
        check_resumable(last)
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
        trainer.from_scratch = from_scratch
        trainer.teacher, trainer.distill = teacher, distill
        if not resume and RANK in {-1, 0}:
            settings = {"epochs": epochs, "imgsz": imgsz, "batch": batch, **overrides, **_run_settings(teacher, distill)}
            write_json(fingerprint(model, data, settings), Path(trainer.save_dir) / SOURCE)
        trainer.train()
    return _result(trainer, distill)


def _check_distill(distill: DistillConfig | dict[str, Any] | None, teacher: str | Path | None, task: str,
                   device: str) -> tuple[DistillConfig, Path | None]:
    """Return the distillation config and teacher path a run uses (no teacher: no distillation)."""
    from ultralytics.nn.tasks import guess_model_task

    cfg = _distill_config(distill)
    if not cfg.terms:
        if teacher is not None:
            LOGGER.warning("teacher %s given with distill method none: fine-tuning without distillation", teacher)
        return cfg, None
    if teacher is None:
        raise YoloPruneError(f"distill method {cfg.method} needs a teacher: pass the unpruned checkpoint "
                             "(teacher=, --teacher PATH; models/baseline.pt in the pipeline)")
    teacher = Path(teacher)
    if teacher.suffix != ".pt" or not teacher.is_file():
        raise YoloPruneError(f"{teacher}: no such .pt checkpoint; the teacher is the unpruned model's checkpoint")
    teacher_task = guess_model_task(load_model(teacher))
    if teacher_task != task:
        raise YoloPruneError(f"{teacher}: a {teacher_task} model cannot teach a {task} model; pass the unpruned "
                             "checkpoint the pruned model came from")
    if "," in str(device):
        raise YoloPruneError(f"distillation trains on one device, not {device!r}; pick one (e.g. device=0)")
    return cfg, teacher


def _distill_config(distill: DistillConfig | dict[str, Any] | None) -> DistillConfig:
    return distill if isinstance(distill, DistillConfig) else DistillConfig.from_section(distill, where="distill")


def _run_settings(teacher: Path | None, distill: DistillConfig) -> dict[str, Any]:
    """Return the distillation's part of a run's fingerprint: nothing without it, so older run folders still match."""
    if teacher is None or not distill.terms:
        return {}
    return {"distill": asdict(distill), "teacher_sha256": weights_digest(teacher)}


def can_resume(out_dir: str | Path, model: str | Path, data: str | Path, teacher: str | Path | None = None,
               distill: DistillConfig | dict[str, Any] | None = None, **settings: Any) -> bool:
    """Return True if ``out_dir`` holds an unfinished run of this very model, data and settings.

    For re-runs that should pick up where a killed run stopped (a DVC stage run again
    after an interruption): the run folder must have a resumable ``last.pt`` and have
    been started by ``finetune`` from a file with the same weights, the same data yaml,
    the same ``settings`` (epochs, imgsz, batch, ...) and the same teacher and
    distillation. Anything else starts over. The starting point is compared by its
    weights, so a checkpoint saved again (or a yaml model built again under the same
    seed) still matches.
    """
    cfg = _distill_config(distill)
    teacher = Path(teacher) if teacher is not None and cfg.terms else None
    try:
        extra = _run_settings(teacher, cfg)
    except (YoloPruneError, OSError) as e:  # a teacher that cannot be read: no run of it to resume
        LOGGER.debug("teacher %s: %s", teacher, e)
        return False
    return same_run(out_dir, fingerprint(Path(model), Path(data), {**settings, **extra}))


def _result(trainer, distill: DistillConfig) -> FinetuneResult:
    metrics = trainer.metrics if isinstance(trainer.metrics, dict) else None
    if metrics is None and trainer.best.exists():  # DDP: the launching process trained nothing itself
        metrics = torch_load(trainer.best, map_location="cpu").get("train_metrics") or {}
    return FinetuneResult(
        best=trainer.best,
        last=trainer.last,
        save_dir=Path(trainer.save_dir),
        metrics={k: float(v) for k, v in (metrics or {}).items() if k.startswith("metrics/")},
        rows=tuple(read_results(trainer.csv)) if trainer.csv.exists() else (),
        distill=distill if trainer.teacher is not None else DistillConfig(),
    )
