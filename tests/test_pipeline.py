"""The DVC pipeline, run as a user runs it, in a temporary copy of the repository with tiny settings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def sh(cmd: str, cwd: Path) -> str:
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(Path.home()), "YOLO_OFFLINE": "1"}
    out = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, env=env, timeout=1800)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


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
    params["dataset"].update(n_train=8, n_val=4)
    params["baseline"].update(epochs=1, batch=4)
    params["finetune"].update(epochs=1, batch=4)
    params["benchmark"].update(iters=3, warmup=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm init", root)
    sh("dvc repro", root)
    return root


def test_repro_writes_every_metric(repo):
    keys = {"baseline_map50_95", "pruned_map50_95", "finetuned_map50_95", "retention_pct", "baseline_params",
            "finetuned_params", "baseline_macs", "finetuned_macs", "macs_speed_up", "baseline_latency_ms",
            "finetuned_latency_ms", "latency_speed_up", "onnx_parity_rel_error"}
    bench = json.loads((repo / "metrics/benchmark.json").read_text())
    assert keys <= bench.keys()
    assert bench["macs_speed_up"] == pytest.approx(1.5, rel=0.03)
    assert bench["onnx_parity_rel_error"] < 1e-4
    prune = json.loads((repo / "metrics/prune.json").read_text())
    assert prune["speed_up"] == pytest.approx(1.5, rel=0.02)
    assert not list(repo.rglob("*.dvc"))  # no stray .dvc files from the dvclive callback


def test_experiments_reuse_upstream_stages(repo):
    out = sh("dvc exp run -S speed_up=3", repo)
    for stage in ("dataset", "baseline", "convert"):
        assert f"Running stage '{stage}'" not in out
    assert "Running stage 'prune'" in out
    prune = json.loads((repo / "metrics/prune.json").read_text())
    assert prune["speed_up"] == pytest.approx(3.0, rel=0.02)
    out = sh("dvc exp run -S method=l1", repo)
    assert "Running stage 'baseline'" not in out
    shown = sh("dvc exp show --no-pager", repo)
    assert shown.count("exp-") >= 2 or len([ln for ln in shown.splitlines() if "├──" in ln or "└──" in ln]) >= 2
    diff = sh("dvc params diff --md", repo)
    assert "method" in diff
    sh("dvc metrics diff --md", repo)
