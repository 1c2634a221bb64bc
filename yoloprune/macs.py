"""Fast, exact multiply-accumulate counts for a model whose channel counts change.

Pruning changes channel counts, never spatial sizes. ``MacCounter`` records each
layer's output (or input) spatial size once, with one forward pass at the target
``imgsz``, and afterwards computes MACs from the current weight shapes alone: a
recount costs microseconds, so the pruning loop can check its target after every
pruned group instead of re-running the network.

Counted: convolutions, transposed convolutions, linear layers and the two attention
matrix products of ``AttentionV2`` and ``AAttnV2`` (YOLO12's area attention); not counted: element-wise ops, BN (folded at
export), pooling and upsampling, as in thop/Ultralytics' GFLOPs.
"""

from __future__ import annotations

import torch
from torch import nn

from yoloprune.heads import deployed_branch
from yoloprune.modules import AAttnV2, AttentionV2

ATTENTION = (AttentionV2, AAttnV2)  # blocks whose attention products are counted (their widths are kept whole)

__all__ = ["MacCounter", "count_params", "deployed_branch", "module_macs", "pruned_macs"]


def module_macs(m: nn.Module, size: int) -> int:
    """Return MACs of one layer given its recorded spatial size (output positions, or rows for Linear)."""
    if isinstance(m, ATTENTION):  # q^T k and v attn^T, each per head over N x N positions (per area for AAttnV2)
        return m.matmul_macs(size)
    return m.weight.numel() * size  # conv: out*in/g*kh*kw per output position; transposed: per input position


def pruned_macs(m: nn.Module, size: int, din: int, dout: int) -> int:
    """Return MACs of one conv or linear layer after it loses ``din`` input and ``dout`` output channels."""
    w = m.weight.shape
    kk = w[2] * w[3] if len(w) == 4 else 1
    if isinstance(m, nn.Linear):
        return (w[0] - dout) * (w[1] - din) * size
    groups = getattr(m, "groups", 1)
    if isinstance(m, nn.ConvTranspose2d):  # weight: in, out/groups, kh, kw
        return (w[0] - din) * ((w[1] * groups - dout) // groups) * kk * size
    if groups > 1 and groups == m.in_channels == m.out_channels:  # depthwise: one cut removes input and output
        return (w[0] - max(din, dout)) * kk * size
    return (w[0] - dout) * ((w[1] * groups - din) // groups) * kk * size


class MacCounter:
    """Count MACs of ``model`` at ``imgsz`` x ``imgsz``, optionally leaving some modules out."""

    TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, *ATTENTION)

    def __init__(self, model: nn.Module, imgsz: int, exclude: set[nn.Module] | None = None) -> None:
        exclude_ids = {id(m) for e in (exclude or ()) for m in e.modules()}
        self.sizes: dict[nn.Module, int] = {}
        handles = [
            m.register_forward_hook(self._record)
            for m in model.modules()
            if isinstance(m, self.TYPES) and id(m) not in exclude_ids
        ]
        was_training = model.training
        model.eval()
        p = next(model.parameters())
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, imgsz, imgsz, dtype=p.dtype, device=p.device))
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()

    def _record(self, m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(m, nn.ConvTranspose2d):
            size = inputs[0].shape[-2] * inputs[0].shape[-1]
        elif isinstance(m, nn.Linear):
            size = output.numel() // output.shape[-1]
        else:
            size = output.shape[-2] * output.shape[-1]
        self.sizes[m] = size

    def __call__(self) -> int:
        """Return the current MACs for one image."""
        return sum(module_macs(m, s) for m, s in self.sizes.items())

    def delta(self, changes: dict[nn.Module, tuple[int, int]]) -> int:
        """Return the change in MACs if the layers in ``changes`` lost (input, output) channels; nothing is pruned."""
        return sum(pruned_macs(m, self.sizes[m], din, dout) - module_macs(m, self.sizes[m])
                   for m, (din, dout) in changes.items() if m in self.sizes and not isinstance(m, ATTENTION))


def count_params(model: nn.Module) -> int:
    """Return the number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())
