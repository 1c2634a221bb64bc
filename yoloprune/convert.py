"""Swap pruning-unfriendly Ultralytics blocks for equivalent split-free ones.

A converter is a function ``(module) -> module`` registered for one module type with
``@register(Type)``. ``convert_model`` walks the model bottom-up and replaces every
registered module; everything else passes unchanged. Adding a block is one function.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from ultralytics.nn.modules import C2PSA, C2f, C3k2, Conv, Detect
from ultralytics.nn.modules.block import PSA, AAttn, Attention, C2fCIB

from yoloprune.errors import YoloPruneError
from yoloprune.modules import C2PSAV2, PSAV2, AAttnV2, AttentionV2, C2fV2, C3k2V2

# Blocks whose products and reshapes the pruner knows: it keeps attention internals whole and never prunes the
# outputs a detection head reshapes (boxes, DFL bins, masks, keypoints).
TRUSTED: tuple[type[nn.Module], ...] = (AttentionV2, AAttnV2, Detect)

Converter = Callable[[nn.Module], nn.Module]
CONVERTERS: dict[type[nn.Module], Converter] = {}


def register(*types: type[nn.Module]) -> Callable[[Converter], Converter]:
    """Register a converter for the exact module types given (subclasses need their own line)."""

    def wrap(fn: Converter) -> Converter:
        for t in types:
            CONVERTERS[t] = fn
        return fn

    return wrap


def slice_conv(conv: Conv, idx: torch.Tensor) -> Conv:
    """Return a copy of an Ultralytics ``Conv`` that keeps only the output channels ``idx``."""
    new = copy.deepcopy(conv)
    c = new.conv
    c.weight = nn.Parameter(conv.conv.weight.detach()[idx].clone())
    if c.bias is not None:
        c.bias = nn.Parameter(conv.conv.bias.detach()[idx].clone())
    c.out_channels = len(idx)
    bn = getattr(new, "bn", None)
    if bn is not None:
        bn.num_features = len(idx)
        bn.weight = nn.Parameter(conv.bn.weight.detach()[idx].clone())
        bn.bias = nn.Parameter(conv.bn.bias.detach()[idx].clone())
        bn.running_mean = conv.bn.running_mean[idx].clone()
        bn.running_var = conv.bn.running_var[idx].clone()
    return new


def _halves(conv: Conv, c: int) -> tuple[Conv, Conv]:
    return slice_conv(conv, torch.arange(0, c)), slice_conv(conv, torch.arange(c, 2 * c))


@register(C2f, C2fCIB)
def convert_c2f(m: C2f) -> C2fV2:
    """C2f (and YOLOv10's C2fCIB, whose CIB blocks split nothing): ``cv1(x).chunk(2)`` becomes two convolutions."""
    cv0, cv1 = _halves(m.cv1, m.c)
    return C2fV2(cv0, cv1, m.cv2, m.m)


@register(C3k2)
def convert_c3k2(m: C3k2) -> C3k2V2:
    """C3k2 (inner C3k, Bottleneck, or Bottleneck+PSABlock): same split as C2f; inner blocks convert on their own."""
    cv0, cv1 = _halves(m.cv1, m.c)
    return C3k2V2(cv0, cv1, m.cv2, m.m)


@register(C2PSA)
def convert_c2psa(m: C2PSA) -> C2PSAV2:
    """C2PSA: ``cv1(x).split((c, c))`` becomes a bypass and an attention-branch convolution."""
    cv1a, cv1b = _halves(m.cv1, m.c)
    return C2PSAV2(cv1a, cv1b, m.cv2, m.m)


@register(PSA)
def convert_psa(m: PSA) -> PSAV2:
    """PSA (YOLOv10): ``cv1(x).split((c, c))`` becomes a bypass and an attention-branch convolution."""
    cv1a, cv1b = _halves(m.cv1, m.c)
    return PSAV2(cv1a, cv1b, m.attn, m.ffn, m.cv2)


@register(Attention)
def convert_attention(m: Attention) -> AttentionV2:
    """Attention: the fused qkv convolution becomes q, k and v, keeping the per-head channel layout."""
    nh, kd, hd = m.num_heads, m.key_dim, m.head_dim
    per_head = 2 * kd + hd
    base = torch.arange(nh)[:, None] * per_head
    q_idx = (base + torch.arange(kd)).flatten()
    k_idx = (base + kd + torch.arange(kd)).flatten()
    v_idx = (base + 2 * kd + torch.arange(hd)).flatten()
    q, k, v = (slice_conv(m.qkv, i) for i in (q_idx, k_idx, v_idx))
    return AttentionV2(q, k, v, m.proj, m.pe, nh, kd, hd, m.scale)


@register(AAttn)
def convert_aattn(m: AAttn) -> AAttnV2:
    """AAttn (YOLO12's area attention): the fused qkv convolution becomes q, k and v, heads laid out as before."""
    nh, hd = m.num_heads, m.head_dim
    base = torch.arange(nh)[:, None] * 3 * hd
    q, k, v = (slice_conv(m.qkv, (base + j * hd + torch.arange(hd)).flatten()) for j in range(3))
    return AAttnV2(q, k, v, m.proj, m.pe, nh, hd, m.area)


def _replace_children(module: nn.Module) -> int:
    count = 0
    for name, child in module.named_children():
        count += _replace_children(child)
        fn = CONVERTERS.get(type(child))
        if fn is not None:
            new = fn(child)
            # Keep Ultralytics' per-layer bookkeeping (i, f, type, np) used by BaseModel._predict_once.
            for attr in ("i", "f", "type", "np"):
                if hasattr(child, attr):
                    setattr(new, attr, getattr(child, attr))
            setattr(module, name, new)
            count += 1
    return count


def convert_model(model: nn.Module) -> int:
    """Replace every registered block of ``model`` in place; return how many were replaced.

    Idempotent: a converted (or converted and pruned) model has no registered block
    left and converts to itself. Raises ``YoloPruneError`` naming any block that still
    splits channels afterwards, since pruning would corrupt it.
    """
    count = _replace_children(model)
    splitters = find_channel_splits(model)
    if splitters:
        raise YoloPruneError(
            f"module(s) {', '.join(sorted(splitters))} split channels with chunk/split and have no yoloprune "
            "converter; pruning would break them. Register a converter in yoloprune/convert.py "
            f"(known: {', '.join(sorted(t.__name__ for t in CONVERTERS))})."
        )
    return count


class _SplitSpy(TorchFunctionMode):
    """Record which module splits a 4-D tensor along its channel dimension."""

    SPLITS = frozenset({torch.split, torch.chunk, torch.tensor_split, torch.Tensor.split, torch.Tensor.chunk,
              torch.Tensor.tensor_split, torch.unbind, torch.Tensor.unbind})

    def __init__(self, stack: list[nn.Module]) -> None:
        super().__init__()
        self.stack = stack  # the modules whose forward is running, innermost last
        self.found: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SPLITS and args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4:
            dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
            if dim in (1, -3) and self.stack:
                self.found.add(type(self.stack[-1]).__name__)
        return func(*args, **kwargs)


@contextmanager
def _module_objects(model: nn.Module) -> Iterator[list[nn.Module]]:
    stack: list[nn.Module] = []
    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(lambda mod, _args: stack.append(mod)))
        handles.append(m.register_forward_hook(lambda *_: stack.pop() and None))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def find_channel_splits(model: nn.Module, imgsz: int = 64) -> set[str]:
    """Return the type names of modules whose forward splits a feature map's channels."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, imgsz, imgsz, dtype=next(model.parameters()).dtype)
    with torch.no_grad(), _module_objects(model) as stack, _SplitSpy(stack) as spy:
        model(x)
    model.train(was_training)
    return spy.found


# Products between activations (attention), and sampling at computed positions (deformable attention): Torch-Pruning's
# graph treats them as element-wise ops and couples whatever channels meet in them, or loops over the reshapes
# around them (measured: YOLO12's unconverted area attention grew to 12 GB in ten minutes).
ATTENTION_OPS = frozenset({
    torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.bmm, torch.Tensor.bmm,
    torch.baddbmm, torch.einsum, F.scaled_dot_product_attention, F.multi_head_attention_forward, F.grid_sample,
})
RESHAPES = frozenset({torch.reshape, torch.Tensor.reshape, torch.Tensor.view})


class _UnprunableSpy(TorchFunctionMode):
    """Record the first op that mixes activations of different channels in a way the pruner cannot follow."""

    def __init__(self, stack: list[nn.Module]) -> None:
        super().__init__()
        self.stack = stack
        self.found: tuple[list[nn.Module], str] | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.found is None and self.stack and not any(isinstance(m, TRUSTED) for m in self.stack):
            if func in ATTENTION_OPS:
                self.found = (list(self.stack), f"computes attention ({getattr(func, '__name__', func)})")
            elif func in RESHAPES and _splits_channels(args[0] if args else None, out):
                self.found = (list(self.stack), f"reshapes channels {tuple(args[0].shape)} -> {tuple(out.shape)}")
        return out


def _splits_channels(x: object, out: object) -> bool:
    """Return whether a reshape of a feature map (B, C, H, W) moves its channel axis (heads, groups, shuffles)."""
    return (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and x.ndim == 4 and out.ndim >= 2
            and out.shape[0] == x.shape[0] and out.shape[1] != x.shape[1])


def check_prunable(model: nn.Module, imgsz: int = 64) -> None:
    """Return if Torch-Pruning can trace ``model`` (converted); else raise ``YoloPruneError`` naming the block.

    One forward pass at ``imgsz`` watches every op: attention products and reshapes that
    move the channel axis, outside the attention blocks yoloprune converts and keeps whole,
    would make the dependency graph hang or corrupt the block, so the model is refused in
    seconds instead. Detection heads pass: their reshapes act on output layers, never pruned.
    """
    layers = getattr(model, "model", None)
    index = {id(m): i for i, m in enumerate(layers)} if isinstance(layers, nn.Sequential) else {}
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, imgsz, imgsz, dtype=next(model.parameters()).dtype)
    try:
        with torch.no_grad(), _module_objects(model) as stack, _UnprunableSpy(stack) as spy:
            model(x)
    finally:
        model.train(was_training)
    if spy.found is None:
        return
    stack, what = spy.found
    top = next((m for m in stack if id(m) in index), stack[-1])
    where = f"layer {index[id(top)]} ({type(top).__name__})" if id(top) in index else type(top).__name__
    block = type(stack[-1]).__name__
    inner = f"{block} in {where}" if stack[-1] is not top else where
    raise YoloPruneError(
        f"{inner} {what}, which no yoloprune converter covers: Torch-Pruning's graph would hang on it or prune it "
        f"wrong. Register a converter for {block} in yoloprune/convert.py, or use a model without it "
        f"(converted: {', '.join(sorted(t.__name__ for t in CONVERTERS))})"
    )
