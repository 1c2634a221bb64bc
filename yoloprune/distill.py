"""Knowledge distillation from the unpruned model while fine-tuning the pruned one.

The teacher (the model before pruning) runs frozen in eval mode on each training batch;
the student's own loss gets a distillation term added, scaled as Ultralytics scales its
loss (a sum over the batch for the detection tasks, a batch mean for classification):

- ``output``: the detection outputs of the branch inference uses (YOLO26 and YOLOv10
  heads: the one-to-one branch, ``yoloprune.prune.deployed_branch``) at every anchor:
  temperature-softened class scores (binary KL per class, as the scores are sigmoids)
  and the box distributions (KL over the ``reg_max`` DFL bins; heads without DFL,
  ``reg_max == 1``, regress boxes directly and get an L1 term). Box terms are weighted
  by the teacher's class confidence at the anchor, since the box outputs of background
  anchors are never used. Classification distils its logits (softmax KL).
- ``cwd``: channel-wise distillation (Shu et al., ICCV 2021) on the neck outputs that
  feed the head: each channel's spatial map is a softmax with temperature ``tau``, and
  the student's follows the teacher's by KL, times ``tau**2``, averaged over channels.
  Where pruning narrowed a head input, a learnable 1x1 convolution (an *adapter*)
  widens the student's map to the teacher's. Adapters train with the model (the
  trainer adds them to its optimiser) but live beside it, never in it: the saved
  checkpoints and the ONNX export hold the student alone.

The ``Distiller`` is set as the student's criterion (``model.criterion``, which
Ultralytics' ``model.loss`` calls), wrapping the student's own one: nothing in
Ultralytics is patched. Its ``seconds`` add up the teacher's forward passes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from yoloprune.config import DistillConfig
from yoloprune.errors import YoloPruneError
from yoloprune.heads import deployed_branch, head_of

LOGGER = logging.getLogger("yoloprune")

# Ultralytics' classification loss is a batch mean; the detection tasks' losses are multiplied by the batch size.
BATCH_MEAN_TASKS = frozenset({"classify"})


def raw_preds(out: Any) -> Any:
    """Return the raw head output of a forward pass: training mode's as it is, eval mode's from its tuple's end.

    Detect-family heads return ``(decoded, raw dict)`` in eval mode (segmentation
    ``((decoded, proto), raw dict)``) and the raw dict in training; classification
    returns ``(probabilities, logits)`` in eval and the logits in training.
    """
    return out[-1] if isinstance(out, (tuple, list)) else out


def _branch(preds: dict, branch: str) -> dict:
    return preds if branch == "single" else preds[branch]


def binary_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Return KL(teacher || student) of independent sigmoid scores, elementwise, times temperature squared.

    Zero exactly where the logits are equal (each term is ``p * (log p - log q)`` with
    ``log p == log q``), unlike the BCE with soft targets, which is the teacher's entropy there.
    """
    s, t = student / temperature, teacher / temperature
    p = torch.sigmoid(t)
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl * temperature**2


def softmax_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, dim: int) -> torch.Tensor:
    """Return KL(teacher || student) of softmax distributions along ``dim`` (summed over it), times temperature squared."""
    log_q = F.log_softmax(student / temperature, dim=dim)
    log_p = F.log_softmax(teacher / temperature, dim=dim)
    return (log_p.exp() * (log_p - log_q)).sum(dim) * temperature**2


def detection_output_loss(student: dict, teacher: dict, branch: str, temperature: float) -> torch.Tensor:
    """Return the class-score and box-distribution distillation of one batch, per image (a mean over the batch).

    Class scores: binary KL summed over classes, averaged over anchors. Boxes: KL over
    the DFL bins (L1 of the regressed sides when ``reg_max == 1``), averaged over the four
    sides and over anchors weighted by the teacher's highest class probability.
    """
    s, t = _branch(student, branch), _branch(teacher, branch)
    s_cls, t_cls = s["scores"].float(), t["scores"].float()  # (B, nc, anchors)
    if s_cls.shape != t_cls.shape:
        raise YoloPruneError(f"the student's class scores have shape {tuple(s_cls.shape)}, the teacher's "
                             f"{tuple(t_cls.shape)}; distil outputs from a teacher with the student's classes "
                             "(or use distill method cwd)")
    cls = binary_kl(s_cls, t_cls, temperature).sum(1).mean()
    s_box, t_box = s["boxes"].float(), t["boxes"].float()  # (B, 4 * reg_max, anchors)
    b, _, a = s_box.shape
    reg_max = s_box.shape[1] // 4
    if reg_max > 1:
        per_anchor = softmax_kl(s_box.view(b, 4, reg_max, a), t_box.view(b, 4, reg_max, a), temperature, 2)
    else:
        per_anchor = (s_box - t_box).abs()
    confidence = t_cls.detach().sigmoid().amax(1)  # (B, anchors)
    box = (per_anchor.mean(1) * confidence).sum() / confidence.sum().clamp_min(1e-9)
    return cls + box


def logits_output_loss(student: torch.Tensor, teacher: torch.Tensor, branch: str, temperature: float) -> torch.Tensor:
    """Return the softmax KL of classification logits, averaged over the batch."""
    return softmax_kl(student.float(), teacher.float(), temperature, 1).mean()


# The output distillation of each task, by Ultralytics' task name.
OUTPUT_LOSSES: dict[str, Callable[[Any, Any, str, float], torch.Tensor]] = {
    "detect": detection_output_loss,
    "segment": detection_output_loss,
    "pose": detection_output_loss,
    "obb": detection_output_loss,
    "classify": logits_output_loss,
}


def cwd_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], adapters: nn.ModuleList | None,
             temperature: float) -> torch.Tensor:
    """Return channel-wise distillation summed over feature levels, each a mean over images and channels.

    Each channel's ``H x W`` map is a softmax at ``temperature``; the student's map (after
    its adapter, where there is one) follows the teacher's by KL, times temperature squared.
    """
    total = student[0].new_zeros(())
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if adapters is not None:
            s = adapters[i](s)
        b, c = t.shape[:2]
        total = total + softmax_kl(s.float().reshape(b, c, -1), t.float().reshape(b, c, -1), temperature, 2).mean()
    return total


def _feature_list(x: Any) -> list[torch.Tensor]:
    """Return a head's input as a list of feature maps (Detect takes a list; Classify a tensor or a list)."""
    return [x] if isinstance(x, torch.Tensor) else [f for f in x if isinstance(f, torch.Tensor) and f.dim() == 4]


class _HeadInputs:
    """A forward pre-hook keeping the feature maps a head receives (the last call's)."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.maps = _feature_list(args[0])


def freeze(model: nn.Module) -> nn.Module:
    """Return ``model`` in eval mode with no parameter requiring a gradient (in place)."""
    model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def head_widths(model: nn.Module, imgsz: int = 64) -> list[tuple[int, int, int]]:
    """Return (channels, height, width) of each feature map the head receives, from one eval pass at ``imgsz``."""
    hook = _HeadInputs()
    handle = head_of(model).register_forward_pre_hook(hook)
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, imgsz, imgsz, device=device))
    finally:
        handle.remove()
        model.train(was_training)
    return [tuple(m.shape[1:]) for m in hook.maps]


class Distiller:
    """The student's criterion during a distilled fine-tune: its own loss plus the distillation term.

    A plain object, not a module: set as ``model.criterion`` it stays out of the model's
    parameters and state dict, so neither it, the teacher nor the adapters are saved with
    the model. ``attach`` installs it on the student, ``detach`` takes it off again.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillConfig, task: str) -> None:
        if not cfg.terms:
            raise YoloPruneError("distill method none has nothing to distil; leave the teacher out instead")
        if task not in OUTPUT_LOSSES:
            raise YoloPruneError(f"cannot distil a {task} model; yoloprune distils {', '.join(OUTPUT_LOSSES)} models")
        device = next(student.parameters()).device
        self.teacher = freeze(teacher).to(device)
        self.cfg, self.task = cfg, task
        self.branch = deployed_branch(student)[0]
        self.base: Callable | None = None  # the student's own criterion, set by attach
        self.seconds = 0.0  # the teacher's forward passes, summed until reset
        self._student_inputs, self._teacher_inputs = _HeadInputs(), _HeadInputs()
        self._teacher_hook = head_of(self.teacher).register_forward_pre_hook(self._teacher_inputs)
        self._student_hook = None
        self.adapters: nn.ModuleList | None = None
        if task != "classify" and "output" in cfg.terms:
            s_nc, t_nc = getattr(head_of(student), "nc", None), getattr(head_of(self.teacher), "nc", None)
            if s_nc != t_nc:
                raise YoloPruneError(f"the teacher predicts {t_nc} classes, the student {s_nc}: output distillation "
                                     "needs the teacher trained on this data (or use distill method cwd)")
        if "cwd" in cfg.terms:
            self.adapters = self._build_adapters(student, device)

    def _build_adapters(self, student: nn.Module, device: torch.device) -> nn.ModuleList | None:
        """Return a 1x1 convolution for each head input narrower or wider than the teacher's, None if none differs."""
        s_widths, t_widths = head_widths(student), head_widths(self.teacher)
        if len(s_widths) != len(t_widths) or any(s[1:] != t[1:] for s, t in zip(s_widths, t_widths)):
            raise YoloPruneError(f"the student's head inputs {s_widths} do not match the teacher's {t_widths} in "
                                 "number or resolution; channel-wise distillation needs the unpruned model it came "
                                 "from as the teacher")
        if all(s[0] == t[0] for s, t in zip(s_widths, t_widths)):
            return None
        adapters = nn.ModuleList(nn.Conv2d(s[0], t[0], 1) if s[0] != t[0] else nn.Identity()
                                 for s, t in zip(s_widths, t_widths))
        LOGGER.info("distillation adapters (student -> teacher channels): %s",
                    ", ".join(f"{s[0]}->{t[0]}" for s, t in zip(s_widths, t_widths)))
        return adapters.to(device)

    def watch(self, student: nn.Module) -> None:
        """Keep the feature maps ``student``'s head receives on each forward pass (for ``term``)."""
        if self._student_hook is not None:
            self._student_hook.remove()
        self._student_hook = head_of(student).register_forward_pre_hook(self._student_inputs)

    def attach(self, student: nn.Module) -> None:
        """Become ``student``'s criterion, wrapping the one it has (or would build), and watch its head's inputs."""
        self.detach(student)
        self.base = student.criterion if getattr(student, "criterion", None) is not None else student.init_criterion()
        student.criterion = self
        self.watch(student)

    def detach(self, student: nn.Module) -> None:
        """Give ``student`` its own criterion back and stop watching its head."""
        if self._student_hook is not None:
            self._student_hook.remove()
            self._student_hook = None
        if getattr(student, "criterion", None) is self:
            student.criterion = self.base

    def update(self) -> None:
        """Pass Ultralytics' per-epoch criterion update on (YOLO26's end-to-end loss anneals its branch weights)."""
        if hasattr(self.base, "update"):
            self.base.update()

    def teacher_forward(self, img: torch.Tensor) -> Any:
        """Return the teacher's raw head output on ``img``, adding the time it took to ``seconds``."""
        if img.is_cuda:
            torch.cuda.synchronize(img.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = raw_preds(self.teacher(img))
        if img.is_cuda:
            torch.cuda.synchronize(img.device)
        self.seconds += time.perf_counter() - start
        return out

    def loss(self, student_preds: Any, teacher_preds: Any, student_maps: list[torch.Tensor],
             teacher_maps: list[torch.Tensor]) -> torch.Tensor:
        """Return the weighted distillation term per image (before the batch scaling) from both models' outputs."""
        total = torch.zeros((), device=teacher_maps[0].device if teacher_maps else None)
        if "output" in self.cfg.terms:
            total = total + OUTPUT_LOSSES[self.task](student_preds, teacher_preds, self.branch, self.cfg.temperature)
        if "cwd" in self.cfg.terms:
            total = total + cwd_loss(student_maps, teacher_maps, self.adapters, self.cfg.temperature)
        return self.cfg.weight * total

    def term(self, student_out: Any, img: torch.Tensor) -> torch.Tensor:
        """Return the weighted distillation term of the student's forward pass on ``img`` (the teacher runs now)."""
        return self.loss(raw_preds(student_out), self.teacher_forward(img), self._student_inputs.maps,
                         self._teacher_inputs.maps)

    def __call__(self, preds: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the student's loss with the distillation term appended, and its items with ``distill_loss``."""
        loss, items = self.base(preds, batch)
        img = batch["img"]
        term = self.term(preds, img)
        scaled = term * (1 if self.task in BATCH_MEAN_TASKS else img.shape[0])  # as Ultralytics scales its loss
        return torch.cat([loss.reshape(-1), scaled.reshape(1).to(loss.dtype)]), {**items, "distill_loss": term.detach()}
