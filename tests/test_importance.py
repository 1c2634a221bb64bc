"""Importance from the real loss: taylor's scores follow the data, not the random-image proxy."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from yoloprune.calibration import batches_loss, calibration_batches, real_loss
from yoloprune.errors import YoloPruneError
from yoloprune.importance import METHODS
from yoloprune.io import load_model
from yoloprune.prune import _proxy_loss, calibrate_bn, prepare, trace_forward
from yoloprune.sparsity import ignored_layers

IMGSZ = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from yoloprune.data import make_dataset

    return make_dataset(tmp_path_factory.mktemp("calib") / "ds", n_train=12, n_val=2, imgsz=IMGSZ, seed=0)


def model_of(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = prepare(load_model(name, nc=6))
    gen = torch.Generator().manual_seed(0)
    calibrate_bn(model, [torch.rand(4, 3, IMGSZ, IMGSZ, generator=gen)])  # live activations, as a trained net has
    return model


def taylor_scores(model: nn.Module, groups: list, loss_fn) -> torch.Tensor:
    """Return taylor's scores of ``groups`` after one backward pass of ``loss_fn``, concatenated."""
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    imp = METHODS["taylor"].build()
    return torch.cat([s for s in (imp(g) for g in groups) if s is not None])


@pytest.mark.slow  # 35 s on 2 shared cores: four backward passes and a dependency graph
def test_taylor_scores_follow_the_data_and_differ_from_the_proxy(data):
    model = model_of("yolov8n.yaml")
    graph = tp.DependencyGraph().build_dependency(model, torch.rand(1, 3, IMGSZ, IMGSZ), forward_fn=trace_forward)
    groups = list(graph.get_all_groups(ignored_layers(model), [nn.Conv2d]))
    a = taylor_scores(model, groups, real_loss(model, data, IMGSZ, n_batches=1, batch=4, seed=0))
    a_again = taylor_scores(model, groups, real_loss(model, data, IMGSZ, n_batches=1, batch=4, seed=0))
    b = taylor_scores(model, groups, real_loss(model, data, IMGSZ, n_batches=1, batch=4, seed=1))
    proxy = taylor_scores(model, groups, _proxy_loss(0))
    # same batches, same scores: what differs below is the data (NaN: a group whose channels all score 0, as TP says)
    torch.testing.assert_close(a, a_again, rtol=1e-4, atol=1e-6, equal_nan=True)
    keep = ~(a.isnan() | b.isnan() | proxy.isnan())
    assert keep.float().mean() > 0.9
    a, b, proxy = a[keep], b[keep], proxy[keep]
    for other in (b, proxy):
        assert a.shape == other.shape
        assert not torch.allclose(a, other, rtol=0.05, atol=0)
    rank = lambda s: s.argsort().argsort().float()
    # the proxy ranks channels unlike the loss does (Spearman well below 1); another batch set agrees more
    assert torch.corrcoef(torch.stack([rank(a), rank(proxy)]))[0, 1] < 0.9
    assert torch.corrcoef(torch.stack([rank(a), rank(b)]))[0, 1] > torch.corrcoef(torch.stack([rank(a),
                                                                                               rank(proxy)]))[0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolov8n.yaml", "yolo26n.yaml"])
def test_real_loss_accumulates_over_batches_and_leaves_the_model_as_it_was(data, name):
    model = model_of(name)
    batches = calibration_batches(model, data, IMGSZ, n_batches=2, batch=4, seed=0)
    assert [tuple(b["img"].shape) for b in batches] == [(4, 3, IMGSZ, IMGSZ)] * 2
    assert 0.0 <= float(batches[0]["img"].min()) and float(batches[0]["img"].max()) <= 1.0
    stats = [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.eval()

    def grads(loss_fn) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model)
        loss.backward()
        assert loss.ndim == 0 and torch.isfinite(loss) and float(loss.detach()) > 0
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    both = grads(batches_loss(batches))
    mean = (grads(batches_loss(batches[:1])) + grads(batches_loss(batches[1:]))) / 2
    torch.testing.assert_close(both, mean, rtol=1e-4, atol=1e-7)  # the mean of the batches' gradients
    assert not model.training and getattr(model, "criterion", None) is None  # nothing left behind to be saved
    after = [m.running_mean for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(x, y) for x, y in zip(stats, after))  # calibration changes no BatchNorm statistics


def test_calibration_rejects_data_of_another_class_count(data):
    model = load_model("yolov8n.yaml", nc=3)
    with pytest.raises(YoloPruneError, match="has 6 classes but the model predicts 3"):
        calibration_batches(model, data, IMGSZ, n_batches=1, batch=2)
