"""Linear compensation: removed channels folded into the kept ones reproduce the unpruned network's outputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from conftest import live_model, tensors
from torch import nn
from ultralytics.nn.modules import Conv

from yoloprune.compensate import compensate, input_moments
from yoloprune.errors import YoloPruneError
from yoloprune.prune import PruneConfig, prune_model


class Pair(nn.Module):
    """A producer without activation (its channels are linear in the input) feeding a 3x3 consumer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Conv(3, 4, 1, act=False)
        self.b = Conv(4, 5, 3, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def pair_with_a_redundant_channel() -> Pair:
    torch.manual_seed(0)
    net = Pair().eval()
    with torch.no_grad():
        w = net.a.conv.weight
        w[3] = 2 * w[0] + w[1]  # channel 3 = 2 x channel 0 + channel 1, exactly (BatchNorm at its identity)
        net.b.bn.running_mean.normal_()
        net.b.bn.running_var.uniform_(0.5, 2)
    return net


def prune_out_channels(net: Pair, idxs: list[int]) -> Pair:
    pruned = copy.deepcopy(net)
    dg = tp.DependencyGraph().build_dependency(pruned, example_inputs=torch.rand(1, 3, 16, 16))
    dg.get_pruning_group(pruned.a.conv, tp.prune_conv_out_channels, idxs=idxs).prune()
    return pruned


def test_a_channel_linear_in_the_kept_ones_is_folded_back_exactly():
    net = pair_with_a_redundant_channel()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    moments = input_moments(net, [x[:2]])
    pruned = prune_out_channels(net, [3])
    assert pruned.b.conv.in_channels == 3
    plain = copy.deepcopy(pruned)
    assert compensate(net, pruned, moments, ridge=1e-9) == ["b.conv"]
    with torch.no_grad():
        want, got, without = net(x), pruned(x), plain(x)
    assert (without - want).abs().max() > 0.1  # removing the channel alone changes the output
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # on images the fit did not see, borders included


def test_a_constant_offset_moves_into_the_batchnorm_that_follows():
    net = pair_with_a_redundant_channel()
    with torch.no_grad():
        net.a.conv.weight[3] = 0.0
        net.a.bn.bias[3] = 0.7  # channel 3 is the constant 0.7: nothing but an offset to carry
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    moments = input_moments(net, [x])
    pruned = prune_out_channels(net, [3])
    before = pruned.b.bn.running_mean.clone()
    compensate(net, pruned, moments, ridge=1e-9)
    assert not torch.equal(pruned.b.bn.running_mean, before)
    with torch.no_grad():  # exact inside; the zero-padded border saw no offset in the unpruned network either
        torch.testing.assert_close(pruned(x)[..., 1:-1, 1:-1], net(x)[..., 1:-1, 1:-1], atol=1e-4, rtol=1e-4)


def test_a_consumer_changed_after_pruning_is_left_alone():
    net = pair_with_a_redundant_channel()
    moments = input_moments(net, [torch.rand(2, 3, 8, 8)])
    pruned = prune_out_channels(net, [3])
    with torch.no_grad():
        pruned.b.conv.weight += 1e-3  # trained since: its channels no longer match the original's
    weight = pruned.b.conv.weight.clone()
    assert compensate(net, pruned, moments) == []
    assert torch.equal(pruned.b.conv.weight, weight)


def test_compensated_yolov8n_stays_closer_to_the_unpruned_outputs():
    gen = torch.Generator().manual_seed(3)
    calib = [torch.rand(4, 3, 64, 64, generator=gen) for _ in range(16)]  # 8 images over-fit the deep layers' fit
    held_out = torch.rand(2, 3, 64, 64, generator=gen)
    base = live_model("yolov8n.yaml")
    with torch.no_grad():
        want = tensors(copy.deepcopy(base).eval()(held_out))[0]

    def error(compensated: bool) -> tuple[float, int]:
        model = copy.deepcopy(base)
        cfg = PruneConfig(speed_up=2.0, imgsz=64, compensate=compensated)
        report = prune_model(model, cfg, progress=False, images=calib if compensated else None)
        with torch.no_grad():
            got = tensors(model.eval()(held_out))[0]
        return float((got - want).pow(2).mean() / want.pow(2).mean()), report.compensated

    (plain, none), (folded, n) = error(False), error(True)
    assert none == 0 and n > 10  # most consumers of pruned channels were compensated
    assert folded < 0.8 * plain, (plain, folded)  # measured 0.0067 against 0.0104 (a trained yolov8n: 0.08 -> 0.49
    # mAP50-95 before fine-tuning)


def test_compensation_without_images_is_a_one_line_error():
    with pytest.raises(YoloPruneError, match="compensate needs real training images"):
        prune_model(live_model("yolov8n.yaml"), PruneConfig(speed_up=2.0, imgsz=64, compensate=True), progress=False)
    with pytest.raises(YoloPruneError, match="compensate must be true or false"):
        PruneConfig(compensate="yes")
