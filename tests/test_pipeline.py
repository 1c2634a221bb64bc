"""The DVC pipeline, run as a user runs it, in a temporary copy of the repository with tiny settings."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


ENV = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(Path.home()), "YOLO_OFFLINE": "1"}


def sh(cmd: str, cwd: Path) -> str:
    out = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=1800, check=False)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file() and not f.startswith(("tests/", "benchmarks/")):
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, root / f)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.update(imgsz=64, speed_up=1.5)
    params["prune"]["target"] = "macs"  # the pipeline's mechanics: a 64-px network's timings say nothing
    params["dataset"].update(n_train=8, n_val=4)
    params["baseline"].update(epochs=1, batch=4, workers=0)
    params["finetune"].update(epochs=2, batch=4, workers=0)
    params["sparsity"].update(epochs=1)  # on: the stage trains, the control trains as much longer
    for stage in ("baseline", "finetune"):
        params[stage]["args"]["nbs"] = 4  # = batch, as params.yaml has it: one optimiser step per batch
    params["benchmark"].update(iters=3, warmup=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm init", root)
    sh("dvc repro", root)
    return root


def test_repro_writes_every_metric(repo):
    keys = {"baseline_map50_95", "finetuned_map50_95", "retention_pct", "baseline_params", "finetuned_params",
            "baseline_macs", "finetuned_macs", "macs_speed_up", "baseline_latency_ms", "finetuned_latency_ms",
            "latency_speed_up", "control_map50_95", "retention_vs_control_pct"}
    metrics = {p.stem: json.loads(p.read_text()) for p in (repo / "metrics").glob("*.json")
               if p.stem not in ("benchmark_full", "tradeoff")}  # those two are outs, not metrics
    bench = metrics["benchmark"]
    assert keys <= bench.keys()
    assert bench["macs_speed_up"] == pytest.approx(1.5, rel=0.03)
    assert max(metrics["export"].values()) < 1e-4  # ONNX parity of both models
    assert set(metrics["prune"]) >= {"pruned_map50_95"}
    flat = [k for m in metrics.values() for k in m]
    assert len(flat) == len(set(flat)), "a metric repeated across files"
    assert not [k for k in flat if "second" in k or k.endswith("_s")], "timings belong in logs/, not metrics/"
    log = json.loads((repo / "logs/prune.json").read_text())  # the full prune report, timing included
    assert log["speed_up"] == pytest.approx(1.5, rel=0.02) and log["seconds"] > 0
    assert json.loads((repo / "logs/finetune.json").read_text())["seconds"] > 0
    baseline = json.loads((repo / "metrics/baseline.json").read_text())
    assert baseline["baseline_epochs"] == 1
    assert baseline["map50_95_tail_gain"] is None  # 1 epoch: too short to tell a plateau
    curves = (repo / "metrics/baseline_curves.csv").read_text().splitlines()
    assert "metrics/mAP50-95(B)" in curves[0] and len(curves) == 2  # the header and the one epoch
    assert not [f for f in repo.rglob("*.dvc") if f.is_file()]  # no stray .dvc files from the dvclive callback
    control = torch.load(repo / "models/control.pt", weights_only=False)["yoloprune"]  # the baseline, fine-tuned alike
    assert control == {"epochs": 2 + 1, "control": True}  # the fine-tune's epochs and the sparsity stage's
    expected = 100 * bench["finetuned_map50_95"] / bench["control_map50_95"] if bench["control_map50_95"] else None
    assert bench["retention_vs_control_pct"] == pytest.approx(expected)


def test_experiments_reuse_upstream_stages(repo):
    out = sh("dvc exp run -S speed_up=3", repo)
    for stage in ("dataset", "baseline", "convert"):
        assert f"Running stage '{stage}'" not in out
    assert "Running stage 'prune'" in out
    assert json.loads((repo / "logs/prune.json").read_text())["speed_up"] == pytest.approx(3.0, rel=0.02)
    out = sh("dvc exp run -S method=l1", repo)
    assert "Running stage 'baseline'" not in out
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(sh("dvc exp show --csv 2>/dev/null", repo))))
    exps = [r for r in rows if r.get("Experiment")]  # the workspace and branch rows have no name
    assert len(exps) >= 2 and {r["method"] for r in exps} >= {"l1"}
    assert {r["speed_up"] for r in exps} >= {"3"}  # a bare column name: no metric is called speed_up
    assert all(float(r["macs_speed_up"]) > 1 for r in exps)  # metrics filled in for each experiment
    diff = sh("dvc params diff --md", repo)
    assert "method" in diff
    sh("dvc metrics diff --md", repo)


def test_interrupted_repro_resumes_the_fine_tune(repo):
    """Kill `dvc repro` after the fine-tune's first epoch; the re-run resumes it and the pipeline completes."""
    before = json.loads((repo / "metrics/prune.json").read_text())
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["finetune"]["epochs"] = 3  # a new fine-tune; everything upstream comes from the cache
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    last = repo / "runs/finetune/weights/last.pt"
    state = last.with_name("resume_fp32.pt")  # written just after last.pt: killed between the two, the resume is
    stamp = max(p.stat().st_mtime if p.exists() else 0 for p in (last, state))  # Ultralytics' approximate one
    proc = subprocess.Popen("dvc repro", shell=True, cwd=repo, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900

    def saved() -> bool:
        return all(p.exists() and p.stat().st_mtime > stamp for p in (last, state))

    while not saved() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)  # the first epoch of the new run has been saved, its fp32 state included
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    gone = time.time() + 120  # the shell exits first; dvc (holding its lock) may still be on its way out
    while time.time() < gone:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    out = sh("dvc repro", repo)
    assert "Running stage 'finetune'" in out and "Running stage 'baseline'" not in out
    assert "Resuming training" in out and "no fp32 state" not in out  # the exact resume, not the approximate one
    assert json.loads((repo / "metrics/finetune.json").read_text())["finetune_epochs"] == 3
    resumed = curves(repo)
    assert json.loads((repo / "metrics/prune.json").read_text()) == before  # upstream untouched
    sh("dvc status", repo)
    # The same metrics as a run never interrupted: the fine-tune again from scratch (a finished run is not resumed).
    out = sh("dvc repro --force --single-item finetune", repo)
    assert "Resuming training" not in out
    assert curves(repo) == resumed  # every epoch's losses and mAP, the wall time aside


def curves(repo: Path) -> list[dict[str, str]]:
    """Return the fine-tune's per-epoch rows without their timings."""
    import csv

    rows = csv.DictReader((repo / "metrics/finetune_curves.csv").read_text().splitlines())
    return [{k: v for k, v in row.items() if k != "time" and not k.endswith("_s")} for row in rows]
