"""Sparsity regularisers: the exact penalty gradients, and a few steps with them shrink the regularised groups."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

from yoloprune.errors import YoloPruneError
from yoloprune.io import load_model
from yoloprune.prune import attention_internals, prepare
from yoloprune.sparsity import (
    BNL1Regularizer,
    GroupNormRegularizer,
    SparsityConfig,
    _Slice,
    build_regularizer,
    channel_norms,
    dependency_groups,
    ignored_layers,
)

IMGSZ = 64
REG = 0.05


@pytest.fixture(scope="module")
def base() -> nn.Module:
    torch.manual_seed(0)  # BN statistics stay at their init: ones estimated on two tiny images blow training up
    return prepare(load_model("yolov8n.yaml", nc=2))


def train(model: nn.Module, regularizer=None, steps: int = 3) -> nn.Module:
    """Return ``model`` after ``steps`` SGD steps on a fixed loss (the outputs' mean; BN statistics frozen)."""
    x = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        out = out.values() if isinstance(out, dict) else out
        sum(t.float().mean() for t in out if torch.is_tensor(t)).backward()  # linear: bounded gradients
        if regularizer is not None:
            regularizer(model)
        opt.step()
    return model


def zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.zeros_like(p)


def test_group_norm_adds_the_group_lasso_gradient_and_spares_output_layers(base):
    model = copy.deepcopy(base)
    zero_grads(model)
    reg = GroupNormRegularizer(REG)
    reg(model)
    groups = reg.groups(model)
    assert len(groups) > 40  # yolov8n: every conv group but the outputs'
    # the penalty P = reg * sum over groups and channels of ||c|| is 1-homogeneous, so <grad P, w> = P (Euler); a
    # weight sits in two groups (its output channel's and its input channel's), and each adds its share
    penalty = REG * sum(float(channel_norms(slices).sum()) for slices in groups)
    inner = sum(float((p.grad * p.detach()).sum()) for p in model.parameters())
    assert inner == pytest.approx(penalty, rel=1e-4)
    # output layers keep their output channels: never regularised (their input columns are: pruning removes them too)
    biases = [m.bias for m in ignored_layers(model) if getattr(m, "bias", None) is not None]
    assert len(biases) >= 6 and all(float(b.grad.abs().max()) == 0 for b in biases)


def test_bn_l1_adds_the_sign_of_every_prunable_gamma(base):
    model = copy.deepcopy(base)
    zero_grads(model)
    BNL1Regularizer(REG)(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    torch.testing.assert_close(torch.cat([m.weight.grad for m in bns]),
                               REG * torch.cat([m.weight.detach().sign() for m in bns]))
    assert all(float(p.grad.abs().max()) == 0 for p in model.parameters() if p.dim() > 1)  # only BN scales


@pytest.mark.slow  # 70 s on 2 shared cores: three short trainings and a dependency graph
def test_a_few_steps_with_the_regulariser_shrink_the_regularised_groups(base):
    plain = train(copy.deepcopy(base))
    reg = GroupNormRegularizer(20 * REG)
    sparse = train(copy.deepcopy(base), reg)
    params = dict(plain.named_parameters())
    name = {id(p): n for n, p in sparse.named_parameters()}
    ratios = []
    for slices in reg.groups(sparse):
        twin = [_Slice(params[name[id(s.param)]], s.dim, s.idxs, s.roots) for s in slices]
        ratios.append(channel_norms(slices) / channel_norms(twin))
    ratios = torch.cat(ratios)
    # the penalty moves every channel towards zero by lr * reg a step (plus what the changed weights do to the loss)
    assert not ratios.isnan().any()
    assert float((ratios < 1).float().mean()) > 0.99 and float(ratios.median()) < 1 - 1e-3
    slim = train(copy.deepcopy(base), BNL1Regularizer(20 * REG))
    gammas = [torch.cat([b.weight.detach().abs() for b in m.modules() if isinstance(b, nn.BatchNorm2d)])
              for m in (plain, slim)]
    # each |gamma| loses lr * reg per step: 3 steps * 1e-3 * 1.0
    torch.testing.assert_close((gammas[0] - gammas[1]).mean(), torch.tensor(3e-3), rtol=0.05, atol=0)


def test_sparsity_config_and_registry_reject_what_they_do_not_know():
    assert isinstance(build_regularizer("bn_l1", 1e-4), BNL1Regularizer)
    with pytest.raises(YoloPruneError, match="choose one of group_norm, bn_l1"):
        SparsityConfig(epochs=1, kind="l1")
    with pytest.raises(YoloPruneError, match="sparsity.epochs must be an integer >= 0"):
        SparsityConfig(epochs=-1)
    with pytest.raises(YoloPruneError, match="sparsity.reg must be a number >= 0"):
        SparsityConfig(reg="5e-4")


@pytest.mark.parametrize("name", ["yolo11n.yaml", "yolo26n.yaml"])
def test_groups_of_attention_models_leave_the_attention_whole_and_trace_in_seconds(name):
    # ignored blocks count with what is inside them, as the pruner counts them: rooted at the Conv2d inside
    # attention's q/k/v, Torch-Pruning's graph took over five minutes on yolo26n (under a second now)
    model = prepare(load_model(name, nc=2))
    inside = {id(p) for m in ignored_layers(model) for p in m.parameters(recurse=False)}
    attention = [c.conv.weight for c in attention_internals(model)]
    assert attention and all(id(w) in inside for w in attention)
    t0 = time.perf_counter()
    groups = dependency_groups(model, IMGSZ)
    assert time.perf_counter() - t0 < 60 and groups
    # their output channels are never regularised (their inputs are: the layer before them is pruned)
    assert not {id(s.param) for g in groups for s in g if s.dim == 0} & {id(w) for w in attention}
