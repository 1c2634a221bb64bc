"""tools.study: the sweep and its queue commands, the rounds of the queue, the table, the front and the report.

DVC is mocked at its boundary: ``exp_show`` (DVC's Python API) and ``dvc`` (the subprocess).
``fixtures/dvc_exp_show.json`` is real ``dvc exp show --json`` output of DVC 3.67.1: one experiment
run in the workspace, one outside the study, and four from the queue (success, failed, running, queued).
"""

from __future__ import annotations

import importlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # tools/ sits beside the package, not installed with it
study = importlib.import_module("tools.study")

FIXTURE = ROOT / "tests" / "fixtures" / "dvc_exp_show.json"
BENCH = {"baseline_map50_95": 0.6, "finetuned_map50_95": 0.57, "macs_speed_up": 2.01, "latency_speed_up": 1.5,
         "baseline_latency_ms": 1.5, "finetuned_latency_ms": 1.0}


def states(runs: dict[str, tuple[str, dict]], metrics: dict | None = None) -> list[dict]:
    """Return ``dvc exp show --json`` data for one commit with ``runs``: name -> (queue state, params)."""
    def exp(name: str, state: str, params: dict) -> dict:
        data = {"params": {"params.yaml": {"data": params}}, "metrics": {
            "metrics/benchmark.json": {"data": metrics or BENCH}} if state == "success" else {}}
        return {"name": name, "revs": [{"rev": f"r-{name}", "data": data}], "executor": {"state": state}}
    return [{"rev": "c0ffee", "experiments": [exp(n, s, p) for n, (s, p) in runs.items()]}]


class FakeDvc:
    """The queue: ``exp run --queue`` adds a task, ``exp run --run-all`` runs every queued one."""

    def __init__(self, fail: tuple[str, ...] = ()):
        self.runs: dict[str, tuple[str, dict]] = {}
        self.calls: list[tuple[str, ...]] = []
        self.fail = fail

    def __call__(self, *args: str, repo: str = ".") -> None:
        self.calls.append(args)
        if "--queue" in args:
            sets = dict(a.split("=", 1) for a in args[args.index("--name") + 2:] if a != "-S")
            self.runs[args[args.index("--name") + 1]] = ("queued", {"model": sets["model"]})
        elif "--run-all" in args:
            self.runs = {n: ("failed" if n in self.fail else "success", p) if s == "queued" else (s, p)
                         for n, (s, p) in self.runs.items()}

    def show(self, repo: str = ".") -> list[dict]:
        return states(self.runs)


@pytest.fixture
def fake(monkeypatch) -> FakeDvc:
    fake = FakeDvc()
    monkeypatch.setattr(study, "dvc", fake)
    monkeypatch.setattr(study, "exp_show", fake.show)
    monkeypatch.setattr(study, "current", lambda records, repo=".": list(records))
    return fake


def test_sweep_rows_and_names():
    sweep = study.sweep()
    names = [e.name for e in sweep]
    assert len(names) == len(set(names)) == 21
    for name in names:  # git ref rules DVC enforces on experiment names
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) and ".." not in name
    for model in study.GENERATIONS:
        for seed in study.SEEDS:  # issue 24's bars in every seed: 2x at 10 fine-tune epochs, 3x at 20
            mine = {(e.speed_up, e.target, e.distill, e.ft_epochs, e.sparsity) for e in sweep
                    if e.model == model and e.seed == seed}
            assert (2.0, "macs", "none", None, 0) in mine
        assert {(e.speed_up, e.target, e.distill, e.ft_epochs, e.sparsity) for e in sweep
                if e.model == model and e.seed == 0} >= {
            (3.0, "macs", "none", 20, 0), (3.0, "macs", "none", None, 0),
            (2.0, "latency", "none", None, 0), (2.0, "macs", "cwd", None, 0)}
        assert len({e.baseline_key() for e in sweep if e.model == model}) == len(study.SEEDS)  # a baseline per seed
    assert [e.name for e in sweep[:4]] == ["v8n-lamp-2x", "v8n-lamp-2x-s1", "v8n-lamp-2x-s2", "11n-lamp-2x"]
    assert "26n-lamp-3x" in names
    assert [e.name for e in sweep if e.alone] == ["v8n-lamp-2x-latency", "11n-lamp-2x-latency", "26n-lamp-2x-latency"]


def test_queue_command_line():
    e = study.Experiment("yolo11n.yaml", 3.0, target="latency", distill="cwd", ft_epochs=20)
    assert e.name == "11n-lamp-3x-latency-cwd-ft20"
    argv = e.command()
    assert argv[:5] == ["exp", "run", "--queue", "--name", "study-11n-lamp-3x-latency-cwd-ft20"]
    sets = [argv[i + 1] for i in range(5, len(argv), 2)]
    assert all(argv[i] == "-S" for i in range(5, len(argv), 2))
    assert sets == ["baseline.threads=1", "finetune.threads=1", "benchmark.iters=100",
                    "benchmark.warmup=10", "model=yolo11n.yaml", "speed_up=3.0", "method=lamp",
                    "prune.target=latency", "finetune.distill.method=cwd", "finetune.epochs=20"]
    sparse = study.Experiment("yolo11n.yaml", 3.0, ft_epochs=20, sparsity=5)
    assert sparse.name == "11n-lamp-3x-sp5-ft20" and sparse.command()[-2:] == ["-S", "sparsity.epochs=5"]
    assert sparse.baseline_key() == study.Experiment("yolo11n.yaml", 3.0).baseline_key()  # trained before sparsity
    seeded = study.Experiment("yolo11n.yaml", 3.0, ft_epochs=20, seed=1)
    assert seeded.name == "11n-lamp-3x-ft20-s1" and seeded.command()[-2:] == ["-S", "++baseline.args.seed=1"]
    assert seeded.baseline_key() != study.Experiment("yolo11n.yaml", 3.0).baseline_key()


def test_parse_the_real_exp_show_output():
    records = {r.name: r for r in study.parse_exp_show(json.loads(FIXTURE.read_text()))}
    assert {n: r.state for n, r in records.items() if n.startswith("study-")} == {
        "study-11n-lamp-2x": "running", "study-v8n-lamp-3x": "success", "study-v8n-lamp-2x": "done",
        "study-26n-lamp-2x": "queued", "study-v8n-bn_scale-2x": "failed"}
    assert [n for n, r in records.items() if r.finished] == ["study-v8n-lamp-3x", "pr-ci2", "study-v8n-lamp-2x"]
    assert records["study-v8n-lamp-3x"].param("prune.round_to") == 8
    assert records["study-v8n-lamp-3x"].metric("retention_pct") == pytest.approx(96.4)
    assert records["study-v8n-lamp-2x"].metric("nosuch") is None


def test_ready_waits_for_a_baseline_in_training():
    records = study.parse_exp_show(json.loads(FIXTURE.read_text()))
    ready = study.ready(study.sweep(), records)
    # yolov8n's baseline is trained (v8n-lamp-2x done): its other rows go; 11n and 26n wait for theirs (running,
    # queued) to be trained
    # (and each seed's first row trains its own baseline)
    # (v8n-lamp-3x is done)
    assert [e.name for e in ready if e.model == "configs/yolov8n.yaml"] == [
        "v8n-lamp-2x-s1", "v8n-lamp-2x-s2", "v8n-lamp-3x-ft20", "v8n-lamp-2x-latency", "v8n-lamp-2x-cwd"]
    assert {e.name for e in ready if e.model != "configs/yolov8n.yaml"} == {
        "11n-lamp-2x-s1", "11n-lamp-2x-s2", "26n-lamp-2x-s1", "26n-lamp-2x-s2"}
    assert "study-v8n-lamp-3x" not in {e.dvc_name for e in ready}


def test_run_trains_each_baseline_once_then_the_rest(fake):
    assert study.run(study.sweep()) == []
    runs = [i for i, c in enumerate(fake.calls) if "--run-all" in c]
    assert [fake.calls[i][-1] for i in runs] == ["2", "2", "1"]  # the latency target's runs alone, last
    first = [c[4] for c in fake.calls[:runs[0]]]
    assert first == [f"study-{f}-lamp-2x{s}" for f in ("v8n", "11n", "26n") for s in ("", "-s1", "-s2")]
    assert len(fake.calls[runs[0] + 1:runs[1]]) == 21 - 9 - 3  # all but the baselines and the latency target
    assert {c[4] for c in fake.calls[runs[1] + 1:runs[2]]} == {e.dvc_name for e in study.sweep() if e.alone}


def test_a_failed_baseline_blocks_its_generation(fake):
    fake.fail = ("study-26n-lamp-2x",)
    missing = study.run(study.sweep())
    assert missing == [e.name for e in study.sweep() if e.model == "configs/yolo26n.yaml" and e.seed == 0]
    assert study.missing(study.parse_exp_show(fake.show()), study.sweep())["26n-lamp-2x"] == "failed"


def test_table_and_retention():
    records = study.parse_exp_show(states({
        "study-v8n-lamp-2x": ("success", {"model": "yolov8n.yaml", "speed_up": 2, "method": "lamp",
                                          "finetune": {"epochs": 10, "distill": {"method": "both"}},
                                          "prune": {"target": "latency"}}),
        "study-v8n-lamp-3x": ("queued", {}), "someone-else": ("success", {})}))
    df = study.table(records, study.sweep())
    assert list(df.columns) == study.TABLE and list(df["experiment"]) == ["v8n-lamp-2x"]
    row = df.iloc[0]
    assert (row.target, row.distill, row.ft_epochs, row.kind, row.commit) == ("latency", "both", 10, "pruned",
                                                                            "c0ffee")
    assert row.retention == pytest.approx(95.0) and row.latency_ms == 1.0
    assert math.isnan(row.retention_vs_control)  # a run from before the control stage
    controlled = study.table(study.parse_exp_show(states(
        {"study-v8n-lamp-2x": ("success", {"model": "yolov8n.yaml"})},
        {**BENCH, "control_map50_95": 0.6 / 0.95, "baseline_map50_95": 0.0})), study.sweep()).iloc[0]
    assert controlled.retention_vs_control == pytest.approx(90.25) and math.isnan(controlled.retention)  # zero: NaN
    old = study.table(study.parse_exp_show(states({"study-v8n-lamp-2x": ("success", {"model": "yolov8n.yaml"})})),
                      study.sweep())
    assert (old.iloc[0].target, old.iloc[0].distill) == ("macs", "none")  # a run from before those params


def test_runs_timed_alone_replace_the_pipelines_timing_and_seeds_are_summarised():
    v8n = "configs/yolov8n.yaml"
    records = study.parse_exp_show(states({
        "study-v8n-lamp-2x": ("success", {"model": v8n, "speed_up": 2}),
        "study-v8n-lamp-2x-s1": ("success", {"model": v8n, "speed_up": 2, "baseline": {"args": {"seed": 1}}})},
        {**BENCH, "control_map50_95": 0.6}))
    timed = pd.DataFrame([  # the second was timed on a run since replaced: its timing is not this run's
        {"experiment": "v8n-lamp-2x", "rev": "r-study-v8n-lamp-2x", "base_latency_ms": 4.0, "latency_ms": 2.0,
         "latency_speed_up": 2.0},
        {"experiment": "v8n-lamp-2x-s1", "rev": "an older run", "base_latency_ms": 9.0, "latency_ms": 1.0,
         "latency_speed_up": 9.0}])
    df = study.table(records, study.sweep(), timed)
    assert list(df["experiment"]) == ["v8n-lamp-2x", "v8n-lamp-2x-s1"] and list(df["seed"]) == [0, 1]
    assert list(df["latency_timed"]) == ["alone", "pipeline"]
    assert list(df["latency_speed_up"]) == [2.0, 1.5] and list(df["latency_ms"]) == [2.0, 1.0]
    summary = study.summary(df)
    assert len(summary) == 1
    row = summary.iloc[0]
    assert (row.family, row.speed_up, row.seeds) == ("v8n", 2.0, 2)
    assert row.vs_control_mean == pytest.approx(95.0) and row.vs_control_min == pytest.approx(95.0)
    assert row.latency_speed_up == pytest.approx(1.75)


def test_time_alone_times_each_run_against_its_baseline(monkeypatch):
    import dvc.api
    import torch

    from yoloprune.latency import model_onnx

    nets = {"baseline": torch.nn.Conv2d(3, 64, 3, padding=1), "finetuned": torch.nn.Conv2d(3, 8, 3, padding=1)}
    read = []

    def fake_read(path, repo=".", rev=None, mode="r"):
        read.append((path, rev))
        return model_onnx(nets[Path(path).name.split("_")[0]], 64)

    monkeypatch.setattr(dvc.api, "read", fake_read)
    records = study.parse_exp_show(states({"study-v8n-lamp-2x": ("success", {"model": "x", "imgsz": 64})}))
    df = study.time_alone(records, study.sweep(), rounds=3)
    assert read == [("models/baseline_64_b1.onnx", "r-study-v8n-lamp-2x"),
                    ("models/finetuned_64_b1.onnx", "r-study-v8n-lamp-2x")]
    row = df.iloc[0]
    assert (row.experiment, row.rev, row.rounds) == ("v8n-lamp-2x", "r-study-v8n-lamp-2x", 3)
    assert row.latency_speed_up == pytest.approx(row.base_latency_ms / row.latency_ms)
    assert row.base_latency_ms > 0 and row.latency_ms > 0 and 0 <= row.other_load <= 1
    read.clear()  # timed once already: kept, not timed again; a newer run of the experiment is timed
    again = study.time_alone(records, study.sweep(), rounds=3, done=df.assign(latency_ms=0.5))
    assert read == [] and again.iloc[0].latency_ms == 0.5
    newer = study.parse_exp_show(states({"study-v8n-lamp-2x": ("success", {"model": "x", "imgsz": 64})}))
    newer = [study.Record(r.name, "r-newer", r.baseline, r.state, r.params, r.metrics) for r in newer]
    assert study.time_alone(newer, study.sweep(), rounds=3, done=df).iloc[0].rev == "r-newer" and len(read) == 2


def test_no_finished_run_times_to_an_empty_table_the_report_reads_as_none(tmp_path):
    empty = study.time_alone([], study.sweep())
    assert list(empty.columns) == study.TIMED_COLUMNS and empty.empty
    empty.to_csv(tmp_path / "latency.csv", index=False)
    assert study.read_timed(tmp_path / "latency.csv") is None and study.read_timed(tmp_path / "nosuch.csv") is None


def test_queue_leaves_the_latency_targets_runs_to_run(fake):
    assert study.main(["queue"]) == 0
    queued = {c[4] for c in fake.calls if "--queue" in c}
    assert queued and not queued & {e.dvc_name for e in study.sweep() if e.alone}


def test_pareto_front():
    assert study.pareto_front([1, 2, 3, 2], [0.5, 0.6, 0.55, 0.6]) == [True, True, False, True]
    assert study.pareto_front([1, float("nan"), 2], [0.1, 0.9, 0.2]) == [True, False, True]
    df = study.read_table(ROOT / "docs" / "study" / "experiments.csv")
    pts = study.points(df)
    assert set(pts.loc[pts["kind"] == "baseline", "label"]) == {"v8n baseline", "11n baseline", "26n baseline"}
    control = pts[pts["kind"] == "control"]
    assert (control["speed_up_x"] == 1).all() and (control["vs_control"] == 100).all()
    # seeds share a point: the 2x MACs setting of yolov8n is one point, the mean of its three seeds' % of control
    two = pts[(pts["family"] == "v8n") & (pts["speed_up"] == 2) & (pts["target"] == "macs") & (pts["ft_epochs"] == 10)
              & (pts["distill"] == "none")]
    runs = df[df["experiment"].str.fullmatch(r"v8n-lamp-2x(-s\d)?")]
    assert len(two) == 1 and two["seeds"].item() == len(runs) == 3
    assert two["vs_control"].item() == pytest.approx(runs["retention_vs_control"].mean())
    assert two["low"].item() == pytest.approx(runs["retention_vs_control"].min())
    for _, g in pts.groupby("family"):  # per generation, nothing on the front is beaten by a point of it
        for f in g[g["front"]].itertuples():
            assert not ((g["speed_up_x"] > f.speed_up_x) & (g["vs_control"] > f.vs_control)).any()
        assert g["front"].any()


def test_report_redrawn_from_the_committed_table(tmp_path):
    committed = ROOT / "docs" / "study" / "experiments.csv"
    assert study.main(["--out", str(tmp_path), "report", "--csv", str(committed)]) == 0
    md = (tmp_path / "results.md").read_text()
    assert "![% of the equal-budget control vs measured speed-up" in md and "| v8n-lamp-2x " in md and "## Pareto front" in md
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = pd.read_csv(tmp_path / "study" / "experiments.csv", keep_default_na=False, na_values=[""])
    pd.testing.assert_frame_equal(again, study.read_table(committed), check_exact=False, rtol=1e-5)
    assert study.main(["report", "--csv", str(tmp_path / "nosuch.csv")]) == 2
    old = tmp_path / "old.csv"  # a table from before the sparsity column: its runs had none
    pd.read_csv(committed).drop(columns="sparsity", errors="ignore").to_csv(old, index=False)
    assert (study.read_table(old)["sparsity"] == 0).all()
    (tmp_path / "study" / "probes.md").write_text("## Probes\n\n| a probe row |\n")  # hand-run probes follow
    assert study.main(["--out", str(tmp_path), "report", "--csv", str(committed)]) == 0
    assert (tmp_path / "results.md").read_text().endswith("\n## Probes\n\n| a probe row |\n")


def test_plan_prints_every_queue_command(capsys):
    assert study.main(["plan"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 21 and all(ln.startswith("dvc exp run --queue --name study-") for ln in lines)


def test_current_keeps_runs_whose_pipeline_code_is_heads(tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              capture_output=True, text=True, check=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: python code.py\n    deps: [code.py, data]\n")
    for name in ("params.yaml", "code.py", "README.md"):
        (tmp_path / name).write_text("0\n")
    git("add", "-A")
    git("commit", "-qm", "a")
    a = git("rev-parse", "HEAD")
    (tmp_path / "README.md").write_text("docs\n")
    git("commit", "-qam", "b")
    b = git("rev-parse", "HEAD")
    assert study.pipeline_files(tmp_path) == ["code.py", "dvc.yaml", "params.yaml"]
    runs = [study.Record("x", "r1", a, "success"), study.Record("y", "r2", b, "success")]
    assert study.current(runs, tmp_path) == runs  # a docs commit keeps every result
    (tmp_path / "code.py").write_text("1\n")
    git("commit", "-qam", "c")
    assert study.current(runs, tmp_path) == []  # the stage's code changed: older results are not this code's


def test_kept_rows_fill_in_experiments_not_run_on_this_code():
    new = pd.DataFrame([{"experiment": "v8n-lamp-2x-sp5", "map50_95": 0.5, "commit": "new"}], columns=study.TABLE)
    old = pd.DataFrame([{"experiment": e, "map50_95": 0.4, "commit": "old"}
                        for e in ("v8n-lamp-2x-sp5", "v8n-lamp-2x", "no-longer-in-the-sweep")], columns=study.TABLE)
    both = study.kept_rows(new, old, study.sweep())
    assert list(both["experiment"]) == ["v8n-lamp-2x", "v8n-lamp-2x-sp5"]  # sweep order
    assert list(both["commit"]) == ["old", "new"]  # this code's run wins over the committed one
    assert study.kept_rows(new, old.iloc[:0], study.sweep()).equals(new)
