"""Model families beyond v8/11/26: YOLO12's area attention, YOLOv10, and refusing what the pruner cannot trace."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from ultralytics.nn.modules.block import AAttn, Attention

from yoloprune.cli import main
from yoloprune.convert import CONVERTERS, check_prunable, convert_model
from yoloprune.errors import YoloPruneError
from yoloprune.io import load_model
from yoloprune.macs import MacCounter
from yoloprune.modules import AAttnV2, AttentionV2
from yoloprune.prune import PruneConfig, calibrate_bn, prepare, prune_model


@pytest.mark.parametrize(("h", "w", "area"), [(8, 8, 4), (6, 10, 4), (5, 7, 1), (4, 4, 2)])
def test_area_attention_converts_exactly_for_every_area_and_shape(h, w, area):
    torch.manual_seed(0)
    block = AAttn(dim=64, num_heads=2, area=area).double().eval()
    for bn in (m for m in block.modules() if isinstance(m, nn.BatchNorm2d)):  # non-trivial BN, so layouts matter
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    new = CONVERTERS[AAttn](copy.deepcopy(block))
    assert isinstance(new, AAttnV2)
    x = torch.randn(2, 64, h, w, dtype=torch.float64)
    with torch.no_grad():
        ref, got = block(x), new(x)
    assert ref.abs().max() > 1e-3
    assert (ref - got).abs().max() / ref.abs().max() < 1e-12


@pytest.mark.parametrize("block", [AAttn(64, num_heads=2, area=4), AAttn(64, num_heads=2, area=1),
                                   Attention(64, num_heads=2, attn_ratio=0.5)])
def test_attention_products_macs_match_torch_flop_counter(block):
    converted = CONVERTERS[type(block)](block).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        converted(torch.rand(1, 64, 8, 6))
    products = sum(v for k, v in counter.get_flop_counts()["Global"].items() if "bmm" in str(k) or "matmul" in str(k))
    assert converted.matmul_macs(8 * 6) * 2 == products  # a MAC is two flops


class TokenAttention(nn.Module):
    """A user's self-attention over pixels with a fused qkv: heads are a reshape of the channel axis."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.qkv = nn.Conv2d(c, 3 * c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).flatten(2).transpose(1, 2).chunk(3, -1)
        return x + (torch.softmax(q @ k.transpose(1, 2), -1) @ v).transpose(1, 2).reshape(b, c, h, w)


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle: a reshape that moves the channel axis, with no attention at all."""

    def forward(self, x):
        b, c, h, w = x.shape
        return x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


def _insert_after(model: nn.Module, i: int, block: nn.Module) -> nn.Module:
    wrapped = nn.Sequential(model.model[i], block)
    for attr in ("f", "i", "type", "np"):
        setattr(wrapped, attr, getattr(model.model[i], attr))
    model.model[i] = wrapped
    return model


@pytest.mark.parametrize(("block", "words"), [(TokenAttention, "computes attention"),
                                              (ChannelShuffle, "reshapes channels")])
def test_untraceable_block_is_refused_before_the_graph_is_built_naming_block_and_layer(block, words):
    model = load_model("yolov8n.yaml")
    c = model.model[4].cv2.conv.out_channels
    _insert_after(model, 4, block(c) if block is TokenAttention else block())
    with pytest.raises(YoloPruneError, match=rf"{block.__name__} in layer 4 \(Sequential\) {words}") as e:
        prepare(model)  # the pruner calls it before Torch-Pruning sees the model
    assert "\n" not in str(e.value) and "convert.py" in str(e.value)


def test_unconverted_area_attention_is_named():
    with pytest.raises(YoloPruneError, match=r"AAttn in layer 6 \(A2C2f\) computes attention"):
        check_prunable(load_model("yolo12n.yaml"))


@pytest.mark.parametrize("name", ["yolo12n.yaml", "yolov10n.yaml"])
def test_new_families_convert_to_the_same_outputs_in_float64(name):
    # Live BN statistics from two small batches (conftest's live_model calibrates at 128 px: 5x the CPU here).
    gen = torch.Generator().manual_seed(0)
    base = calibrate_bn(load_model(name), [torch.rand(2, 3, 64, 64, generator=gen) for _ in range(2)])
    base = base.double().eval()
    converted = copy.deepcopy(base)
    # yolov10n: 7 C2f, C2fCIB, PSA, Attention; yolo12n: 3 C3k2, 8 AAttn
    assert convert_model(converted) == (10 if name.startswith("yolov10") else 11)
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        ref, got = base(x)[0], converted(x)[0]
    assert ref.abs().max() > 1e-3
    assert (ref - got).abs().max() / ref.abs().max() < 1e-9
    check_prunable(converted)  # and nothing in it that the pruner cannot trace


def test_malformed_yaml_is_one_line_naming_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("a: [1\n")
    assert main(["prune", str(path), "--speed-up", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"yoloprune: error: {path}: not valid YAML") and "\n" not in err
    assert "line 1, column 4" in err and "http" not in err


@pytest.mark.slow
@pytest.mark.parametrize(("name", "speed_up"), [("yolo12n.yaml", 2.0), ("yolo12n.yaml", 3.0), ("yolov10n.yaml", 2.0)])
def test_new_families_prune_to_target_and_keep_attention_whole(name, speed_up):
    model = load_model(name)
    prepare(model)
    widths = {id(m): (m.q.conv.out_channels, m.k.conv.out_channels, m.v.conv.out_channels, m.pe.conv.out_channels)
              for m in model.modules() if isinstance(m, (AttentionV2, AAttnV2))}
    report = prune_model(model, PruneConfig(speed_up=speed_up, imgsz=160), progress=False)
    assert abs(report.speed_up / speed_up - 1) <= 0.02
    assert report.pruned_params < report.base_params
    for m in model.modules():
        if id(m) in widths:  # inner attention widths are kept whole: the head reshapes still fit
            assert (m.q.conv.out_channels, m.k.conv.out_channels, m.v.conv.out_channels,
                    m.pe.conv.out_channels) == widths[id(m)]
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 160, 160))
    assert torch.isfinite(out[0] if isinstance(out, (list, tuple)) else out).all()


def test_mac_counter_counts_area_attention_like_torch():
    """MacCounter's count of a converted yolo12n (convs + area-attention products) equals torch's FLOP counter / 2."""
    model = load_model("yolo12n.yaml")
    prepare(model)
    model.eval()
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        model(torch.zeros(1, 3, 160, 160))
    assert MacCounter(model, 160)() == flops.get_total_flops() // 2
