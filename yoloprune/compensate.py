"""Linear compensation of removed channels: fold what a pruned channel carried into the channels that stay.

A convolution that loses input channels loses their contribution to its output. Where a
removed channel ``x_r`` is close to a linear function of the kept ones on real data,
``x_r ~ A x_k + b`` (fitted by ridge regression on the unpruned network's activations),
the consumer can keep most of that contribution: its kept weights become
``W_k + W_r A`` and the constant ``W_r b`` moves into its bias, or into the running mean
of the BatchNorm that follows it. The relation holds pixel by pixel, so the same
correction is exact for 1x1 convolutions and, away from zero-padded borders, for any
kernel. Only the unpruned network's input moments are needed: ``E[x x^T]`` and ``E[x]``
over every pixel of every dense convolution's input.

The pruned network is matched to the unpruned one by value (Torch-Pruning removes
channels by index and keeps the others' order and values), so this works on any network
Torch-Pruning pruned, without hooks into the pruning loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

RIDGE = 1e-2  # the regression's ridge, relative to the mean variance of the kept channels


@dataclass
class Moments:
    """Second moments of one convolution's input over pixels: ``gram = sum x x^T``, ``total = sum x``, ``n`` pixels."""

    gram: torch.Tensor
    total: torch.Tensor
    n: int = 0


def dense_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Return the convolutions whose output mixes every input channel (groups 1), by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels > 1}


@torch.no_grad()
def input_moments(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, Moments]:
    """Return each dense convolution's input moments over ``batches`` (images), the model in eval mode."""
    moments: dict[str, Moments] = {}
    hooks = []

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().double()
            x = x.transpose(0, 1).reshape(x.shape[1], -1)  # channels x pixels
            m = moments.setdefault(name, Moments(x.new_zeros(x.shape[0], x.shape[0]), x.new_zeros(x.shape[0])))
            m.gram += x @ x.T
            m.total += x.sum(1)
            m.n += x.shape[1]
        return record

    was_training = model.training
    model.eval()
    try:
        hooks = [conv.register_forward_pre_hook(hook(name)) for name, conv in dense_convs(model).items()]
        for x in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return moments


def _subsequence(old: torch.Tensor, new: torch.Tensor) -> list[int] | None:
    """Return the indices of ``old``'s rows that ``new``'s rows are, in order (``new`` a row subset of ``old``)."""
    kept, i = [], 0
    for row in new:
        while i < len(old) and not torch.equal(old[i], row):
            i += 1
        if i == len(old):
            return None
        kept.append(i)
        i += 1
    return kept


def _bn_after(model: nn.Module) -> dict[nn.Conv2d, nn.modules.batchnorm._BatchNorm]:
    """Return the BatchNorm that directly follows each convolution in Ultralytics' ``Conv`` blocks (``.conv, .bn``)."""
    return {m.conv: m.bn for m in model.modules()
            if isinstance(getattr(m, "conv", None), nn.Conv2d)
            and isinstance(getattr(m, "bn", None), nn.modules.batchnorm._BatchNorm)}


def _bn_rows(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    return torch.stack([bn.weight, bn.bias, bn.running_mean, bn.running_var], 1).detach()


def _kept_outputs(old: nn.Conv2d, new: nn.Conv2d, old_bn, new_bn) -> list[int] | None:
    if new.out_channels == old.out_channels:
        return list(range(old.out_channels))
    if old_bn is not None and new_bn is not None:
        return _subsequence(_bn_rows(old_bn), _bn_rows(new_bn))
    if old.bias is not None and new.bias is not None:
        return _subsequence(old.bias.detach()[:, None], new.bias.detach()[:, None])
    return None


@torch.no_grad()
def compensate(original: nn.Module, pruned: nn.Module, moments: dict[str, Moments], ridge: float = RIDGE) -> list[str]:
    """Fold each removed input channel of ``pruned``'s dense convolutions into the kept ones, in place.

    ``original`` is the network before pruning (unchanged) and ``moments`` its
    :func:`input_moments`. Returns the names of the convolutions changed. A convolution
    whose kept channels cannot be matched to the original (trained since, or without a
    BatchNorm or bias to tell its kept outputs by) is left as it is.
    """
    old_convs, old_bn, new_bn = dense_convs(original), _bn_after(original), _bn_after(pruned)
    changed = []
    for name, new in dense_convs(pruned).items():
        old, m = old_convs.get(name), moments.get(name)
        if old is None or m is None or new.in_channels >= old.in_channels:
            continue
        rows = _kept_outputs(old, new, old_bn.get(old), new_bn.get(new))
        if rows is None:
            continue
        w_old = old.weight.detach()[rows]  # (out kept, in, kh, kw)
        cols = _subsequence(w_old.transpose(0, 1), new.weight.detach().transpose(0, 1))
        if cols is None:
            continue
        removed = sorted(set(range(old.in_channels)) - set(cols))
        a, b = _fit(m, cols, removed, ridge)  # x_removed ~ a @ x_kept + b
        w_r = w_old[:, removed].double()  # (out, removed, kh, kw)
        new.weight += torch.einsum("orhw,rk->okhw", w_r, a).to(new.weight.dtype)
        shift = torch.einsum("orhw,r->o", w_r, b).to(new.weight.dtype)
        if new.bias is not None:
            new.bias += shift
        elif new in new_bn:
            new_bn[new].running_mean -= shift  # the conv's output is short of ``shift``: BatchNorm subtracts less
        changed.append(name)
    return changed


def _fit(m: Moments, kept: list[int], removed: list[int], ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge-regress the removed channels on the kept ones and a constant; return ``(a, b)``."""
    k = len(kept)
    gram, mean = m.gram / max(m.n, 1), m.total / max(m.n, 1)
    zz = torch.empty(k + 1, k + 1, dtype=gram.dtype)
    zz[:k, :k], zz[:k, k], zz[k, :k], zz[k, k] = gram[kept][:, kept], mean[kept], mean[kept], 1.0
    zr = torch.cat([gram[kept][:, removed], mean[removed][None]])  # (k + 1, removed)
    scale = ridge * float(gram.diagonal()[kept].mean().clamp_min(1e-12))
    reg = torch.full((k + 1,), scale, dtype=gram.dtype)
    reg[k] = 0.0  # the constant is not shrunk
    coef = torch.linalg.solve(zz + torch.diag(reg), zr)
    return coef[:k].T, coef[k]
