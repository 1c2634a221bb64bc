"""Benchmark: reports hold sane, JSON-ready numbers, and compare() states what pruning bought."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import live_model

from yoloprune.benchmark import BenchmarkConfig, benchmark, benchmark_many, compare, format_table
from yoloprune.errors import YoloPruneError
from yoloprune.io import load_model, save_model
from yoloprune.macs import MacCounter, deployed_branch
from yoloprune.prune import PruneConfig, prune_model
from yoloprune.runtime import resolve_device, round_best, time_interleaved, time_rounds

IMGSZ = 128
FAST = {"imgsz": IMGSZ, "warmup": 2, "iters": 5, "threads": 1}


@pytest.fixture(scope="module")
def v8(tmp_path_factory) -> dict[str, Path]:
    """Saved yolov8n checkpoints: base and pruned to 2x MACs at imgsz 128."""
    root = tmp_path_factory.mktemp("v8")
    model = live_model("yolov8n.yaml")
    base = save_model(model, root / "base" / "yolov8n.pt")
    prune_model(model, PruneConfig(speed_up=2.0, imgsz=IMGSZ), progress=False)
    return {"base": base, "pruned": save_model(model, root / "pruned" / "yolov8n.pt")}


@pytest.fixture(scope="module")
def reports(v8) -> dict[str, dict]:
    return {k: benchmark(p, **FAST) for k, p in v8.items()}


def test_torch_report_has_sane_json_ready_values(v8):
    report = benchmark(v8["base"], imgsz=IMGSZ, batch=2, warmup=1, iters=6, threads=1)
    json.dumps(report, allow_nan=False)  # floats, ints, strings only
    assert (report["imgsz"], report["batch"], report["threads"], report["iters"]) == (IMGSZ, 2, 1, 6)
    assert (report["runtime"], report["device"], report["half"], report["branch"]) == ("torch", "cpu", False, "single")
    assert 0 < report["latency_min_ms"] <= report["latency_median_ms"] <= report["latency_p90_ms"]
    assert report["latency_min_ms"] <= report["latency_best_ms"] <= max(report["latency_p90_ms"], report["latency_median_ms"])
    assert report["latency_mean_ms"] > 0 and report["latency_std_ms"] >= 0
    assert math.isclose(report["fps"], 2 * 1000 / report["latency_median_ms"])
    model = load_model(v8["base"])
    assert report["macs"] == MacCounter(model, IMGSZ)() > 0  # per image, not per batch
    assert math.isclose(report["gflops"], 2 * report["macs"] / 1e9)
    assert report["params"] == report["params_total"] == sum(p.numel() for p in model.parameters())
    assert math.isclose(report["file_mb"], os.path.getsize(v8["base"]) / 2**20)
    assert report["machine"]["cores_logical"] >= 1 and report["machine"]["cpu"] and report["machine"]["platform"]
    assert {"torch", "ultralytics", "yoloprune", "torch_pruning"} <= set(report["versions"])


def test_models_are_timed_taking_turns_so_a_slow_spell_does_not_skew_them(monkeypatch):
    clock = {"now": 0.0}
    calls: list[str] = []
    spell = range(21, 27)  # a slow spell of the machine, in the middle of the timing: one turn long

    def run(name: str):
        def call():  # advances a fake clock: 2 ms for big, 1 ms for small, 4 ms more during the spell
            calls.append(name)
            clock["now"] += ((0.002 if name == "big" else 0.001) + (0.004 if len(calls) in spell else 0))
        return call

    monkeypatch.setattr("yoloprune.runtime.time.perf_counter", lambda: clock["now"])
    big, small = time_interleaved([run("big"), run("small")], warmup=1, iters=12, device=torch.device("cpu"),
                                  rounds=3, settle=2)
    assert len(big) == len(small) == 12
    # warm-up, then rounds: each turn 2 untimed calls (ONNX Runtime's threads spin on after a run) and 4 timed ones,
    # every other round in reverse order
    turns = [calls[i] for i in range(2, len(calls), 6)]
    assert calls[:2] == ["big", "small"] and turns == ["big", "small", "small", "big", "big", "small"]
    assert len(calls) == 2 + 3 * 2 * (2 + 4)
    # one turn of three slowed: 4 of big's 12 calls; the medians, and their ratio, hold
    assert sum(t > 3 for t in big) == 4 and np.median(big) == pytest.approx(2.0) and np.median(small) == pytest.approx(1.0)
    assert time_interleaved([run("one")], warmup=0, iters=3, device=torch.device("cpu")) and calls[-3:] == ["one"] * 3


def test_round_best_is_the_median_of_each_rounds_fastest_call_so_slow_spells_do_not_move_it(monkeypatch):
    clock = {"now": 0.0}
    calls: list[str] = []

    def run(name: str):
        def call():  # 2 ms for big, 1 ms for small; small 5 ms slower when it follows itself (threads still busy)
            slow = name == "small" and calls[-1:] == ["small"]
            calls.append(name)
            clock["now"] += (0.002 if name == "big" else 0.001) + (0.005 if slow else 0)
        return call

    monkeypatch.setattr("yoloprune.runtime.time.perf_counter", lambda: clock["now"])
    big, small = time_rounds([run("big"), run("small")], warmup=0, iters=15, device=torch.device("cpu"), rounds=3,
                             settle=0)
    assert [len(turn) for turn in big] == [len(turn) for turn in small] == [5, 5, 5]  # per round, in call order
    # rounds: big, small | small, big | big, small: small's second turn follows its first, all of it slow
    assert [min(turn) for turn in small] == pytest.approx([1.0, 6.0, 1.0])
    assert np.median([t for turn in small for t in turn]) == pytest.approx(6.0)  # 13 of 15 calls slow: the median
    assert round_best(small) == pytest.approx(1.0) and round_best(big) == pytest.approx(2.0)  # not this
    assert round_best([[3.0, 1.0], [], [2.0]]) == 1.5  # an empty round (fewer calls than rounds) is skipped


def test_benchmark_many_reports_each_model_as_benchmark_does(v8):
    both = benchmark_many([v8["base"], v8["pruned"]], **FAST)
    alone = benchmark(v8["pruned"], **FAST)
    assert [r["model"] for r in both] == [str(v8["base"]), str(v8["pruned"])]
    assert set(both[1]) == set(alone) and both[1]["macs"] == alone["macs"] and both[1]["params"] == alone["params"]
    assert both[0]["macs"] > both[1]["macs"] and all(r["iters"] == FAST["iters"] for r in both)
    # timed together: their rounds pair up, and the speed-up is the median of the rounds' ratios
    assert both[0]["latency_timed_with"] == both[1]["latency_timed_with"] != alone["latency_timed_with"]
    ratios = sorted(b / p for b, p in zip(both[0]["latency_rounds_ms"], both[1]["latency_rounds_ms"], strict=True))
    assert len(ratios) == 5 and compare(*both)["latency_speed_up"] == pytest.approx(ratios[2])  # 5 rounds of 1 call


def test_thread_count_is_restored(v8):
    before = torch.get_num_threads()
    report = benchmark(v8["base"], imgsz=IMGSZ, warmup=0, iters=1, threads=1 if before != 1 else 2)
    assert report["threads"] != before
    assert torch.get_num_threads() == before


def test_yolo26_counts_only_the_deployed_branch(tmp_path):
    model = live_model("yolo26n.yaml")
    pt = save_model(model, tmp_path / "yolo26n.pt")
    report = benchmark(pt, imgsz=IMGSZ, warmup=0, iters=1, threads=1)
    branch, unused = deployed_branch(model)
    assert report["branch"] == branch == "one2many"
    assert report["macs"] == MacCounter(model, IMGSZ, exclude=set(unused))()
    assert report["params"] == report["params_total"] - sum(p.numel() for m in unused for p in m.parameters())


def test_onnx_runtime_exports_once_beside_the_checkpoint(v8):
    report = benchmark(v8["pruned"], runtime="onnx", **FAST)
    cached = v8["pruned"].with_name(f"yolov8n_{IMGSZ}_b1.onnx")
    assert report["file"] == str(cached) and cached.is_file()
    assert math.isclose(report["file_mb"], cached.stat().st_size / 2**20)
    assert report["latency_median_ms"] > 0 and "onnxruntime" in report["versions"]
    stamp = cached.stat().st_mtime_ns
    again = benchmark(v8["pruned"], runtime="onnx", **FAST)
    assert cached.stat().st_mtime_ns == stamp  # reused, not re-exported
    assert again["macs"] == report["macs"]


def cells(table: str) -> list[list[str]]:
    """Return the markdown table's rows (header first, the alignment row left out) as lists of cell texts."""
    rows = [line.strip().strip("|").split("|") for line in table.splitlines() if line.startswith("|")]
    return [[c.strip() for c in r] for r in rows if not set("".join(r)) <= set(":- ")]


def test_compare_gives_ratios_and_a_table(reports):
    base, pruned = reports["base"], reports["pruned"]
    cmp = compare(base, pruned)
    json.dumps(cmp, allow_nan=False)
    assert cmp["metrics"]["macs"]["pruned"] < cmp["metrics"]["macs"]["base"]
    assert abs(cmp["macs_speed_up"] - 2.0) <= 2.0 * 0.02  # PruneConfig's tolerance, same imgsz and branch
    assert 0 < cmp["params_ratio"] < 1
    assert len(base["latency_rounds_ms"]) == len(pruned["latency_rounds_ms"]) == 1  # one model: one round
    assert base["latency_timed_with"] != pruned["latency_timed_with"]  # two benchmark calls: their rounds do not pair
    assert math.isclose(cmp["latency_speed_up"], base["latency_best_ms"] / pruned["latency_best_ms"])
    assert math.isclose(cmp["fps_ratio"], pruned["fps"] / base["fps"])
    assert math.isclose(cmp["metrics"]["params"]["ratio"], pruned["params"] / base["params"])
    assert "map50_95_retention_pct" not in cmp  # no data given
    table = format_table(cmp)
    rows = cells(table)
    assert rows[0] == ["metric", "base", "pruned", "change"]
    assert any(r[0] == "GMACs" and r[3].endswith("x fewer") for r in rows)
    assert any(r[0] == "latency (ms)" and r[3].endswith("x faster") for r in rows)
    assert any(r[0] == "latency median (ms)" and r[3].endswith("x faster") for r in rows)
    assert f"imgsz {IMGSZ}, batch 1, torch on cpu, threads 1" in table


def test_compare_reports_accuracy_retention():
    base = {"imgsz": 640, "batch": 1, "runtime": "onnx", "device": "cpu", "half": False, "threads": 2,
            "params": 100, "macs": 1000, "latency_median_ms": 10.0, "fps": 100.0, "map50": 0.5, "map50_95": 0.4}
    pruned = dict(base, params=50, macs=500, latency_median_ms=8.0, fps=125.0, map50=0.49, map50_95=0.38)
    cmp = compare(base, pruned)
    assert math.isclose(cmp["map50_95_retention_pct"], 95.0) and math.isclose(cmp["map50_retention_pct"], 98.0)
    headline = (cmp["macs_speed_up"], cmp["latency_speed_up"], cmp["fps_ratio"], cmp["params_ratio"])
    assert headline == (2.0, 1.25, 1.25, 0.5)  # reports without latency_best_ms (older ones): the medians' ratio
    steady = compare(dict(base, latency_best_ms=6.0), dict(pruned, latency_best_ms=3.0))
    assert steady["latency_speed_up"] == 2.0  # with it, the speed-up compares the rounds' fastest calls
    # timed together (benchmark_many): each round compared within itself; a slow second round and one lucky fast call
    # of the pruned model in the third leave the median of the rounds' ratios (2.0, 2.0, 2.5) at 2.0
    rounds = {"latency_timed_with": "t1"}
    paired = compare(dict(base, latency_best_ms=6.0, latency_rounds_ms=[4.0, 8.0, 4.0], **rounds),
                     dict(pruned, latency_best_ms=2.0, latency_rounds_ms=[2.0, 4.0, 1.6], **rounds))
    assert paired["latency_speed_up"] == pytest.approx(2.0)
    apart = compare(dict(base, latency_best_ms=6.0, latency_rounds_ms=[4.0, 8.0, 4.0], latency_timed_with="t1"),
                    dict(pruned, latency_best_ms=2.0, latency_rounds_ms=[2.0, 4.0, 1.6], latency_timed_with="t2"))
    assert apart["latency_speed_up"] == 3.0  # timed apart: rounds do not pair, the fastest calls' medians compare
    assert ["mAP50-95", "0.4", "0.38", "95.0% retained"] in cells(format_table(cmp))
    zero = compare(dict(base, map50_95=0.0), pruned)  # an untrained base: retention is undefined, not infinite
    assert "map50_95_retention_pct" not in zero and "ratio" not in zero["metrics"]["map50_95"]


def test_compare_refuses_reports_measured_differently(reports):
    with pytest.raises(YoloPruneError, match=r"different settings.*imgsz 128 vs 256"):
        compare(reports["base"], dict(reports["pruned"], imgsz=256))


@pytest.mark.parametrize("device", ["0", "cuda:0", "cuda"])
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device exists here")
def test_missing_cuda_device_is_a_clear_error(v8, device):
    with pytest.raises(YoloPruneError, match=f"device '{device}' does not exist.*use device='cpu'"):
        benchmark(v8["base"], device=device, **FAST)


def test_device_index_beyond_the_visible_ones_is_an_error():
    with pytest.raises(YoloPruneError, match="device 'cuda:99' does not exist"):
        resolve_device("cuda:99")
    with pytest.raises(YoloPruneError, match="not a device name"):
        resolve_device("gpu")
    assert resolve_device("CPU") == torch.device("cpu")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"runtime": "tensorrt"}, "runtime must be one of torch, onnx"),
        ({"imgsz": 100}, "use 96"),
        ({"iters": 0}, "iters must be a positive integer"),
        ({"threads": 0}, "threads must be a positive integer"),
        ({"data": "nowhere/data.yaml"}, "no such file; pass a local data.yaml"),
        ({"half": True}, "half=True with the torch runtime needs a CUDA device"),
        ({"imgsize": 320}, "unknown benchmark setting.*the settings are imgsz, batch"),
    ],
)
def test_invalid_settings_are_clear_errors(v8, kwargs, message):
    with pytest.raises(YoloPruneError, match=message):
        benchmark(v8["base"], **kwargs)


def test_onnx_runtime_needs_a_checkpoint_to_export():
    with pytest.raises(YoloPruneError, match=r"runtime 'onnx' needs a \.pt checkpoint"):
        benchmark("yolov8n.yaml", runtime="onnx", **FAST)


def write_dataset(root: Path, n: int = 4) -> Path:
    """Write a tiny detection dataset (random images, one box each) and return its data.yaml."""
    rng = np.random.default_rng(0)
    for split in ("images", "labels"):
        (root / split / "val").mkdir(parents=True)
    for i in range(n):
        cv2.imwrite(str(root / "images" / "val" / f"{i}.jpg"), rng.integers(0, 255, (IMGSZ, IMGSZ, 3), dtype=np.uint8))
        (root / "labels" / "val" / f"{i}.txt").write_text(f"{i % 80} 0.5 0.5 0.4 0.3\n")
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images/val", "val": "images/val",
                                    "names": {i: f"c{i}" for i in range(80)}}))
    return data


def test_accuracy_is_measured_with_the_ultralytics_validator(v8, tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    report = benchmark(v8["pruned"], data=str(data), batch=2, **FAST)
    assert torch.get_num_threads() == threads  # the validator's select_device("cpu") would change it
    assert 0 <= report["map50_95"] <= report["map50"] <= 1  # an untrained model scores near 0; the keys are what count
    json.dumps(report, allow_nan=False)
    assert not (tmp_path / "runs").exists()  # the validator's output folder is a temporary one


def test_config_defaults_are_the_documented_ones():
    cfg = BenchmarkConfig()
    assert (cfg.imgsz, cfg.batch, cfg.device, cfg.warmup, cfg.iters, cfg.threads, cfg.half, cfg.runtime, cfg.data) == (
        640, 1, "cpu", 10, 100, None, False, "torch", None)
