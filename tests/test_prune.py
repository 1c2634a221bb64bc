"""Pruning: reaches the MACs target within 2 %, keeps every output shape, never touches output layers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch_pruning as tp
from conftest import live_model, tensors
from thop import profile
from torch import nn
from ultralytics.nn.modules import Detect

from yoloprune.convert import convert_model
from yoloprune.errors import YoloPruneError
from yoloprune.importance import METHODS
from yoloprune.io import load_model, save_model
from yoloprune.macs import MacCounter
from yoloprune.modules import AttentionV2
from yoloprune.prune import (
    PruneConfig,
    attention_internals,
    layers_table,
    output_layers,
    prepare,
    prune_model,
    trace_forward,
    width_changes,
)


def deployed(model: nn.Module) -> nn.Module:
    """Return a copy holding only what inference runs (Ultralytics' own head fuse drops the unused branch)."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if isinstance(m, Detect):
            m.fuse()
    return model


def thop_macs(model: nn.Module, imgsz: int) -> float:
    """Count MACs with thop, independently of yoloprune's counter."""
    macs, _ = profile(deployed(model), inputs=(torch.zeros(1, 3, imgsz, imgsz),), verbose=False)
    return macs


def output_shapes(model: nn.Module) -> list[tuple]:
    with torch.no_grad():
        return [tuple(t.shape) for t in trace_forward(model, torch.rand(1, 3, 128, 128))]


CASES = [
    ("yolov8n.yaml", 2.0), ("yolov8n.yaml", 3.0),
    # yolo11n and yolo26n at 2x: the default tier prunes them in test_export's parity checks and in
    # test_yolo26_counts_the_branch_inference_runs
    pytest.param("yolo11n.yaml", 2.0, marks=pytest.mark.slow), pytest.param("yolo11n.yaml", 3.0, marks=pytest.mark.slow),
    pytest.param("yolo26n.yaml", 2.0, marks=pytest.mark.slow), pytest.param("yolo26n.yaml", 3.0, marks=pytest.mark.slow),
    pytest.param("yolo11n-seg.yaml", 2.0, marks=pytest.mark.slow),
    pytest.param("yolo26n-pose.yaml", 2.0, marks=pytest.mark.slow),
    pytest.param("yolo26n-seg.yaml", 2.0, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "speed_up"), CASES)
def test_prune_reaches_target_and_keeps_outputs(name, speed_up):
    base = live_model(name)
    model = copy.deepcopy(base)
    report = prune_model(model, PruneConfig(speed_up=speed_up, imgsz=640), progress=False)

    assert report.speed_up == pytest.approx(speed_up, rel=0.02)
    assert report.pruned_macs < report.base_macs and report.pruned_params < report.base_params
    # An independent count (thop, on the branch inference runs) agrees with the report.
    # thop counts modules only, not the attention blocks' matrix products, which yoloprune counts; attention is not
    # pruned, so its share grows with the speed-up: 2 % apart for yolo26n at 3x. Hence 3 % for attention models.
    independent = thop_macs(base, 640) / thop_macs(model, 640)
    has_attention = any(isinstance(m, AttentionV2) for m in model.modules())
    assert independent == pytest.approx(report.speed_up, rel=0.03 if has_attention else 0.02)

    assert output_shapes(model) == output_shapes(base)
    converted = copy.deepcopy(base)
    convert_model(converted)
    for before, after in zip(output_layers(converted), output_layers(model), strict=True):
        assert before.weight.shape[0] == after.weight.shape[0]
    for attn in (m for m in model.modules() if isinstance(m, AttentionV2)):  # kept whole, by design
        assert attn.q.conv.out_channels == attn.num_heads * attn.key_dim
        assert attn.v.conv.out_channels == attn.num_heads * attn.head_dim
    model.train()
    loss_inputs = model(torch.rand(2, 3, 64, 64))  # training forward (all branches) still runs
    assert tensors(loss_inputs)


def test_yolo26_counts_the_branch_inference_runs():
    model = live_model("yolo26n.yaml")
    report = prune_model(model, PruneConfig(speed_up=1.5, imgsz=320, iterative_steps=10), progress=False)
    head = model.model[-1]
    assert report.counted_branch == ("one2one" if head.end2end else "one2many")
    # both branches were pruned consistently: the one-to-one head runs on the pruned features
    head.end2end = True
    with torch.no_grad():
        y = model.eval()(torch.rand(1, 3, 128, 128))
    assert tensors(y)[0].shape[-1] == 6


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_reaches_the_target(method):
    model = live_model("yolov8n.yaml")
    report = prune_model(model, PruneConfig(speed_up=1.5, method=method, imgsz=320), progress=False)
    assert report.method == method
    assert report.speed_up == pytest.approx(1.5, rel=0.02)


def test_methods_choose_different_channels():
    kept = {}
    for method in ("l1", "random"):
        model = live_model("yolov8n.yaml")
        prune_model(model, PruneConfig(speed_up=1.5, method=method, imgsz=320), progress=False)
        kept[method] = [m.weight.shape[0] for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert kept["l1"] != kept["random"]


def test_per_layer_pruning_shrinks_every_layer_including_the_stem():
    model = live_model("yolov8n.yaml")
    stem = model.model[0].conv.out_channels
    report = prune_model(model, PruneConfig(speed_up=2.0, global_pruning=False, imgsz=320), progress=False)
    assert report.speed_up == pytest.approx(2.0, rel=0.02)
    assert model.model[0].conv.out_channels < stem


@pytest.mark.slow
def test_frozen_half_checkpoint_is_still_pruned(tmp_path):
    """Official checkpoints load fp16 with requires_grad=False; pruning must still remove channels."""
    model = live_model("yolov8n.yaml").half()
    for p in model.parameters():
        p.requires_grad_(False)
    path = tmp_path / "frozen.pt"
    torch.save({"model": model, "optimizer": None, "train_args": {}}, path)
    loaded = load_model(path)
    report = prune_model(loaded, PruneConfig(speed_up=2.0, global_pruning=False, imgsz=320), progress=False)
    assert report.pruned_macs < report.base_macs / 1.9
    assert loaded.model[0].conv.out_channels < 16


@pytest.mark.slow
def test_pruned_model_prunes_again(tmp_path):
    model = live_model("yolov8n.yaml")
    prune_model(model, PruneConfig(speed_up=1.5, imgsz=320), progress=False)
    save_model(model, tmp_path / "p.pt")
    again = load_model(tmp_path / "p.pt")
    report = prune_model(again, PruneConfig(speed_up=1.5, imgsz=320), progress=False)
    assert report.speed_up == pytest.approx(1.5, rel=0.02)


@pytest.mark.slow
def test_unreachable_target_reports_best_reachable():
    model = live_model("yolov8n.yaml")
    with pytest.raises(YoloPruneError, match=r"not reachable.*best reachable is \d+\.\d+x"):
        prune_model(model, PruneConfig(speed_up=500.0, imgsz=320, max_layer_ratio=0.5), progress=False)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"speed_up": 1.0}, "speed_up must be a number > 1"),
        ({"speed_up": "fast"}, "speed_up must be a number > 1"),
        ({"method": "magic"}, "unknown method 'magic': choose one of lamp"),
        ({"iterative_steps": 0}, "iterative_steps must be an integer >= 2"),
        ({"round_to": 0}, "round_to must be a positive integer"),
        ({"imgsz": 100}, "use 96"),
        ({"max_layer_ratio": 1.0}, "max_layer_ratio must be in"),
    ],
)
def test_config_rejects_bad_values(kwargs, words):
    with pytest.raises(YoloPruneError, match=words):
        PruneConfig(**kwargs)


def test_mac_delta_predicts_every_pruned_group_exactly():
    """The loop decides how much of a group to prune from MacCounter.delta before pruning: it must be exact."""
    model = live_model("yolo11n.yaml")  # plain, depthwise (head) and concatenated convs
    prepare(model)
    counter = MacCounter(model, 160)
    pruner = tp.pruner.BasePruner(model, torch.rand(1, 3, 64, 64), importance=tp.importance.MagnitudeImportance(),
                                  pruning_ratio=0.3, round_to=8, ignored_layers=output_layers(model)
                                  + attention_internals(model), forward_fn=trace_forward)
    checked = 0
    for group in pruner.step(interactive=True):
        predicted = counter() + counter.delta(width_changes(group))
        group.prune()
        assert counter() == predicted
        checked += 1
    assert checked > 20


@pytest.mark.parametrize("speed_up", [pytest.param(2.0, marks=pytest.mark.slow), 3.0])
def test_group_that_would_overshoot_is_pruned_in_part(speed_up):
    """With 3 steps every group is large: pruning the one that crosses the target whole jumped past it (3x: "overshot
    ... 3.269x" before; issue 23 met it at the default 40 steps on a trained yolov8n-obb). Part of it is pruned now."""
    model = live_model("yolov8n.yaml")
    report = prune_model(model, PruneConfig(speed_up=speed_up, imgsz=160, iterative_steps=3), progress=False)
    assert speed_up <= report.speed_up <= speed_up * 1.02
    assert report.macs_speed_up == report.speed_up and report.target == "macs"
    assert report.predicted_latency_speed_up is None

    rows = report.layers
    assert len(rows) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert rows[0]["name"] == "model.0.conv" and rows[0]["resolution"] == "80x80" and rows[0]["base_width"] == 16
    assert any(r["kept_width"] < r["base_width"] for r in rows)
    assert all(r["kept"] == r["kept_width"] / r["base_width"] for r in rows)
    csv = layers_table(report, "csv").splitlines()
    assert csv[0] == "name,resolution,base_width,kept_width,kept" and len(csv) == len(rows) + 1
    md = layers_table(report.to_dict(), "markdown").splitlines()
    assert md[2].startswith(f"| model.0.conv | 80x80 | 16 | {rows[0]['kept_width']} |")


@pytest.mark.slow
def test_latency_target_reaches_predicted_speed_up(tmp_path):
    model = live_model("yolov8n.yaml")
    # the table alone (no checks on the runtime, which move the prediction to where the runtime measures the target)
    cfg = PruneConfig(speed_up=2.0, imgsz=160, target="latency", threads=2, latency_cache=str(tmp_path), verify=0)
    report = prune_model(model, cfg, progress=False)
    assert report.target == "latency" and report.runtime == "onnxruntime"
    assert report.speed_up == report.predicted_latency_speed_up == pytest.approx(2.0, rel=0.02)
    assert report.predicted_base_ms / report.predicted_pruned_ms == pytest.approx(report.speed_up)
    assert report.macs_speed_up > 1.5  # fewer MACs too, though not in proportion
    cached, = tmp_path.glob("onnxruntime-*.json")
    assert len(json.loads(cached.read_text())["calibration"]["points"]) == 2  # calibrated on two narrowed copies
