"""Sparsity training before pruning: regularisers that push prunable channels towards zero.

A regulariser is a callable ``regularizer(model)`` run after each backward pass and
before the optimiser step (``yoloprune.finetune.finetune(..., regularizer=...)``); it
adds a penalty's gradient to the parameters' ``.grad``:

- ``group_norm``: group lasso over Torch-Pruning's dependency groups, the quantity
  ``GroupNormPruner`` ranks by. Every channel of a group is one variable spread over
  all the coupled layers (its conv rows, the BatchNorm entries, the next layers' input
  columns); the penalty ``reg * sum_c ||w_c||`` adds ``reg * w / ||w_c||`` to each
  coupled weight, so weak channels shrink as a whole and strong ones barely feel it.
  (Torch-Pruning 1.6's ``GroupNormPruner.regularize`` uses an L2 variant weighted
  ``alpha ** relative_weakness``; the group lasso is its scale-free classic form.)
- ``bn_l1``: L1 on BatchNorm scales (network slimming, Liu et al. 2017): adds
  ``reg * sign(gamma)``, so channels whose BN scale reaches zero carry nothing.

Output layers and attention internals are left alone, as the pruner leaves them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function

from yoloprune.config import Config
from yoloprune.errors import YoloPruneError

LOGGER = logging.getLogger("yoloprune")

OUT_FNS = (function.prune_conv_out_channels, function.prune_linear_out_channels,
           function.prune_batchnorm_out_channels)
IN_FNS = (function.prune_conv_in_channels, function.prune_linear_in_channels)


@dataclass(frozen=True)
class SparsityConfig(Config):
    """Validated sparsity-training settings (params.yaml ``sparsity``)."""

    SECTION = "sparsity"

    epochs: int = 0  # epochs of regularised training before pruning (0: skip the stage)
    reg: float = 5e-4  # penalty strength added to the gradients
    kind: str = "group_norm"  # see REGULARIZERS

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 0:
            raise YoloPruneError(f"sparsity.epochs must be an integer >= 0 (0 skips sparsity training), "
                                 f"got {self.epochs!r}")
        if isinstance(self.reg, bool) or not isinstance(self.reg, (int, float)) or self.reg < 0:
            raise YoloPruneError(f"sparsity.reg must be a number >= 0 (e.g. 5e-4), got {self.reg!r}")
        if self.kind not in REGULARIZERS:
            raise YoloPruneError(f"sparsity.kind '{self.kind}' is unknown: choose one of {', '.join(REGULARIZERS)}")


def ignored_layers(model: nn.Module) -> list[nn.Module]:
    """Return the layers the pruner never prunes (outputs, attention internals, DFL) with every module inside them,
    so nothing regularises them.

    Inside, as the pruner counts them: attention's q/k/v/pe are ``Conv`` blocks, and a group rooted at the
    ``nn.Conv2d`` within one sends Torch-Pruning's graph through the heads' reshapes for minutes (yolo26n: over
    five minutes, against under a second without them).
    """
    from yoloprune.prune import kept_whole

    return list({id(sub): sub for layer in kept_whole(model) for sub in layer.modules()}.values())


@dataclass
class _Slice:
    """One coupled tensor of a group: ``param``'s entries ``idxs`` along ``dim``, channel ``roots`` of the group."""

    param: nn.Parameter
    dim: int
    idxs: torch.Tensor
    roots: torch.Tensor

    def squares(self) -> torch.Tensor:
        """Return the squared norm of each selected entry along ``dim`` (one value per idx)."""
        w = self.param.detach().index_select(self.dim, self.idxs)
        return w.pow(2).transpose(0, self.dim).reshape(len(self.idxs), -1).sum(1)


def _slices(group) -> list[_Slice]:
    """Return the tensors a dependency group couples, each with the group channel of every index."""
    out: list[_Slice] = []
    for i in range(len(group)):
        item = group[i]
        layer, fn = item.dep.target.module, item.dep.handler
        roots = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
        index = torch.as_tensor(list(item.idxs), dtype=torch.long)
        if fn in OUT_FNS:
            params = [p for p in (getattr(layer, "weight", None), getattr(layer, "bias", None)) if p is not None]
            out += [_Slice(p, 0, index, roots) for p in params]
        elif fn in IN_FNS and getattr(layer, "groups", 1) == 1 and layer.weight is not None:
            # a grouped (depthwise) conv's input channels are its output channels: counted there already
            out.append(_Slice(layer.weight, 1, index, roots))
    return [s for s in out if isinstance(s.param, nn.Parameter) and s.param.dim() > s.dim]


def dependency_groups(model: nn.Module, imgsz: int = 64) -> list[list[_Slice]]:
    """Return the prunable dependency groups of ``model``, each as the tensor slices it couples.

    The same groups the pruner ranks: Torch-Pruning's graph over conv and linear roots,
    traced through inference and training passes, output layers and attention internals
    ignored.
    """
    from yoloprune.prune import trace_forward

    modes = [(m, m.training) for m in model.modules()]  # per module: a trainer may hold BatchNorms in eval mode
    example = torch.randn(1, 3, imgsz, imgsz, device=next(model.parameters()).device)
    try:
        with torch.enable_grad():  # the graph is traced through autograd
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, forward_fn=trace_forward)
    finally:
        for m, mode in modes:
            m.training = mode
    groups = graph.get_all_groups(ignored_layers=ignored_layers(model), root_module_types=[nn.Conv2d, nn.Linear])
    return [s for s in (_slices(g) for g in groups) if s]


def channel_norms(slices: list[_Slice]) -> torch.Tensor:
    """Return the L2 norm of each channel of one group, over every tensor the group couples."""
    n = int(max(int(s.roots.max()) for s in slices)) + 1
    total = torch.zeros(n, dtype=slices[0].param.dtype, device=slices[0].param.device)
    for s in slices:
        total.index_add_(0, s.roots.to(total.device), s.squares())
    return total.sqrt()


class GroupNormRegularizer:
    """Group lasso over the dependency groups: adds ``reg * w / ||channel||`` to every coupled gradient.

    The groups are traced on the first call from the model it is given (the trainer
    loads its own copy), and again if a different model comes.
    """

    def __init__(self, reg: float, eps: float = 1e-8) -> None:
        self.reg, self.eps = float(reg), eps
        self._groups: list[list[_Slice]] = []
        self._model: int | None = None

    def groups(self, model: nn.Module) -> list[list[_Slice]]:
        """Return the dependency groups of ``model`` (traced once per model)."""
        if self._model != id(model):
            self._groups, self._model = dependency_groups(model), id(model)
        return self._groups

    def __call__(self, model: nn.Module) -> None:
        """Add the group-lasso gradient to ``model``'s parameter gradients."""
        with torch.no_grad():
            self._add(self.groups(model))

    def _add(self, groups: list[list[_Slice]]) -> None:
        for slices in groups:
            norms = channel_norms(slices).clamp_min(self.eps)
            for s in slices:
                if s.param.grad is None:
                    continue
                shape = [1] * s.param.dim()
                shape[s.dim] = -1
                scale = (self.reg / norms[s.roots.to(norms.device)]).view(shape)
                w = s.param.detach().index_select(s.dim, s.idxs.to(s.param.device))
                s.param.grad.index_add_(s.dim, s.idxs.to(s.param.device), w * scale)


class BNL1Regularizer:
    """L1 on BatchNorm scales (network slimming): adds ``reg * sign(gamma)`` to every prunable BN's gradient."""

    def __init__(self, reg: float) -> None:
        self.reg = float(reg)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        """Add the L1 subgradient to the BatchNorm weights' gradients (output layers' BNs excluded)."""
        skip = {id(m) for layer in ignored_layers(model) for m in layer.modules()}
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in skip and m.weight is not None \
                    and m.weight.grad is not None:
                m.weight.grad.add_(self.reg * torch.sign(m.weight.detach()))


# kind -> regulariser class taking the penalty strength
REGULARIZERS: dict[str, Callable[[float], Callable[[nn.Module], None]]] = {
    "group_norm": GroupNormRegularizer,
    "bn_l1": BNL1Regularizer,
}


def build_regularizer(kind: str, reg: float) -> Callable[[nn.Module], None]:
    """Return the regulariser ``kind`` with strength ``reg``, or raise naming the known kinds."""
    if kind not in REGULARIZERS:
        raise YoloPruneError(f"unknown sparsity kind '{kind}': choose one of {', '.join(REGULARIZERS)}")
    return REGULARIZERS[kind](reg)


def sparsity_train(model: str | Path, data: str | Path, cfg: SparsityConfig, out_dir: str | Path, **settings: Any):
    """Return the ``FinetuneResult`` of ``cfg.epochs`` epochs of training ``model`` with the ``cfg.kind`` penalty.

    ``settings`` are ``finetune``'s other arguments (imgsz, batch, workers, threads,
    device and Ultralytics overrides such as lr0).
    """
    from yoloprune.finetune import finetune

    if cfg.epochs < 1:
        raise YoloPruneError("sparsity_train needs sparsity.epochs >= 1; with 0 the stage copies the model as it is")
    return finetune(model, data, epochs=cfg.epochs, out_dir=out_dir,
                    regularizer=build_regularizer(cfg.kind, cfg.reg), **settings)
