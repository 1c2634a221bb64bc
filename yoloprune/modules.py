"""Pruning-friendly replacements for Ultralytics blocks.

Ultralytics' C2f, C3k2, C2PSA, PSA, Attention and AAttn split one convolution's output into
channel slices (``chunk``/``split``/``view``). A dependency graph cannot prune such
slices independently, so each block here computes every slice with its own
convolution. Weights are copied exactly (see ``yoloprune.convert``), so a converted
model computes the same function as the original.

The classes live in an importable module of the package because pickled
checkpoints refer to them by module path: ``YOLO("pruned.pt")`` imports this file.
"""

from __future__ import annotations

import torch
from torch import nn
from ultralytics.nn.modules import Conv

__all__ = ["C2PSAV2", "PSAV2", "AAttnV2", "AttentionV2", "C2fV2", "C3k2V2"]


class C2fV2(nn.Module):
    """C2f with its ``cv1`` split into two convolutions (``cv0`` and ``cv1``) instead of ``chunk(2)``."""

    def __init__(self, cv0: Conv, cv1: Conv, cv2: Conv, m: nn.ModuleList) -> None:
        super().__init__()
        self.cv0 = cv0  # first half of the original cv1: goes straight to the concat
        self.cv1 = cv1  # second half: feeds the bottleneck chain
        self.cv2 = cv2
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``cv2(cat(cv0(x), cv1(x), m1(.), m2(.), ...))``."""
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C3k2V2(C2fV2):
    """C3k2 (inner C3k, Bottleneck or Bottleneck+PSABlock) in the split-free C2fV2 form."""


class C2PSAV2(nn.Module):
    """C2PSA with its ``cv1`` split into ``cv1a`` (bypass) and ``cv1b`` (attention branch)."""

    def __init__(self, cv1a: Conv, cv1b: Conv, cv2: Conv, m: nn.Sequential) -> None:
        super().__init__()
        self.cv1a = cv1a
        self.cv1b = cv1b
        self.cv2 = cv2
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``cv2(cat(cv1a(x), m(cv1b(x))))``."""
        return self.cv2(torch.cat((self.cv1a(x), self.m(self.cv1b(x))), 1))


class AttentionV2(nn.Module):
    """Ultralytics' multi-head Attention with separate q, k and v convolutions.

    The original computes ``qkv`` with one convolution whose channels are laid out per
    head as ``[q (key_dim), k (key_dim), v (head_dim)]`` and splits them after a view.
    Here ``q``, ``k`` and ``v`` are three convolutions holding exactly those channels.

    The block's input and output width (the residual stream of its PSABlock) is
    prunable through q/k/v's input and proj's output. Its inner widths (heads,
    key_dim, head_dim) are kept whole: Torch-Pruning's head pruning assumes a Linear
    qkv laid out 3 x heads x dim with equal q/k/v widths, which this layout
    (key_dim = head_dim / 2, per-head interleaving) is not, and the attention maps are
    a small share of the MACs at the resolution where PSA runs (stride 32).
    """

    def __init__(
        self, q: Conv, k: Conv, v: Conv, proj: Conv, pe: Conv, num_heads: int, key_dim: int, head_dim: int, scale: float
    ) -> None:
        super().__init__()
        self.q, self.k, self.v, self.proj, self.pe = q, k, v, proj, pe
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.head_dim = head_dim
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``proj(attention(x) + pe(v))`` with the original head layout."""
        B, _, H, W = x.shape
        N = H * W
        q = self.q(x).view(B, self.num_heads, self.key_dim, N)
        k = self.k(x).view(B, self.num_heads, self.key_dim, N)
        v = self.v(x).view(B, self.num_heads, self.head_dim, N)
        attn = ((q * self.scale).transpose(-2, -1) @ k).softmax(dim=-1)
        inner = self.num_heads * self.head_dim
        out = (v @ attn.transpose(-2, -1)).view(B, inner, H, W) + self.pe(v.reshape(B, inner, H, W))
        return self.proj(out)

    def matmul_macs(self, positions: int) -> int:
        """Return the MACs of the two attention products (q^T k, v attn^T) at ``positions`` = H*W pixels."""
        return self.num_heads * positions * positions * (self.key_dim + self.head_dim)


class PSAV2(nn.Module):
    """YOLOv10's PSA with its ``cv1`` split into ``cv1a`` (bypass) and ``cv1b`` (attention branch)."""

    def __init__(self, cv1a: Conv, cv1b: Conv, attn: nn.Module, ffn: nn.Sequential, cv2: Conv) -> None:
        super().__init__()
        self.cv1a = cv1a
        self.cv1b = cv1b
        self.attn = attn
        self.ffn = ffn
        self.cv2 = cv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``cv2(cat(cv1a(x), b))`` with ``b = cv1b(x)`` through residual attention and feed-forward."""
        b = self.cv1b(x)
        b = b + self.attn(b)
        b = b + self.ffn(b)
        return self.cv2(torch.cat((self.cv1a(x), b), 1))


class AAttnV2(nn.Module):
    """YOLO12's area attention with separate q, k and v convolutions.

    The original ``qkv`` convolution lays its channels out per head as ``[q, k, v]``
    (``head_dim`` each) and splits them after flattening, transposing and reshaping the
    feature map into ``area`` groups of consecutive pixels, which Torch-Pruning's graph
    cannot follow (it ran for minutes growing to gigabytes). Here q, k and v are three
    convolutions, and the area split reshapes only the spatial dimensions. As in
    ``AttentionV2``, the block's input and output width is prunable and its inner
    widths (heads x head_dim) are kept whole.
    """

    def __init__(self, q: Conv, k: Conv, v: Conv, proj: Conv, pe: Conv, num_heads: int, head_dim: int,
                 area: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.proj, self.pe = q, k, v, proj, pe
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.area = area

    def _areas(self, t: torch.Tensor) -> torch.Tensor:
        """Return ``(B*area, heads, head_dim, N/area)`` from ``(B, C, H, W)``: areas are runs of consecutive pixels."""
        B, C, H, W = t.shape
        a = max(self.area, 1)
        t = t.reshape(B, C, a, H * W // a).transpose(1, 2)
        return t.reshape(B * a, self.num_heads, self.head_dim, H * W // a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``proj(area_attention(x) + pe(v(x)))`` with the original head and area layout."""
        B, _, H, W = x.shape
        v = self.v(x)
        q, k, vh = self._areas(self.q(x)), self._areas(self.k(x)), self._areas(v)
        attn = ((q * (self.head_dim**-0.5)).transpose(-2, -1) @ k).softmax(dim=-1)
        out = vh @ attn.transpose(-2, -1)  # (B*area, heads, head_dim, N/area)
        C = self.num_heads * self.head_dim
        out = out.reshape(B, -1, C, out.shape[-1]).transpose(1, 2).reshape(B, C, H, W)
        return self.proj(out + self.pe(v))

    def matmul_macs(self, positions: int) -> int:
        """Return the MACs of the two attention products at ``positions`` = H*W pixels (per area: N/area squared)."""
        return self.num_heads * self.head_dim * 2 * positions * positions // max(self.area, 1)
