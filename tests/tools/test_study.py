"""The study's pure pieces: the sweep, the DVC output parsers, the Pareto front, the targets and the report.

``fixtures/dvc_exp_show.json`` is real ``dvc exp show --json`` output of DVC 3.67.1, captured
from a throw-away repository whose single stage wrote this project's metrics files
(``metrics/{baseline,prune,finetune,benchmark}.json`` with the same keys) and a cached
``models/baseline.pt``: one experiment run in the workspace (``study-v8n-lamp-2x``), one
outside the study (``pr-ci2``), and four queued with ``dvc exp run --queue`` then caught
by ``dvc queue start -j 1`` mid-way: one succeeded, one failed, one running, one still queued.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from yoloprune import study
from yoloprune.errors import YoloPruneError
from yoloprune.importance import get_method
from yoloprune.params import load_params

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).with_name("fixtures") / "dvc_exp_show.json"
QUEUE_STATUS = """\
Task     Name                   Created    Status
2d14904  study-11n-lamp-2x      06:52 AM   Running
4473992  study-26n-lamp-2x      06:52 AM   Queued
6b9d2bb  study-v8n-bn_scale-2x  06:52 AM   Failed
af236c5  study-v8n-lamp-3x      06:52 AM   Success

Worker status: 1 active, 0 idle
"""
FIXTURE_PROFILE = {"baseline.epochs": 40, "benchmark.iters": 100}  # what the fixture's experiments were run with


@pytest.fixture(scope="module")
def params() -> dict:
    return load_params(ROOT / "params.yaml")


@pytest.fixture(scope="module")
def experiments() -> list[study.Experiment]:
    return study.sweep(frontier_speed_up=3.5)


@pytest.fixture(scope="module")
def records() -> list[study.ExpRecord]:
    return study.parse_exp_show(FIXTURE.read_text())


# --- the sweep ------------------------------------------------------------------------------------------------------

def test_sweep_names_are_unique_valid_refs(experiments):
    names = [e.dvc_name for e in experiments]
    assert len(names) == len(set(names)) == 17
    assert not set(names) & {e.dvc_name for e in study.probes()}  # a probe's name never shadows a sweep row
    for name in names:  # git ref rules DVC enforces: no spaces, "..", "~^:?*[\\", no trailing "." or ".lock"
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) and ".." not in name and not name.endswith(".")


def test_every_experiment_passes_the_params_schema(experiments, params):
    base = study.apply_overrides(params, study.PROFILE)
    for e in experiments:
        checked = study.check_params(study.apply_overrides(base, e.overrides), e.name)
        get_method(checked["method"])
        for key, value in e.settings().items():  # the -S text reads back as the value DVC will write
            assert yaml.safe_load(study.yaml_value(value)) == value, (e.name, key)


def test_sweep_covers_issue_9(experiments, params):
    def where(**want):
        return {e.name for e in experiments if all(e.overrides.get(k, _default(params, k)) == v
                                                    for k, v in want.items())}

    lamp_v8n = [e for e in experiments if e.overrides["model"] == study.V8N and e.overrides["method"] == "lamp"
                and len(e.overrides) == 3]
    assert sorted(e.overrides["speed_up"] for e in lamp_v8n) == [1.5, 2.0, 3.0]
    assert {e.overrides["method"] for e in experiments if e.overrides["speed_up"] == 2.0
            and e.overrides["model"] == study.V8N} == {"lamp", "l1", "random", "taylor", "bn_scale"}
    for model in (study.V11N, study.V26N):
        assert {e.overrides["speed_up"] for e in experiments if e.overrides["model"] == model} == {2.0, 3.0}
    assert {e.overrides.get("prune.round_to", params["prune"]["round_to"]) for e in experiments
            if e.name.startswith("v8n-lamp-2x")} == {1, 8, 16}
    assert study.FEW_EPOCHS < params["finetune"]["epochs"] < study.LONG_EPOCHS
    assert where(**{"finetune.epochs": study.FEW_EPOCHS, "speed_up": 2.0}) == {"v8n-lamp-2x-ft3"}
    frontier = next(e for e in experiments if e.name == study.FRONTIER_NAME)
    assert frontier.overrides == {"model": study.V8S, "speed_up": 3.5, "method": "lamp"}
    assert experiments[0].name == study.DEFAULT and experiments[0].overrides == {
        "model": params["model"], "speed_up": params["speed_up"], "method": params["method"]}  # the default row
    assert {c.source for c in study.controls()} <= {e.name for e in experiments}
    assert where(**{"finetune.epochs": study.LONG_EPOCHS, "speed_up": 3.0}) == {"v8n-lamp-3x-ft20"}  # the remedy
    # The remedy for the other generations is a probe: the same overrides as the sweep's row, another model.
    remedy = next(e for e in experiments if e.name == "v8n-lamp-3x-ft20").overrides
    others = study.generation_remedies()
    assert [e.name for e in others] == ["11n-lamp-3x-ft20", "26n-lamp-3x-ft20"] and all(e in study.probes() for e in others)
    assert [e.overrides for e in others] == [{**remedy, "model": m} for m in (study.V11N, study.V26N)]


def _default(params: dict, key: str):
    node = params
    for part in key.split("."):
        node = node[part]
    return node


def test_profile_lives_in_the_commands(experiments):
    argv = experiments[0].command()
    assert argv[:5] == ["exp", "run", "--queue", "--name", "study-v8n-lamp-2x"]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "-S"]
    assert sets[:len(study.PROFILE)] == [f"{k}={study.yaml_value(v)}" for k, v in study.PROFILE.items()]
    assert "speed_up=2.0" in sets and "model=yolov8n.yaml" in sets


def test_bad_overrides_fail_at_the_edge(params):
    with pytest.raises(YoloPruneError, match=r"prune.roundto.*'\+prune.roundto' to add one"):
        study.apply_overrides(params, {"prune.roundto": 16})
    with pytest.raises(YoloPruneError, match=r"\+prune.round_to: params.yaml has that key already"):
        study.apply_overrides(params, {"+prune.round_to": 16})
    with pytest.raises(YoloPruneError, match="finetune.epochs"):
        study.check_params(study.apply_overrides(params, {"finetune.epochs": "5"}))


def test_replicates_add_the_seed_as_dvc_does(experiments, params):
    replicates = study.replicates()
    assert [r.name for r in replicates] == ["v8n-lamp-2x-seed1", "v8n-lamp-2x-seed2", "v8n-lamp-2x-seed3",
                                            "11n-lamp-2x-seed1", "26n-lamp-2x-seed1"]
    assert study.REPLICATE_GROUPS["26n-lamp-2x"] == ("26n-lamp-2x-seed1",)
    assert not {r.dvc_name for r in replicates} & {e.dvc_name for e in experiments}
    assert all(r in study.probes() for r in replicates)  # outside `make study`: each baseline costs a generation's
    by_name = {e.name: e for e in experiments}
    for replicate in replicates:
        source, seed = replicate.name.rsplit("-seed", 1)
        sets = [a for i, a in enumerate(replicate.command()) if replicate.command()[i - 1] == "-S"]
        assert f"+baseline.args.seed={seed}" in sets and f"+finetune.args.seed={seed}" in sets  # DVC's new-key syntax
        assert {k: v for k, v in replicate.overrides.items() if not k.startswith("+")} == by_name[source].overrides
        seed = int(seed)
        checked = study.check_params(study.apply_overrides(params, replicate.overrides))
        assert checked["baseline"]["args"]["seed"] == checked["finetune"]["args"]["seed"] == seed
        assert "seed" not in params["baseline"]["args"]  # the copy changed, not the original
        # Queueing compares a finished run's params with the overrides, the '+' left out.
        assert study._matches(checked, replicate.settings({}))
        assert not study._matches(params, replicate.settings({}))


def test_budget_probe_is_each_generations_2x_with_a_shorter_baseline(experiments, params):
    probe = study.budget_probe()
    by_name = {e.name: e for e in experiments}
    assert [e.name for e in probe] == ["v8n-lamp-2x-e60", "11n-lamp-2x-e60", "26n-lamp-2x-e60"]
    assert study.PROBE_EPOCHS < study.PROFILE["baseline.epochs"]
    for e in probe:
        twin = by_name[e.name.removesuffix(study.PROBE_SUFFIX)]
        assert {k: v for k, v in e.overrides.items() if k != "baseline.epochs"} == twin.overrides
        settings = e.settings()  # the probe's own epochs win over the profile's, in the profile's place
        assert next(iter(settings)) == "baseline.epochs" and settings["baseline.epochs"] == study.PROBE_EPOCHS
        sets = [a for i, a in enumerate(e.command()) if e.command()[i - 1] == "-S"]
        assert [a for a in sets if a.startswith("baseline.epochs=")] == ["baseline.epochs=60"]
        checked = study.check_params(study.apply_overrides(params, e.overrides), e.name)
        assert checked["baseline"]["epochs"] == 60 and checked["speed_up"] == 2.0
    assert [(c.name, c.source) for c in study.controls(probe=True)] == [
        ("v8n-control-e60", "v8n-lamp-2x-e60"), ("11n-control-e60", "11n-lamp-2x-e60"),
        ("26n-control-e60", "26n-lamp-2x-e60")]
    assert not {c.name for c in study.controls(probe=True)} & {c.name for c in study.controls()}
    assert not {e.dvc_name for e in probe} & {e.dvc_name for e in experiments}  # not part of `make study`


def test_frontier_speed_up_is_the_mac_ratio(params):
    sweep = study.study_sweep(ROOT / "params.yaml")  # builds yolov8s and yolov8n at the study imgsz
    frontier = next(e for e in sweep if e.name == study.FRONTIER_NAME)
    nc = study.dataset_classes(params)
    ratio = study.model_macs(study.V8S, params["imgsz"], nc) / study.model_macs(study.V8N, params["imgsz"], nc)
    assert frontier.overrides["speed_up"] == pytest.approx(ratio, abs=5e-4)
    assert 3.0 < ratio < 4.5  # yolov8s is about 3.5x yolov8n's MACs


def test_uncached_stages():
    pipeline = yaml.safe_load("""
stages:
  baseline:
    cmd: python stages/baseline.py
    outs:
      - models/baseline.pt
      - runs/baseline: {persist: true, cache: false}
  prune:
    cmd: python stages/prune.py
    outs: [models/pruned.pt]
    metrics:
      - metrics/prune.json: {cache: false}
  benchmark:
    cmd: python stages/benchmark.py
    outs:
      - metrics/benchmark_full.json: {cache: false}
""")
    assert study.uncached_stages(pipeline) == ["baseline"]
    assert study.uncached_stages({}) == []


# --- parsing DVC ----------------------------------------------------------------------------------------------------

def test_parse_exp_show_fixture(records):
    by = {r.name: r for r in records}
    assert set(by) == {"study-v8n-lamp-2x", "pr-ci2", "study-v8n-lamp-3x", "study-v8n-bn_scale-2x",
                       "study-11n-lamp-2x", "study-26n-lamp-2x"}
    assert {n: r.state for n, r in by.items()} == {
        "study-v8n-lamp-2x": "done", "pr-ci2": "done", "study-v8n-lamp-3x": "success",
        "study-v8n-bn_scale-2x": "failed", "study-11n-lamp-2x": "running", "study-26n-lamp-2x": "queued"}
    done = by["study-v8n-lamp-3x"]
    assert done.finished and not done.pending
    assert done.params["speed_up"] == 3 and done.params["baseline"]["epochs"] == 40
    bench = done.metrics["metrics/benchmark.json"]
    assert bench["macs_speed_up"] == pytest.approx(3.012, abs=1e-3)
    assert set(done.metrics) == {"metrics/baseline.json", "metrics/prune.json", "metrics/finetune.json",
                                 "metrics/benchmark.json"}
    assert re.fullmatch(r"[0-9a-f]{32}", done.outs["models/baseline.pt"])
    failed = by["study-v8n-bn_scale-2x"]
    assert not failed.finished and failed.error == "Experiment run failed" and failed.metrics == {}
    assert failed.task_id.startswith("6b9d2bb") and failed.log.endswith(".out")
    running = by["study-11n-lamp-2x"]
    assert running.pending and not running.finished and running.rev == running.task_id
    assert {r.baseline for r in records} == {by["pr-ci2"].baseline} and len(done.baseline) == 40


def test_parse_exp_show_rejects_other_shapes():
    with pytest.raises(YoloPruneError, match="no JSON"):
        study.parse_exp_show("ERROR: not a dvc repository")
    with pytest.raises(YoloPruneError, match="DVC 3"):
        study.parse_exp_show({"workspace": {"baseline": {}}})  # DVC 2's dict of revisions
    assert study.parse_exp_show("WARNING: something\n[]") == []


def test_parse_queue_status():
    status = study.parse_queue_status(QUEUE_STATUS)
    assert status.workers == 1
    assert status.names("queued", "running") == {"study-11n-lamp-2x", "study-26n-lamp-2x"}
    assert status.names("failed") == {"study-v8n-bn_scale-2x"}
    empty = study.parse_queue_status("Task  Name  Created  Status\n\nWorker status: 0 active, 0 idle\n")
    assert empty.tasks == [] and empty.workers == 0


def test_plan_queue_resumes(experiments, records):
    plan = study.plan_queue(experiments, records, profile=FIXTURE_PROFILE)
    queued = [e.name for e in plan.to_queue]
    assert "v8n-lamp-2x" not in queued and "v8n-lamp-3x" not in queued  # done with these params
    assert "11n-lamp-2x" not in queued and "26n-lamp-2x" not in queued  # running, queued
    assert "v8n-bn_scale-2x" in queued and plan.remove == [next(r.task_id for r in records if r.state == "failed")]
    # 11n-lamp-3x and 26n-lamp-3x wait for the baseline their running and queued 2x experiments train.
    assert sorted(plan.waiting) == ["11n-lamp-3x", "26n-lamp-3x"]
    assert len(queued) == len(experiments) - 6 and plan.stale == []
    assert queued[0] == "v8s-lamp-to-v8n"  # it trains its baseline: ahead of those whose baseline is trained
    assert queued[1:] == [e.name for e in experiments if e.name in queued[1:]]  # sweep order kept
    # Run with other params than the sweep's now: queued again, the old result to be removed.
    changed = study.plan_queue(experiments, records, profile={**FIXTURE_PROFILE, "baseline.epochs": 80})
    finished = {r.name.removeprefix(study.PREFIX): r.rev for r in records if r.finished and r.name in
                {e.dvc_name for e in experiments}}
    assert set(finished) == {"v8n-lamp-2x", "v8n-lamp-3x"} and sorted(changed.stale) == sorted(finished.values())
    # The new baseline is trained once: by the first v8n experiment; the other v8n ones wait for it.
    assert "v8n-lamp-2x" in [e.name for e in changed.to_queue] and "v8n-lamp-3x" in changed.waiting
    assert not {e.name for e in changed.to_queue} & {"v8n-lamp-1.5x", "v8n-l1-2x", "v8n-lamp-2x-r16"}
    # An older run of a name with other params (an earlier PROFILE) beside a current one: done, nothing stale.
    done = next(r for r in records if r.name == "study-v8n-lamp-3x")
    older = dataclasses.replace(done, rev="f" * 40, params={**done.params, "baseline": {"epochs": 80}})
    both = study.plan_queue(experiments, [*records, older], profile=FIXTURE_PROFILE)
    assert "v8n-lamp-3x" not in [e.name for e in both.to_queue] and both.stale == []
    alone = study.plan_queue(experiments, [r for r in records if r is not done] + [older], profile=FIXTURE_PROFILE)
    assert "v8n-lamp-3x" in [e.name for e in alone.to_queue] and alone.stale == ["f" * 40]
    # A name the queue holds for another commit is not queued twice.
    other = study.plan_queue(experiments, records, pending={"study-v8n-l1-2x"}, profile=FIXTURE_PROFILE)
    assert "v8n-l1-2x" not in [e.name for e in other.to_queue]


def test_ready_never_trains_one_baseline_twice(experiments):
    by_name = {e.name: e for e in experiments}
    profile = {**FIXTURE_PROFILE, "baseline.threads": 1}
    # Nothing run yet: one experiment per baseline, costliest first; the rest wait.
    cost = {"yolov8n.yaml": 1.0, "yolo11n.yaml": 3.0, "yolo26n.yaml": 2.0, "yolov8s.yaml": 4.0}
    first = study.ready(experiments, experiments, (), (), profile, cost=lambda e: cost[e.overrides["model"]])
    assert [e.name for e in first] == ["v8s-lamp-to-v8n", "11n-lamp-2x", "26n-lamp-2x", "v8n-lamp-2x"]
    # v8n's baseline trained: every v8n experiment is ready; 11n's is being trained: 11n-lamp-3x waits.
    rest = [e for e in experiments if e.name not in ("v8n-lamp-2x", "11n-lamp-2x")]
    now = study.ready(rest, experiments, {"study-v8n-lamp-2x"}, {"study-11n-lamp-2x"}, profile)
    names = [e.name for e in now]
    assert names[:2] == ["26n-lamp-2x", "v8s-lamp-to-v8n"] and "11n-lamp-3x" not in names  # trainers first
    assert set(names[2:]) == {e.name for e in rest if e.overrides["model"] == "yolov8n.yaml"}
    # What decides a baseline: the model and the baseline's settings, not the pruning or the fine-tune.
    key = study.baseline_key
    assert key(by_name["v8n-lamp-2x-ft20"], profile) == key(by_name["v8n-lamp-3x"], profile)
    assert key(by_name["v8n-lamp-2x"], profile) != key(by_name["11n-lamp-2x"], profile)
    seeds = {key(r, profile) for r in study.replicates()}
    assert len(seeds) == 5 and key(by_name["v8n-lamp-2x"], profile) not in seeds  # each seed: a baseline of its own
    assert key(study.budget_probe()[0], profile) != key(by_name["v8n-lamp-2x"], profile)  # another budget


def test_plan_queue_leaves_a_failed_baseline_alone_when_asked(experiments, records):
    failed = next(r for r in records if r.state == "failed")  # v8n-bn_scale-2x
    plan = study.plan_queue(experiments, records, profile=FIXTURE_PROFILE, retry_failed=False)
    assert failed.name.removeprefix(study.PREFIX) in plan.failed and plan.remove == []
    assert failed.name.removeprefix(study.PREFIX) not in [e.name for e in plan.to_queue]


def test_collect_and_missing(experiments, records):
    df = study.collect(records, experiments)
    assert list(df["experiment"]) == ["v8n-lamp-2x", "v8n-lamp-3x"]  # sweep order; pr-ci2 is not the study's
    row = df.iloc[1]
    assert row["family"] == "v8n" and row["target"] == 3 and row["round_to"] == 8 and row["ft_epochs"] == 5
    assert row["lat_speed_up"] == pytest.approx(row["lat_base"] / row["lat_ft"])
    assert row["retention"] == pytest.approx(100 * row["map_ft"] / row["map_base"])
    assert row["macs_base"] / row["macs_ft"] == pytest.approx(row["achieved"], rel=1e-6)
    # A result run with other settings than the sweep's now (a longer baseline) does not count; others' pass.
    assert study.matching(records, experiments, FIXTURE_PROFILE) == records
    longer = study.matching(records, experiments, {**FIXTURE_PROFILE, "baseline.epochs": 80})
    assert {r.name for r in records} - {r.name for r in longer} == {"study-v8n-lamp-2x", "study-v8n-lamp-3x"}
    assert study.collect(longer, experiments).empty
    gone = study.missing(records, experiments)
    assert gone["11n-lamp-2x"] == "running" and gone["26n-lamp-2x"] == "queued"
    assert gone["v8n-bn_scale-2x"] == "failed" and gone["v8n-l1-2x"] == "not queued"
    assert len(gone) == len(experiments) - 2  # all but the two finished


# --- Pareto front and targets -----------------------------------------------------------------------------------------

def test_pareto_front_with_ties():
    pts = {  # name: (latency ms, mAP50-95)
        "slow_best": (12.0, 0.70),
        "slow_worse": (12.0, 0.60),  # same latency, less accurate: dominated
        "mid": (10.0, 0.50),  # as accurate as "fast", slower: dominated
        "fast": (8.0, 0.50),
        "fast_twin": (8.0, 0.50),  # identical points do not dominate each other
        "fast_worse": (9.0, 0.40),
        "fastest": (5.0, 0.30),
        "unmeasured": (math.nan, 0.90),
    }
    front = dict(zip(pts, study.pareto_front([p[0] for p in pts.values()], [p[1] for p in pts.values()])))
    assert {n for n, on in front.items() if on} == {"slow_best", "fast", "fast_twin", "fastest"}
    assert study.pareto_front([], []) == []


def _row(name: str, model: str = study.V8N, method: str = "lamp", target: float = 2.0, *, round_to: int = 8,
         ft: int = 5, map_ft: float = 0.78, lat_ft: float = 5.5, achieved: float | None = None,
         map_base: float = 0.80, lat_base: float = 10.0, md5: str = "a" * 32, tail: float = math.nan) -> dict:
    achieved = target * 1.005 if achieved is None else achieved
    return {"experiment": name, "rev": "0" * 40, "timestamp": "2026-01-01T00:00:00", "baseline_md5": md5,
            "model": model, "method": method, "target": target, "imgsz": 160, "round_to": round_to, "ft_epochs": ft,
            "base_epochs": 40, "map_base": map_base, "map_pruned": 0.2, "map_ft": map_ft,
            "retention": 100 * map_ft / map_base, "params_base": 3.0e6, "params_ft": 3.0e6 / target,
            "macs_base": 2.0e8, "macs_ft": 2.0e8 / achieved, "achieved": achieved, "lat_base": lat_base,
            "lat_ft": lat_ft, "lat_speed_up": lat_base / lat_ft, "parity": 2e-7, "ft_epochs_run": ft,
            "base_epochs_run": 40, "base_tail": tail, "family": study.family(model)}


def test_check_targets():
    df = pd.DataFrame([
        _row("at-the-bar", map_ft=0.776, lat_ft=10 / 1.7),  # 97.0 %, 1.70x: met exactly
        _row("short-3x", target=3.0, map_ft=0.732, lat_ft=4.0, achieved=3.075),  # 91.5 %, 2.5x, MACs +2.5 %
        _row("mild", target=1.5, lat_ft=8.0),  # no bar at 1.5x: only the MACs check
    ])
    checks = study.check_targets(df)
    got = {(c.experiment, c.criterion): (c.met, c.gap) for c in checks.itertuples()}
    assert len(got) == 7
    assert got[("at-the-bar", "mAP50-95 retention")][0] and got[("at-the-bar", "latency speed-up")][0]
    assert got[("at-the-bar", "mAP50-95 retention")][1] == pytest.approx(0, abs=1e-9)
    met, gap = got[("short-3x", "mAP50-95 retention")]
    assert not met and gap == pytest.approx(91.5 - 93)
    assert got[("short-3x", "latency speed-up")] == (True, pytest.approx(0.1))
    met, gap = got[("short-3x", "MACs speed-up error")]
    assert not met and gap == pytest.approx(0.02 - 0.025)
    assert got[("mild", "MACs speed-up error")] == (True, pytest.approx(0.015))


def _table() -> tuple[pd.DataFrame, list[dict]]:
    rows = [
        _row("v8n-lamp-2x", map_ft=0.784, lat_ft=5.6, tail=0.004),
        _row("v8n-lamp-1.5x", target=1.5, map_ft=0.795, lat_ft=7.2, tail=0.004),
        _row("v8n-lamp-3x", target=3.0, map_ft=0.73, lat_ft=4.2),
        _row("v8n-l1-2x", method="l1", map_ft=0.77, lat_ft=5.5, achieved=2.004),
        _row("v8n-lamp-2x-r1", round_to=1, map_ft=0.786, lat_ft=6.4, achieved=2.006),
        _row("v8n-lamp-2x-r16", round_to=16, map_ft=0.781, lat_ft=5.3, achieved=2.012),
        _row("v8n-lamp-2x-ft3", ft=3, map_ft=0.75, lat_ft=5.7),
        _row("v8n-lamp-3x-ft20", target=3.0, ft=20, map_ft=0.76, lat_ft=4.2),
        _row("11n-lamp-2x", model=study.V11N, map_ft=0.75, lat_ft=6.5, map_base=0.79, lat_base=12.0, md5="b" * 32,
             tail=0.021),
        _row("v8s-lamp-to-v8n", model=study.V8S, target=3.517, map_ft=0.83, lat_ft=11.0, map_base=0.86,
             lat_base=30.0, md5="c" * 32),
        _row("v8n-lamp-2x-seed1", map_ft=0.77, lat_ft=5.7, achieved=2.008, map_base=0.81, lat_base=10.2, md5="d" * 32),
    ]
    controls = [{"name": "v8n-control", "source": "v8n-lamp-2x", "family": "v8n", "baseline_map50_95": 0.80,
                 "map50_95": 0.805, "latency_ms": 10.1, "epochs": 5, "baseline_md5": "a" * 32}]
    return pd.DataFrame(rows), controls


def test_control_retention():
    df, controls = _table()
    out = study.with_control(df, controls)
    by = out.set_index("experiment")
    assert by.loc["v8n-lamp-2x", "retention_ctrl"] == pytest.approx(100 * 0.784 / 0.805)
    assert math.isnan(by.loc["v8n-lamp-2x-ft3", "retention_ctrl"])  # 3 epochs: not the control's budget
    assert math.isnan(by.loc["11n-lamp-2x", "retention_ctrl"])  # another baseline
    # A control that found nothing (mAP 0: a model trained too little) gives no retention, not a crash or infinity.
    blind = [{**c, "map50_95": 0.0} for c in controls]
    assert math.isnan(study.with_control(df, blind).set_index("experiment").loc["v8n-lamp-2x", "retention_ctrl"])
    bt = study.budget_table(df, df.iloc[:0], blind)
    assert (bt["map_ctrl"] == 0).any() and bt["retention_ctrl"].isna().all()  # the 0 reached the division
    assert study.percent(1.0, 4.0) == 25.0 and math.isnan(study.percent(1.0, math.nan))


def test_report_writes_markdown_and_png(tmp_path):
    df, controls = _table()
    ctx = study.Context(commit="abc123def456", commands=["dvc exp run --queue --name study-x -S speed_up=2.0"],
                        machine={"cpu": "AMD EPYC", "cores_logical": 2}, versions={"torch": "2.14.1"},
                        measured_by="As recorded:", missing={"26n-lamp-2x": "queued"})
    md, png = study.write_report(df, controls, ctx, tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = md.read_text()
    for needle in ("![mAP50-95 after fine-tuning vs ONNX Runtime CPU latency](results.png)", "`abc123def456`",
                   "| v8s-lamp-to-v8n |", "**missed**", "dvc exp run --queue --name study-x", "| AMD EPYC |",
                   "| 26n-lamp-2x | queued |", "| v8n-control | v8n-lamp-2x | 5 |"):
        assert needle in text, needle
    # The reading is computed: the front, the frontier verdict, the budget series, the remedy, the control.
    front = re.search(r"\*\*Pareto front\.\*\* (.*)", text).group(1)
    assert "v8n-lamp-3x-ft20 (4.20 ms" in front and "v8s-lamp-to-v8n (11.00 ms, mAP50-95 0.830)" in front
    assert "v8n-lamp-3x (" not in front  # as fast as lamp-3x-ft20, less accurate
    assert "v8n-l1-2x" not in front  # slower than lamp-2x-r16 (5.3 ms, 0.781) and less accurate
    assert "worth it: more accurate" in text  # v8s pruned 0.830 vs v8n from scratch 0.800
    assert "Retention at 2× by fine-tune epochs: 0: 25.0 %, 3: 93.8 %, 5: 98.0 %." in text
    assert "moved retention: v8n 91.2 % -> 95.0 % (+3.8 pt, 5 -> 20 epochs)." in text
    assert "0.800 -> 0.805 (+0.005: the baseline had plateaued)" in text
    curves = re.search(r"\*\*Baseline curves\.\*\* (.*)", text).group(1)  # one entry per baseline with a curve
    assert ("v8n (v8n-lamp-2x) +0.004 after 40 epochs; 11n (11n-lamp-2x) +0.021 after 40 epochs (still rising). "
            "1 of 2 baselines rose less than 0.01") in curves
    assert "the method is lamp" in text and "round_to is 16" in text
    assert "fewest fine-tune epochs keeping ≥ 97 % at 2×\" the fine-tune is 5 epochs" in text  # 3: 93.8 %
    assert "the highest latency speed-up at 3× was v8n-lamp-3x's 2.38×" in text  # 10 / 4.2; ft20 ties, first wins
    assert "the highest retention at 2× was v8n-lamp-2x-r1's 98.2 %" in text
    # v8n-lamp-2x and -ft3 prune to the same widths (5.6 and 5.7 ms); -3x and -3x-ft20 too (4.2 ms both)
    assert "timed up to 1.8% apart (2 such group(s))" in text
    # The spread of v8n-lamp-2x over its two runs (the sweep's, seed 1): mean ± sample sd, and what it makes noise.
    assert ("v8n-lamp-2x over 2 runs: baseline mAP50-95 0.805 ± 0.007 (0.800 to 0.810), fine-tuned mAP50-95 "
            "0.777 ± 0.010 (0.770 to 0.784)") in text
    tol = 3 * math.sqrt(2) * math.hypot(0.784 - 0.777, 0.77 - 0.777)  # sample sd of two runs: their hypot to the mean
    assert f"per model family): v8n {tol:.3f} fine-tuned mAP50-95, {3 * math.sqrt(2) * 0.01 / math.sqrt(2):.3f}" in text
    assert "| v8n-lamp-2x-seed1 | 0.810 | 0.770 | 95.1 % |" in text and "| **sd** (v8n-lamp-2x) | 0.007 | 0.010 |" in text
    spread = pd.read_csv(tmp_path / "study" / "spread.csv").set_index("figure")
    assert set(spread["group"]) == {"v8n-lamp-2x"}  # 11n-lamp-2x has no replicate in the table: no spread
    assert spread.loc["map_ft", "n"] == 2 and spread.loc["map_ft", "sd"] == pytest.approx(0.014 / math.sqrt(2))
    points = json.loads((tmp_path / "study" / "points.json").read_text())
    assert {p["kind"] for p in points} == {"pruned", "baseline", "control"} and len(points) == 11 + 3 + 1
    assert len(pd.read_csv(tmp_path / "study" / "experiments.csv")) == len(df)
    assert not list(tmp_path.rglob("*.tmp"))  # written atomically, nothing left behind


def test_report_reads_the_budget_probe(tmp_path):
    df, controls = _table()  # the sweep's rows: 40-epoch baselines; v8n-control gains +0.005
    probe = pd.DataFrame([
        {**_row("v8n-lamp-2x-e60", map_ft=0.77, map_base=0.70, md5="e" * 32), "base_epochs": 20},
        {**_row("11n-lamp-2x-e60", model=study.V11N, map_ft=0.72, map_base=0.70, md5="f" * 32), "base_epochs": 20},
        {**_row("26n-lamp-2x-e60", model=study.V26N, map_ft=0.70, map_base=0.72, md5="9" * 32), "base_epochs": 20},
    ])
    probe_controls = [
        {"name": "v8n-control-e60", "source": "v8n-lamp-2x-e60", "family": "v8n", "baseline_map50_95": 0.70,
         "map50_95": 0.75, "latency_ms": 10.0, "epochs": 5, "baseline_md5": "e" * 32},
        {"name": "11n-control-e60", "source": "11n-lamp-2x-e60", "family": "11n", "baseline_map50_95": 0.60,
         "map50_95": 0.65, "latency_ms": 12.0, "epochs": 5, "baseline_md5": "0" * 32},  # another baseline's
        {"name": "26n-control-e60", "source": "26n-lamp-2x-e60", "family": "26n", "baseline_map50_95": 0.72,
         "map50_95": 0.69, "latency_ms": 12.0, "epochs": 5, "baseline_md5": "9" * 32},  # lower: no gain either
    ]
    md, _ = study.write_report(df, controls, study.Context(commit="abc"), tmp_path, probe, probe_controls)
    text = md.read_text()
    assert ("v8n: baseline 0.700 -> 0.800 (+0.100) from 20 to 40 epochs; then +0.050 from 5 more epochs (still "
            "gaining) at 20, +0.005 from 5 more epochs (a plateau) at 40; 2× retention 110.0 % -> 98.0 %, against the "
            "control 102.7 % -> 97.4 %") in text  # the short baseline flatters retention
    assert ("11n: baseline 0.700 -> 0.790 (+0.090) from 20 to 40 epochs; then its control not run yet at 20, its "
            "control not run yet at 40; 2× retention 102.9 % -> 94.9 %;") in text
    assert ("26n: baseline 0.720 after 20 epochs, then -0.030 from 5 more epochs (a plateau); 2× retention 97.2 %."
            in text)  # no sweep row to compare with
    assert "With the study's 120-epoch baselines, 1 of 1 controls gained less than 0.01 mAP50-95" in text
    assert "| v8n-lamp-2x-e60 | 20 | 0.700 | 0.750 | +0.050 | 0.770 | 110.0 % | 102.7 % |" in text
    table = pd.read_csv(tmp_path / "study" / "budget.csv")
    assert list(table["experiment"]) == ["v8n-lamp-2x-e60", "v8n-lamp-2x", "11n-lamp-2x-e60", "11n-lamp-2x",
                                         "26n-lamp-2x-e60"]
    assert table["ctrl_gain"].round(3).tolist()[:2] == [0.05, 0.005] and table["ctrl_gain"].isna().tolist()[2:4] == [
        True, True]
    # Without the probe, the section says what is missing.
    md, _ = study.write_report(df, controls, study.Context(commit="abc"), tmp_path / "none")
    assert "Not measured yet (v8n-lamp-2x-e60, 11n-lamp-2x-e60, 26n-lamp-2x-e60 unfinished)." in md.read_text()


def test_report_without_results(tmp_path, experiments, records):
    empty = study.collect([], experiments)
    md, png = study.write_report(empty, [], study.Context(missing=study.missing(records, experiments)), tmp_path)
    text = md.read_text()
    assert f"0 of {len(experiments) - 2} experiments finished" in text and "Not measured yet" in text and png.is_file()
    assert "**Baseline curves.** No baseline curve recorded yet" in text


def test_interleaved_medians_times_every_runner_in_rounds():
    import time

    calls: list[str] = []
    alive: list[int] = []  # runners that exist now: one at a time

    class Runner:
        def __init__(self, key: str, seconds: float) -> None:
            self.key, self.seconds = key, seconds
            alive.append(1)
            assert len(alive) == 1, "a runner was built while another one existed"

        def __call__(self) -> None:
            calls.append(self.key)
            time.sleep(self.seconds)

        def __del__(self) -> None:
            alive.pop()

    got = study.interleaved_rounds({"slow": lambda: Runner("slow", 0.004), "fast": lambda: Runner("fast", 0.001)},
                                   rounds=3, iters=2, warmup=1)
    # Every other round in reverse: a model and its neighbour share the same stretches of the CPU.
    assert calls == ["slow"] * 3 + ["fast"] * 3 + ["fast"] * 3 + ["slow"] * 3 + ["slow"] * 3 + ["fast"] * 3
    assert len(got["slow"]) == len(got["fast"]) == 3 and not alive
    assert all(s_ > f for s_, f in zip(got["slow"], got["fast"])) and got["slow"][0] == pytest.approx(4, abs=3)


def test_paired_speed_up_cancels_a_cpu_that_changes_speed_between_rounds():
    # The CPU runs at half speed in the middle round: both models slow alike, the ratio holds at 2.
    base, pruned = [10.0, 20.0, 10.2], [5.0, 10.0, 5.1]
    assert study.paired_speed_up(base, pruned) == pytest.approx(2.0)
    # A slow stretch that caught the baseline alone in round 2, both in round 3: each model's median alone says
    # 20 / 5 = 4; the rounds' ratios (2, 4, 2) say 2, what two rounds of three saw.
    assert study.paired_speed_up([10.0, 20.0, 20.0], [5.0, 5.0, 10.0]) == pytest.approx(2.0)
    with pytest.raises(YoloPruneError, match="as many rounds"):
        study.paired_speed_up([1.0, 2.0], [1.0])


def test_with_latency_replaces_the_stage_timings():
    df, controls = _table()
    df["onnx_base"], df["onnx_ft"] = "base-md5", [f"ft-{i}" for i in range(len(df))]
    df.loc[df["experiment"] == "11n-lamp-2x", "onnx_base"] = "other-base"
    record = {"median_ms": {"base-md5": 8.0, "other-base": 9.0, **{f"ft-{i}": 4.0 + i for i in range(len(df))}}}
    out = study.with_latency(df, record).set_index("experiment")
    assert out.loc["v8n-lamp-2x", "lat_base"] == 8.0 and out.loc["v8n-lamp-2x", "lat_ft"] == 4.0
    assert out.loc["v8n-lamp-2x", "lat_speed_up"] == pytest.approx(2.0)
    assert out.loc["v8n-lamp-2x", "lat_ft_stage"] == 5.6  # the benchmark stage's own figure, kept beside it
    assert out.loc["11n-lamp-2x", "lat_base"] == 9.0
    assert study.control_latency(controls, study.with_latency(df, record))[0]["latency_ms"] == 8.0  # its baseline's
    assert study.control_latency([{"name": "c", "source": "missing", "latency_ms": 1.0}], df)[0]["latency_ms"] == 1.0
    # With the rounds recorded, the speed-up pairs them: round by round, not median over median.
    rounds = {"base-md5": [8.0, 16.0, 8.0], "ft-0": [4.0, 8.0, 4.4]}
    paired = study.with_latency(df, {**record, "round_ms": rounds}).set_index("experiment")
    assert paired.loc["v8n-lamp-2x", "lat_speed_up"] == pytest.approx(2.0)  # ratios 2, 2, 1.82: their median
    assert paired.loc["v8n-lamp-2x", "lat_base"] == 8.0  # the medians stay the record's
    assert paired.loc["v8n-lamp-1.5x", "lat_speed_up"] == pytest.approx(8.0 / 5.0)  # no rounds of ft-1: medians


def test_only_results_of_heads_pipeline_count(tmp_path):
    """An experiment run from a commit whose stage code differs from HEAD's is not a result of this code."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    (tmp_path / "stages").mkdir()
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "prune": {"cmd": "python stages/prune.py", "deps": ["stages/prune.py", "models/converted.pt"],
                  "outs": ["m.pt"], "metrics": [{"metrics/prune.json": {"cache": False}}]},
        "benchmark": {"cmd": "true", "deps": ["metrics/prune.json", "m.pt"]}}}))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "prune.json").write_text('{"speed_up": 2.0}\n')  # a result, committed to git
    (tmp_path / "params.yaml").write_text("speed_up: 2\n")
    (tmp_path / "stages" / "prune.py").write_text("v = 1\n")
    (tmp_path / "README.md").write_text("a\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "one")
    old = git("rev-parse", "HEAD")
    (tmp_path / "README.md").write_text("b\n")  # not a pipeline file: results stay valid
    git("commit", "-qam", "docs")
    docs = git("rev-parse", "HEAD")
    assert study.pipeline_files(tmp_path) == ["dvc.yaml", "params.yaml", "stages/prune.py"]
    (tmp_path / "stages" / "prune.py").write_text("v = 2\n")  # the stage's code changed: old results are stale
    git("commit", "-qam", "code")
    head = git("rev-parse", "HEAD")
    recs = [study.ExpRecord(name=f"study-{rev[:4]}", rev="f" * 40, baseline=rev, state=study.DONE)
            for rev in (old, docs, head)]
    assert [r.baseline for r in study.current(recs, tmp_path)] == [head]
    (tmp_path / "README.md").write_text("c\n")
    (tmp_path / "metrics" / "prune.json").write_text('{"speed_up": 2.01}\n')  # a new run's result: not code
    git("commit", "-qam", "docs and metrics")
    assert [r.baseline for r in study.current(recs, tmp_path)] == [head]


def test_retime_times_each_file_once_and_reuses_the_record(tmp_path, monkeypatch):
    import onnx
    from onnx import TensorProto, helper

    monkeypatch.setattr(study, "WORK_DIR", tmp_path / "work")
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 32, 32])
    graph = helper.make_graph([helper.make_node("Relu", ["images"], ["out"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for md5 in ("base", "ft1", "ft2"):  # as if already fetched from DVC's cache
        (tmp_path / "work" / "onnx").mkdir(parents=True, exist_ok=True)
        onnx.save(model, tmp_path / "work" / "onnx" / f"{md5}.onnx")
    df = pd.DataFrame([{"rev": "0" * 40, "imgsz": 32, "onnx_base": "base", "onnx_ft": "ft1"},
                       {"rev": "0" * 40, "imgsz": 32, "onnx_base": "base", "onnx_ft": "ft2"}])
    record = study.retime(df, out_dir=tmp_path / "docs", threads=1, rounds=2, iters=3, warmup=1)
    assert set(record["median_ms"]) == {"base", "ft1", "ft2"} and all(v > 0 for v in record["median_ms"].values())
    assert {k: len(v) for k, v in record["round_ms"].items()} == {"base": 2, "ft1": 2, "ft2": 2}
    assert record["median_ms"]["ft1"] == pytest.approx(sum(record["round_ms"]["ft1"]) / 2)  # two rounds' median
    assert "torch_cpu_capability" in record["machine"]
    assert record["settings"] == {"threads": 1, "rounds": 2, "iters": 3, "warmup": 1, "batch": 1}
    saved = json.loads((tmp_path / "docs" / "study" / "latency.json").read_text())
    assert saved["median_ms"] == record["median_ms"] and "machine" in saved
    (tmp_path / "work" / "onnx" / "ft2.onnx").unlink()  # the same files and settings: the record is reused
    assert study.retime(df, out_dir=tmp_path / "docs", threads=1, rounds=2, iters=3, warmup=1) == saved


def test_dead_tasks_are_running_tasks_whose_process_is_gone(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process now
    run = tmp_path / ".dvc" / "tmp" / "exps" / "run"

    def record(task: str, info: dict | str) -> Path:
        (run / task).mkdir(parents=True)
        path = run / task / f"{task}.json"
        path.write_text(info if isinstance(info, str) else json.dumps(info))
        return path

    record("aaa111ff", {"pid": gone.pid, "returncode": None})  # killed with its worker
    record("bbb222ff", {"pid": os.getpid(), "returncode": None})  # alive, started before its record was written
    reused = record("ccc333ff", {"pid": os.getpid(), "returncode": None})
    os.utime(reused, (0, 0))  # recorded long before this process started: the pid was taken again
    record("ddd444ff", {"pid": gone.pid, "returncode": 0})  # finished normally
    record("eee555ff", "{trunc")  # being written
    record("fff666aa", {"pid": gone.pid, "returncode": None})
    record("fff666bb", {"pid": gone.pid, "returncode": None})  # "fff666" names two tasks: neither is known dead
    ids = ["aaa111", "bbb222", "ccc333", "ddd444", "eee555", "fff666", "ggg777", "fff666aa"]
    assert study.dead_tasks(ids, tmp_path) == {"aaa111", "ccc333", "fff666aa"}


def test_wait_does_not_wait_for_a_dead_task(monkeypatch, experiments):
    # A dead "Running" task and its live re-queued twin share a name: the twin is waited for, the dead one is not.
    polls = iter([
        study.QueueStatus([("aaa1111", "study-v8n-lamp-2x", "Running"), ("bbb2222", "study-v8n-lamp-2x", "Queued")], 0),
        study.QueueStatus([("aaa1111", "study-v8n-lamp-2x", "Running"),
                           ("bbb2222", "study-v8n-lamp-2x", "Success")], 1),
    ])
    calls = []
    monkeypatch.setattr(study, "queue_status", lambda repo=".": next(polls))
    monkeypatch.setattr(study, "dead_tasks", lambda ids, repo=".": {"aaa1111"} & set(ids))
    monkeypatch.setattr(study, "dvc", lambda *argv, **kw: calls.append(argv))
    monkeypatch.setattr(study, "experiments_in", lambda repo=".": [])
    monkeypatch.setattr(study, "queue", lambda exps, repo=".", retry_failed=True: study.QueuePlan([], [], [], []))
    assert study.wait(experiments, poll_s=0) == []
    assert calls == [("queue", "start", "-j", "2")]  # the workers start: the dead task does not count as running
    with pytest.raises(StopIteration):
        next(polls)  # returned on the second poll, when only the dead task was left "Running"


def test_wait_queues_what_a_finished_baseline_unblocks(monkeypatch, experiments):
    a, b = "study-v8n-lamp-2x", "study-v8n-lamp-3x"
    polls = iter([
        study.QueueStatus([("aaa1111", a, "Running")], 1),
        study.QueueStatus([("aaa1111", a, "Running")], 1),  # nothing finished: no `queue` call
        study.QueueStatus([("aaa1111", a, "Success")], 1),  # v8n's baseline trained: v8n-lamp-3x queued
        study.QueueStatus([("aaa1111", a, "Success"), ("bbb2222", b, "Running")], 1),
        study.QueueStatus([("aaa1111", a, "Success"), ("bbb2222", b, "Success")], 0),
    ])
    plans = iter([
        study.QueuePlan([], [], [], [], waiting=["v8n-lamp-3x"]),
        study.QueuePlan([by for by in experiments if by.dvc_name == b], [], [], []),  # none waits any more
    ])
    queue_calls, calls = [], []
    monkeypatch.setattr(study, "queue_status", lambda repo=".": next(polls))
    monkeypatch.setattr(study, "dead_tasks", lambda ids, repo=".": set())
    monkeypatch.setattr(study, "dvc", lambda *argv, **kw: calls.append(argv))
    monkeypatch.setattr(study, "experiments_in", lambda repo=".": [])
    monkeypatch.setattr(study, "time", type("T", (), {"sleep": staticmethod(lambda s: None)}))

    def fake_queue(exps, repo=".", retry_failed=True):
        queue_calls.append(retry_failed)
        return next(plans)

    monkeypatch.setattr(study, "queue", fake_queue)
    assert study.wait(experiments, poll_s=0) == []
    assert queue_calls == [False, False]  # the first poll and after one finished; failed ones are left alone
    assert calls == []  # a worker runs throughout: none started
    with pytest.raises(StopIteration):
        next(polls)


def test_queue_replaces_a_stale_result_without_forcing_a_rerun(monkeypatch, experiments, records):
    # `dvc exp run --force` would re-run every stage past the run cache (each baseline trained again): the stale
    # result is removed first, and the experiment queued plainly.
    calls = []
    monkeypatch.setattr(study, "experiments_in", lambda repo=".": records)
    monkeypatch.setattr(study, "current", lambda recs, repo=".": list(recs))
    monkeypatch.setattr(study, "dead_tasks", lambda ids, repo=".": set())
    monkeypatch.setattr(study, "dvc", lambda *argv, **kw: calls.append(argv))
    monkeypatch.setattr(study, "PROFILE", {**FIXTURE_PROFILE, "baseline.epochs": 80})
    stale = {r.name: r for r in records if r.finished and r.name in {e.dvc_name for e in experiments}}
    assert len(stale) == 2
    head = stale["study-v8n-lamp-2x"].baseline
    monkeypatch.setattr(study, "head_commit", lambda repo=".": head)
    plan = study.queue(experiments)
    assert sorted(plan.stale) == sorted(r.rev for r in stale.values())
    removed = [c for c in calls if c[:2] == ("exp", "remove")]  # by name, those whose baseline is HEAD
    assert removed == [("exp", "remove", *sorted(n for n, r in stale.items() if r.baseline == head))]
    runs = [c for c in calls if c[:2] == ("exp", "run")]
    assert len(runs) == len(plan.to_queue) and not any("--force" in c or "-f" in c for c in runs)
    assert calls.index(removed[0]) < calls.index(runs[0])
    calls.clear()  # a stale result on an older commit is not removed (DVC resolves names on HEAD only)
    monkeypatch.setattr(study, "head_commit", lambda repo=".": "f" * 40)
    study.queue(experiments)
    assert not [c for c in calls if c[:2] == ("exp", "remove")]


def test_report_names_every_commit_the_experiments_ran_from():
    assert study._commits("abc123") == "commit `abc123`"
    assert study._commits("abc123, def456").startswith("commits `abc123`, `def456` (the same pipeline files")


def test_compare_runs_flags_what_moved_beyond_noise(tmp_path, capsys):
    first, _ = _table()
    second = first.copy()
    at = second["experiment"].eq
    second.loc[at("v8n-lamp-2x"), "map_ft"] += 0.005  # within 0.01
    second.loc[at("v8n-lamp-3x"), "map_ft"] -= 0.03  # beyond
    second.loc[at("11n-lamp-2x"), "lat_speed_up"] *= 1.15  # beyond 10 %
    second.loc[at("v8n-l1-2x"), "lat_speed_up"] *= 1.05  # within
    second.loc[at("v8n-lamp-1.5x"), "lat_speed_up"] = math.nan  # the second run lacks the figure
    second.loc[at("v8n-lamp-2x-r1"), "base_epochs"] = 60  # not the same experiment any more
    second = second[second["experiment"] != "v8s-lamp-to-v8n"]
    table = study.compare_runs(first, second)
    moved = {(r.experiment, r.figure) for r in table.itertuples() if not r.within}
    r1 = {("v8n-lamp-2x-r1", f) for f in ("settings", *(label for label, _ in study.COMPARED.values()))}
    assert moved == {("v8n-lamp-3x", "fine-tuned mAP50-95"), ("11n-lamp-2x", "latency speed-up"),
                     ("v8n-lamp-1.5x", "latency speed-up"), *r1}
    assert len(table) == 5 * (len(first) - 1) + 1  # five figures of each experiment both runs have, one settings row
    row = table[(table["experiment"] == "11n-lamp-2x") & (table["figure"] == "latency speed-up")].iloc[0]
    assert row["diff"] == pytest.approx(0.15) and row["tol"] == study.LATENCY_TOL
    md = study.comparison_md(first, second, table)
    n = len(table)
    assert md.startswith(f"{n - 9} of {n} figures of {len(first) - 1} experiments agree within noise (baseline "
                         "mAP50-95 ±0.01, fine-tuned mAP50-95 ±0.01, retention % ±2 pt, MACs speed-up ±0.10%, "
                         "latency speed-up ±10.0%)")
    for needle in ("Only in the first run: v8s-lamp-to-v8n.", "v8n-lamp-3x fine-tuned mAP50-95 0.73 -> 0.7",
                   "v8n-lamp-2x-r1 settings differ (base_epochs 40 -> 60)", "| v8n-lamp-1.5x | latency speed-up |"):
        assert needle in md, needle
    assert not study.reproduced(first, second, table)
    # The CLI: a report folder or its csv on either side; exit 1 when anything moved or is missing, 0 when not.
    (tmp_path / "a" / "study").mkdir(parents=True)
    first.to_csv(tmp_path / "a" / "study" / "experiments.csv", index=False)
    second.to_csv(tmp_path / "b.csv", index=False)
    assert study.main(["compare", "--noise", "fixed", str(tmp_path / "a"), str(tmp_path / "b.csv")]) == 1
    assert "| 11n-lamp-2x | latency speed-up |" in capsys.readouterr().out
    assert study.main(["compare", str(tmp_path / "a"), str(tmp_path / "a" / "study" / "experiments.csv")]) == 0
    assert "agree within noise" in capsys.readouterr().out


def _seed_runs(map_ft: list[float], achieved: list[float]) -> pd.DataFrame:
    names = ["v8n-lamp-2x", *study.REPLICATE_GROUPS["v8n-lamp-2x"]][:len(map_ft)]
    return pd.DataFrame([_row(n, map_ft=m, achieved=a) for n, m, a in zip(names, map_ft, achieved)])


def test_seed_tolerances_are_three_sigma_of_a_two_run_difference():
    a = _seed_runs([0.70, 0.72, 0.74, 0.72], [2.00, 2.02, 2.04, 2.02])  # sd 0.01633; achieved: sd / mean 0.8165 %
    b = _seed_runs([0.60, 0.64], [2.0, 2.0])  # sd 0.02828, one degree of freedom
    sd_a = pd.Series([0.70, 0.72, 0.74, 0.72]).std()
    tol = study.seed_tolerances(a)
    assert tol["map_ft"] == pytest.approx(3 * math.sqrt(2) * sd_a)
    assert tol["achieved"] == pytest.approx(3 * math.sqrt(2) * sd_a / 2.02)  # relative to the mean, 2.02
    assert "map_base" in tol and tol["map_base"] == 0.0  # every seed run has the same baseline here: no spread
    pooled = study.seed_tolerances(a, b)["map_ft"]  # variances weighted by degrees of freedom: 3 and 1
    assert pooled == pytest.approx(3 * math.sqrt(2 * (3 * sd_a ** 2 + 0.04 ** 2 / 2) / 4))
    assert study.seed_tolerances(a.iloc[:1]) == {} and study.seed_tolerances(pd.DataFrame()) == {}
    # Another generation's pair in the same table: its variance about its own mean, not the v8n runs' mean.
    pair = pd.DataFrame([_row(n, model=study.V26N, map_ft=m, map_base=0.5) for n, m in
                         (("26n-lamp-2x", 0.40), ("26n-lamp-2x-seed1", 0.44))])
    both = study.seed_tolerances(pd.concat([a, pair]))["map_ft"]
    assert both == pytest.approx(3 * math.sqrt(2 * (3 * sd_a ** 2 + 0.04 ** 2 / 2) / 4)) == pooled
    # Per family: each its own noise, not the pool's.
    per = study.family_tolerances(pd.concat([a, pair]))
    assert set(per) == {"v8n", "26n"} and per["v8n"]["map_ft"] == pytest.approx(tol["map_ft"])
    assert per["26n"]["map_ft"] == pytest.approx(3 * math.sqrt(2) * 0.04 / math.sqrt(2))
    assert set(study.seed_spread(pd.concat([a, pair]))["group"]) == {"v8n-lamp-2x", "26n-lamp-2x"}
    spread = study.seed_spread(a).set_index("figure")
    assert spread.loc["map_ft", "n"] == 4 and spread.loc["map_ft", "sd"] == pytest.approx(sd_a)
    assert spread.loc["map_ft", "min"] == 0.70 and spread.loc["map_ft", "max"] == 0.74
    assert not len(study.seed_spread(a[a["experiment"] != "v8n-lamp-2x"].iloc[:1]))  # one run: no spread


def test_measured_noise_widens_a_tolerance_never_narrows_it():
    first, _ = _table()
    second = first.copy()
    at = second["experiment"].eq
    second.loc[at("v8n-lamp-3x"), "map_ft"] -= 0.03
    second.loc[at("11n-lamp-2x"), "map_ft"] += 0.005
    fixed = study.compare_runs(first, second)
    wide = study.compare_runs(first, second, measured={"v8n": {"map_ft": 0.04, "map_base": 0.001}})
    def within(t, name):
        return bool(t[(t["experiment"] == name) & (t["figure"] == "fine-tuned mAP50-95")]["within"].iloc[0])
    assert not within(fixed, "v8n-lamp-3x") and within(wide, "v8n-lamp-3x")  # 0.03 < 0.04: noise, once measured
    assert within(wide, "11n-lamp-2x")  # +0.005: within the fixed 0.01; 11n has no measured noise of its own
    second.loc[at("11n-lamp-2x"), "map_ft"] += 0.03
    assert not within(study.compare_runs(first, second, measured={"v8n": {"map_ft": 0.04}}), "11n-lamp-2x")
    tols = wide.drop_duplicates("figure").set_index("figure")["tol"]
    assert tols["fine-tuned mAP50-95"] == 0.04 and tols["baseline mAP50-95"] == study.MAP_TOL  # never below fixed
    assert "fine-tuned mAP50-95 ±0.01 to ±0.04" in study.comparison_md(first, second, wide)  # v8n's and 11n's
    assert tols["latency speed-up"] == study.LATENCY_TOL
    basis = study.tolerance_basis({"v8n": {"map_ft": 0.04}}, first)
    assert "widened to 3 standard deviations" in basis and "v8n: fine-tuned mAP50-95 ±0.040" in basis
    assert "neither run holds two or more seed runs" in study.tolerance_basis({}, first, second)


def test_compare_cli_uses_the_seed_spread_and_names_the_machines(tmp_path, capsys):
    first = _seed_runs([0.70, 0.72, 0.74, 0.72], [2.0, 2.0, 2.0, 2.0])
    second = first.copy()
    second.loc[0, "map_ft"] = 0.75  # +0.05: beyond the fixed 0.01, within 3 sigma (0.067, pooled) of the measured noise
    for name, table, machine in (("a", first, {"cpu": "AMD EPYC", "cpu_id": "AuthenticAMD cpu family 25 model 1",
                                                "torch_cpu_capability": "AVX2"}),
                                 ("b", second, {"cpu": "AMD EPYC", "cpu_id": "AuthenticAMD cpu family 26 model 2",
                                                "torch_cpu_capability": "AVX512"})):
        (tmp_path / name / "study").mkdir(parents=True)
        table.to_csv(tmp_path / name / "study" / "experiments.csv", index=False)
        (tmp_path / name / "study" / "latency.json").write_text(json.dumps({"machine": machine}))
    out = tmp_path / "cmp" / "reproduction.md"
    out.parent.mkdir()
    args = [str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]
    assert study.main(["compare", *args]) == 0
    md = capsys.readouterr().out
    assert md == out.read_text() and md.startswith("20 of 20 figures of 4 experiments agree within noise")
    assert "Tolerances: the fixed ones, widened to 3 standard deviations" in md and "4 and 4 runs of v8n-lamp-2x, " in md
    va, vb = pd.Series([0.70, 0.72, 0.74, 0.72]).var(), pd.Series([0.75, 0.72, 0.74, 0.72]).var()
    assert f"v8n: fine-tuned mAP50-95 ±{3 * math.sqrt(2 * (va + vb) / 2):.3f}" in md  # pooled over both runs
    assert ("first run AMD EPYC, AuthenticAMD cpu family 25 model 1, AVX2; second run AMD EPYC, AuthenticAMD cpu "
            "family 26 model 2, AVX512. The machines differ") in md
    assert study.main(["compare", "--noise", "fixed", *args]) == 1  # the fixed 0.01 alone calls it a move
    assert "v8n-lamp-2x fine-tuned mAP50-95 0.7 -> 0.75" in capsys.readouterr().out
    # A run without one experiment: not reproduced, unless judged on the experiments both have.
    second[second["experiment"] != "v8n-lamp-2x-seed3"].to_csv(tmp_path / "b" / "study" / "experiments.csv",
                                                                index=False)
    assert study.main(["compare", *args]) == 1
    assert "Only in the first run: v8n-lamp-2x-seed3." in capsys.readouterr().out
    assert study.main(["compare", "--common", *args]) == 0
    assert "Judged on the experiments both runs have (`--common`)" in capsys.readouterr().out
    assert "Not recorded for both runs" in study.machines_compared({"cpu": "AMD EPYC"}, {"cpu": "AMD EPYC"})
    assert "differ" not in study.machines_compared({"cpu": "x", "cpu_id": "a", "torch_cpu_capability": "AVX2"},
                                                    {"cpu": "x", "cpu_id": "a", "torch_cpu_capability": "AVX2"})
    assert study.machine_of(tmp_path / "missing") == {}


def test_cpu_identity_reads_vendor_family_model_and_the_kernels(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                       "model name\t: AMD EPYC\nstepping\t: 1\n")
    got = study.cpu_identity(cpuinfo)
    assert got["cpu_id"] == "AuthenticAMD cpu family 26 model 2 stepping 1"
    import torch

    assert got["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "cpu_id" not in study.cpu_identity(tmp_path / "absent")


def test_compare_refuses_what_is_not_a_table(tmp_path, capsys):
    empty, header_only = tmp_path / "empty.csv", tmp_path / "header.csv"
    empty.write_text("")
    header_only.write_text(",".join(["experiment", *study.COMPARED]) + "\n")
    for bad, why in ((tmp_path / "missing", "no experiments table"), (empty, "unreadable experiments table")):
        assert study.main(["compare", str(bad), str(header_only)]) == 2
        assert why in capsys.readouterr().err
    assert study.main(["compare", str(header_only), str(header_only)]) == 1  # nothing compared: nothing reproduced
