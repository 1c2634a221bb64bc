"""Conversion: every block's output matches the original, for every generation and task."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import live_model, tensors
from torch import nn

from yoloprune.convert import CONVERTERS, convert_model, find_channel_splits
from yoloprune.errors import YoloPruneError

GENERATIONS = ("yolov8n", "yolo11n", "yolo26n")
TASKS = ("", "-seg", "-pose", "-obb", "-cls")
ALL_MODELS = [f"{g}{t}.yaml" for g in GENERATIONS for t in TASKS]
# YOLO12 and YOLOv10: detect runs in the default tier (tests/test_families.py, at 64 px); every task here.
NEW_FAMILIES = [pytest.param(f"yolo12n{t}.yaml", marks=pytest.mark.slow) for t in TASKS] + [
    pytest.param("yolov10n.yaml", marks=pytest.mark.slow)]


def layer_outputs(model: nn.Module, x: torch.Tensor) -> list[list[torch.Tensor]]:
    """Return the output tensors of every top-level layer of an Ultralytics model."""
    outs: list[list[torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append([t.detach() for t in tensors(o)]))
             for m in model.model]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return outs


@pytest.mark.parametrize("name", ALL_MODELS + NEW_FAMILIES)
def test_converted_model_matches_every_layer_in_float64(name):
    base = live_model(name).double().eval()
    converted = copy.deepcopy(base)
    assert convert_model(converted) > 0
    assert not any(type(m) in CONVERTERS for m in converted.modules())
    x = torch.rand(2, 3, 128, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref, got = layer_outputs(base, x), layer_outputs(converted, x)
    assert len(ref) == len(got) == len(base.model)
    for i, (a_list, b_list) in enumerate(zip(ref, got)):
        for a, b in zip(a_list, b_list, strict=True):
            assert a.shape == b.shape, f"layer {i}"
            scale = a.abs().max()
            if a.dtype.is_floating_point and a.numel() > 8:
                assert scale > 1e-3, f"layer {i} of {name} is dead: compare on live activations"
            err = (a - b).abs().max() / scale.clamp_min(1e-12)
            assert err < 1e-6, f"layer {i} ({type(base.model[i]).__name__}) differs: {err:.2e}"


@pytest.mark.parametrize("name", ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml"])
def test_unconverted_blocks_split_channels_and_converted_do_not(name):
    model = live_model(name)
    assert find_channel_splits(model) & {"C2f", "C3k2", "C2PSA"}
    convert_model(model)
    assert find_channel_splits(model) == set()


def test_conversion_is_idempotent():
    model = live_model("yolo11n.yaml")
    convert_model(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert convert_model(model) == 0
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


class ChunkyBlock(nn.Module):
    """A user block that splits channels, which no converter knows."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv = nn.Conv2d(c, 2 * c, 1)

    def forward(self, x):
        a, b = self.cv(x).chunk(2, 1)
        return a + b


def test_unknown_splitting_block_is_named_in_the_error():
    model = live_model("yolov8n.yaml")
    c = model.model[1].conv.out_channels
    block = ChunkyBlock(c)
    block.f, block.i, block.type, block.np = -1, 1, "ChunkyBlock", 0
    model.model[1] = nn.Sequential(model.model[1], block)
    for attr in ("f", "i", "type", "np"):
        setattr(model.model[1], attr, getattr(block, attr))
    with pytest.raises(YoloPruneError, match="ChunkyBlock"):
        convert_model(model)
