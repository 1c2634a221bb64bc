"""The measured study (issue 9): a sweep of DVC experiments, collected into ``docs/results.md`` and its plot.

The sweep is data: ``sweep()`` lists the experiments, each a name and the ``-S``
overrides it gives ``dvc exp run``; ``PROFILE`` holds the overrides every experiment
shares (baselines trained to a plateau, steadier latency). Everything runs through the
project's own pipeline, so DVC's run cache shares work between experiments (each model's
dataset and baseline are computed once) and a finished stage is never computed twice::

    python -m yoloprune.study plan      # the experiments and the exact commands; runs nothing
    python -m yoloprune.study queue     # `dvc exp run --queue` each experiment not already queued or done
    python -m yoloprune.study run       # `dvc queue start -j 2`; queue the rest as baselines finish; wait
    python -m yoloprune.study control   # the equal-budget controls (baselines trained the fine-tune's epochs more)
    python -m yoloprune.study report    # docs/results.md, docs/results.png and docs/study/
    python -m yoloprune.study compare docs OTHER/docs   # two runs side by side: the same within noise?

``make study`` runs the five in order. It resumes: experiments already queued, running or
done are skipped, failed ones are queued again, and the queue workers run in the
background, so an interrupted ``make study`` (Ctrl-C, a closed terminal) loses nothing:
run it again to continue waiting. ``dvc queue stop --kill`` stops the workers themselves.
Two experiments run at once, each training on one thread (``JOBS``); an experiment is
queued only once its baseline is trained, or to train it, so no baseline is trained twice.
The report is generated from the experiments' metrics alone, prose included.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from copy import deepcopy
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from statistics import median
from typing import Any

import pandas as pd
import yaml

from yoloprune.curves import TAIL_WINDOW
from yoloprune.errors import YoloPruneError
from yoloprune.io import atomic_path, write_json
from yoloprune.params import SYNTHETIC, load_params

LOGGER = logging.getLogger("yoloprune")

PREFIX = "study-"  # DVC experiment names are PREFIX + Experiment.name: the study's, among everyone else's
OUT_DIR = Path("docs")  # results.md and results.png; the collected data under OUT_DIR / "study"
WORK_DIR = Path("runs/study")  # scratch space of the controls (git-ignored)

# Overrides every experiment gets, before its own: baselines trained to a plateau (issue 9: a 15-epoch baseline made
# a pruned model look 103 % as good), pinned here so that a quicker default in params.yaml cannot shorten them, and
# latency medians that hold still on a shared CPU. The controls check the plateau (see `_control`). Measured here:
# with 60 epochs, yolov8n's baseline scored 0.483 and 2x kept "102 %" of it; with 120, 0.570 and 92 % (the probe).
PROFILE: dict[str, Any] = {
    "baseline.epochs": 120,
    "baseline.threads": 1,  # one thread per training, JOBS trainings at once (see JOBS)
    "finetune.threads": 1,
    "benchmark.iters": 100,
    "benchmark.warmup": 10,
}
# Experiments run at once by the queue, each training on one thread. Measured here (2 cores, imgsz 160, batch 8, one
# AdamW step): two one-thread trainings side by side made 17 % (yolov8n), 32 % (yolo11n) and 6 % (yolov8s) more steps
# a second than one two-thread training, and the data loading, loss and Python work between the convolutions, which
# one process does on one core anyway, runs on both. An experiment is queued only once its baseline is trained, or to
# train it (see `ready`): two runs never train the same baseline.
JOBS = 2
# The params a baseline stage's result depends on (top-level keys and sections): experiments that agree on all of
# them share one baseline through DVC's run cache.
BASELINE_PARAMS = ("model", "data", "imgsz", "dataset", "baseline")

V8N, V8S, V11N, V26N = "yolov8n.yaml", "yolov8s.yaml", "yolo11n.yaml", "yolo26n.yaml"
DEFAULT_METHOD = "lamp"
SPEED_UPS = (1.5, 2.0, 3.0)  # with DEFAULT_METHOD on yolov8n
METHODS = ("l1", "random", "taylor", "bn_scale")  # at 2x, besides DEFAULT_METHOD
GENERATIONS = (V8N, V11N, V26N)  # each pruned to GENERATION_SPEED_UPS with DEFAULT_METHOD
GENERATION_SPEED_UPS = (2.0, 3.0)
ROUND_TOS = (1, 16)  # at 2x, besides params.yaml's prune.round_to (8)
FEW_EPOCHS, LONG_EPOCHS = 3, 20  # fine-tune budgets at 2x besides 0 (the pruned model) and params.yaml's
FRONTIER = (V8S, V8N)  # prune the first to the second's MACs; the second trained from scratch is the rival
# Each generation's 2x experiment again with these training seeds (the sweep's run has params.yaml's, Ultralytics'
# 0): how far results move by chance alone, the yardstick `compare` holds two runs of the study against (see
# `seed_tolerances`). yolov8n's three make its spread a standard deviation over four runs, not one pair's difference;
# one each for yolo11n and yolo26n says whether theirs is of the same size.
REPLICATE_SEEDS: dict[str, tuple[int, ...]] = {V8N: (1, 2, 3), V11N: (1,), V26N: (1,)}
PROBE_EPOCHS = 60  # the budget probe trains each generation's baseline this long: half PROFILE's
PLATEAU_TOL = 0.01  # a control gaining less mAP50-95 than this says its baseline had plateaued
ADD = "+"  # an override key starting with it adds a key params.yaml lacks (DVC's `-S +key=value`)


def family(model: str) -> str:
    """Return the short family label of a model yaml or checkpoint: ``yolov8n.yaml`` -> ``v8n``."""
    stem = Path(str(model)).stem
    return stem.removeprefix("yolo")


def exp_name(model: str, method: str, speed_up: float, suffix: str = "") -> str:
    """Return the study's name of an experiment: ``v8n-lamp-2x``, ``11n-lamp-3x``, ``v8n-lamp-2x-r16``."""
    return f"{family(model)}-{method}-{speed_up:g}x{suffix}"


DEFAULT = exp_name(V8N, DEFAULT_METHOD, 2.0)  # params.yaml's settings: the row several analyses share
FRONTIER_NAME = f"{family(FRONTIER[0])}-{DEFAULT_METHOD}-to-{family(FRONTIER[1])}"
REMEDY_SUFFIX = f"-ft{LONG_EPOCHS}"  # the remedy tried where the 3x targets are missed: a longer fine-tune
# The replicated experiment's name -> its replicates' names (REPLICATE_SEEDS).
REPLICATE_GROUPS: dict[str, tuple[str, ...]] = {
    exp_name(m, DEFAULT_METHOD, 2.0): tuple(exp_name(m, DEFAULT_METHOD, 2.0, f"-seed{s}") for s in seeds)
    for m, seeds in REPLICATE_SEEDS.items()}
GROUP_FAMILY = {exp_name(m, DEFAULT_METHOD, 2.0): family(m) for m in REPLICATE_SEEDS}  # replicated experiment -> family
PROBE_SUFFIX = f"-e{PROBE_EPOCHS}"


@dataclass(frozen=True)
class Experiment:
    """One DVC experiment of the sweep: its short name, why it is there, and its ``-S`` overrides."""

    name: str
    purpose: str
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted params.yaml key (ADD-prefixed: new) -> value

    @property
    def dvc_name(self) -> str:
        """Return the experiment's name in DVC."""
        return PREFIX + self.name

    def settings(self, profile: dict[str, Any] | None = None) -> dict[str, Any]:
        """Return every override this experiment runs with: the profile's, then its own."""
        return {**(PROFILE if profile is None else profile), **self.overrides}

    def command(self, profile: dict[str, Any] | None = None) -> list[str]:
        """Return the ``dvc exp run --queue`` argv (after ``dvc``) that queues this experiment."""
        sets = [a for k, v in self.settings(profile).items() for a in ("-S", f"{k}={yaml_value(v)}")]
        return ["exp", "run", "--queue", "--name", self.dvc_name, *sets]


@dataclass(frozen=True)
class Control:
    """An equal-budget control: the baseline of ``source`` trained as many more epochs as the fine-tune, alike."""

    name: str
    source: str  # the experiment whose baseline (models/baseline.pt) and params the control takes


def yaml_value(value: Any) -> str:
    """Return ``value`` written as ``dvc exp run -S key=value`` reads it back (YAML)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def exp(purpose: str, model: str = V8N, speed_up: float = 2.0, method: str = DEFAULT_METHOD, suffix: str = "",
        **extra: Any) -> Experiment:
    """Return the experiment pruning ``model`` to ``speed_up`` with ``method``, plus ``extra`` overrides.

    ``extra``'s keys are params.yaml's dotted keys with ``__`` for the dots (``finetune__epochs=20``).
    """
    overrides = {"model": model, "speed_up": speed_up, "method": method}
    overrides.update({k.replace("__", "."): v for k, v in extra.items()})
    return Experiment(exp_name(model, method, speed_up, suffix), purpose, overrides)


def sweep(frontier_speed_up: float) -> list[Experiment]:
    """Return the study's experiments, in the order they run (each model's first experiment trains its baseline).

    ``frontier_speed_up`` prunes FRONTIER[0] to FRONTIER[1]'s MACs (see ``family_speed_up``).
    """
    experiments = [exp("default: the speed-up, method, round_to and fine-tune series share it; yolov8n from "
                       "scratch is its baseline")]
    experiments += [exp("speed-up", speed_up=s) for s in SPEED_UPS if s != 2.0]
    experiments += [exp("method", method=m) for m in METHODS]
    experiments += [exp("round_to", suffix=f"-r{r}", prune__round_to=r) for r in ROUND_TOS]
    experiments += [exp("fine-tune budget", suffix=f"-ft{e}", finetune__epochs=e) for e in (FEW_EPOCHS, LONG_EPOCHS)]
    experiments.append(exp("remedy: a longer fine-tune where the 3x targets are hardest", speed_up=3.0,
                           suffix=REMEDY_SUFFIX, finetune__epochs=LONG_EPOCHS))
    experiments += [exp("generation", model=m, speed_up=s) for m in GENERATIONS if m != V8N
                    for s in GENERATION_SPEED_UPS]
    big, small = FRONTIER
    experiments.append(Experiment(FRONTIER_NAME, f"family frontier: {family(big)} pruned to {family(small)}'s MACs",
                                  {"model": big, "speed_up": frontier_speed_up, "method": DEFAULT_METHOD}))
    return experiments


def replicates() -> list[Experiment]:
    """Return the seed replicates: each generation's 2x experiment again, another seed for the baseline and the
    fine-tune (``REPLICATE_SEEDS``).

    They say how far a result moves by chance alone. They are probes (``make
    study-probe``), not part of the sweep: each one's baseline costs as much training as a
    generation's.
    """
    out = []
    for model, model_seeds in REPLICATE_SEEDS.items():
        for seed in model_seeds:
            seeds = {f"{ADD}{stage}.args.seed": seed for stage in ("baseline", "finetune")}
            out.append(exp(f"run-to-run spread: {exp_name(model, DEFAULT_METHOD, 2.0)} with seed {seed} for the "
                           "baseline's training and the fine-tune", model=model, suffix=f"-seed{seed}", **seeds))
    return out


def generation_remedies() -> list[Experiment]:
    """Return the sweep's remedy (a longer fine-tune at 3x) for every generation but yolov8n's, which the sweep has.

    A probe (``make study-probe``), not part of the sweep: ``make study`` has to fit in
    180 minutes on the 2-core CPU, and one remedy row meets the issue's "try at least one".
    """
    return [exp("remedy, every generation", model=m, speed_up=3.0, suffix=REMEDY_SUFFIX, finetune__epochs=LONG_EPOCHS)
            for m in GENERATIONS if m != V8N]


def probes() -> list[Experiment]:
    """Return the checks on the study itself, outside ``make study``: the budget probe, the seed replicates and
    the remedy for every generation."""
    return [*budget_probe(), *replicates(), *generation_remedies()]


def budget_probe() -> list[Experiment]:
    """Return the budget probe: each generation's 2x experiment again, its baseline trained only ``PROBE_EPOCHS``.

    Set against the sweep's rows and controls, it shows what a baseline short of its
    plateau does to retention (it looks better than it is). Its controls are
    ``controls(probe=True)``. It is not part of ``make study`` (see README).
    """
    return [exp(f"budget probe: {exp_name(m, DEFAULT_METHOD, 2.0)} with a {PROBE_EPOCHS}-epoch baseline", model=m,
                suffix=PROBE_SUFFIX, baseline__epochs=PROBE_EPOCHS) for m in GENERATIONS]


def controls(probe: bool = False) -> list[Control]:
    """Return the equal-budget controls: one per generation, on the baseline of its 2x default-method experiment.

    ``probe``: the controls of the budget probe's experiments instead of the sweep's.
    """
    suffix = PROBE_SUFFIX if probe else ""
    return [Control(f"{family(m)}-control{suffix}", exp_name(m, DEFAULT_METHOD, 2.0, suffix)) for m in GENERATIONS]


# --- params -------------------------------------------------------------------------------------------------------

def apply_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``params`` with each dotted key of ``overrides`` set (``prune.round_to``: a nested key).

    As ``dvc exp run -S`` does: a key must exist, unless it starts with ``ADD``
    (``+baseline.args.seed``), which adds it and must not exist yet.
    """
    out = deepcopy(params)
    for key, value in overrides.items():
        adds = key.startswith(ADD)
        *path, last = key.removeprefix(ADD).split(".")
        node = out
        for part in path:
            if not isinstance(node.get(part), dict):
                raise YoloPruneError(f"override {key}: params.yaml has no section '{part}'; use a key of params.yaml")
            node = node[part]
        if adds and last in node:
            raise YoloPruneError(f"override {key}: params.yaml has that key already; drop the leading '{ADD}'")
        if not adds and last not in node:
            raise YoloPruneError(f"override {key}: params.yaml has no key '{key}'; use a key of params.yaml, or "
                                 f"'{ADD}{key}' to add one")
        node[last] = value
    return out


def check_params(params: dict[str, Any], label: str = "params") -> dict[str, Any]:
    """Return ``params`` once ``load_params`` accepts it (the same schema check the stages run)."""
    with tempfile.TemporaryDirectory(prefix="yoloprune-study-") as tmp:
        path = Path(tmp) / f"{label}.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return load_params(path)


def study_params(params_path: str | Path = "params.yaml", profile: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return params.yaml with the study profile applied, validated."""
    return check_params(apply_overrides(load_params(params_path), PROFILE if profile is None else profile), "profile")


def dataset_classes(params: dict[str, Any]) -> int:
    """Return the number of classes the pipeline trains on (the head's width depends on it, and so its MACs)."""
    if params["data"] == SYNTHETIC:
        from yoloprune.data import NAMES

        return len(NAMES)
    from yoloprune.data import check_data_yaml

    return check_data_yaml(params["data"])["nc"]


@functools.cache  # the frontier sweep and its test count the same two models
def model_macs(model: str, imgsz: int, nc: int) -> int:
    """Return the MACs per image of a model yaml built for ``nc`` classes, counted as the prune stage counts them."""
    from yoloprune.io import load_model
    from yoloprune.macs import MacCounter
    from yoloprune.prune import deployed_branch

    net = load_model(model, nc=nc).eval()
    _, unused = deployed_branch(net)
    return MacCounter(net, imgsz, exclude=set(unused))()


def family_speed_up(large: str, small: str, imgsz: int, nc: int) -> float:
    """Return the speed-up that prunes ``large`` to ``small``'s MACs at ``imgsz`` (rounded to 3 decimals)."""
    return round(model_macs(large, imgsz, nc) / model_macs(small, imgsz, nc), 3)


def study_sweep(params_path: str | Path = "params.yaml", probe: bool = False) -> list[Experiment]:
    """Return the sweep (``probe``: the probes) for this repository's params.yaml, every experiment validated."""
    params = study_params(params_path)
    experiments = probes() if probe else sweep(family_speed_up(*FRONTIER, params["imgsz"],
                                                                      dataset_classes(params)))
    for e in experiments:
        check_params(apply_overrides(params, e.overrides), e.name)
    return experiments


# --- DVC ----------------------------------------------------------------------------------------------------------

DONE, SUCCESS, QUEUED, RUNNING, FAILED = "done", "success", "queued", "running", "failed"


@dataclass(frozen=True)
class ExpRecord:
    """One experiment as ``dvc exp show --json`` lists it."""

    name: str
    rev: str  # the experiment's commit (the queue's task id while it is queued or running)
    baseline: str  # the commit it was run from
    state: str  # DONE (run in the workspace), SUCCESS, QUEUED, RUNNING or FAILED (the queue's states)
    params: dict[str, Any] = field(default_factory=dict)  # params.yaml as the experiment ran it
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # metrics file -> its data (readable ones)
    outs: dict[str, str | None] = field(default_factory=dict)  # output path -> its hash
    timestamp: str | None = None
    error: str | None = None
    task_id: str | None = None  # the queue's id of the task (queued experiments)
    log: str | None = None  # the queue's log of the run

    @property
    def finished(self) -> bool:
        """Return whether the experiment completed and its metrics can be read."""
        return self.state in (DONE, SUCCESS) and self.error is None and bool(self.metrics)

    @property
    def pending(self) -> bool:
        """Return whether the queue will still run (or is running) the experiment."""
        return self.state in (QUEUED, RUNNING)


def parse_exp_show(data: str | list) -> list[ExpRecord]:
    """Return the experiments in ``dvc exp show --json`` output (DVC 3: a list of baselines, each with experiments).

    The workspace entry has none; unreadable metrics files (an experiment that failed,
    or one still running) are left out of ``metrics`` rather than failing the parse.
    """
    if isinstance(data, str):
        try:
            data = json.loads(data[data.index("["):] if "[" in data else data)
        except ValueError as e:
            raise YoloPruneError(f"dvc exp show --json printed no JSON ({e}); run it yourself to see why") from e
    if not isinstance(data, list):
        raise YoloPruneError("dvc exp show --json: expected a list of baseline commits (DVC 3); this DVC prints "
                             f"a {type(data).__name__}: install the pinned dvc (pip install -e .)")
    records = []
    for base in data:
        if not isinstance(base, dict):
            continue
        for group in base.get("experiments") or []:
            revs = group.get("revs") or []
            if not revs or not isinstance(revs[0], dict):
                continue
            rev = revs[0]
            executor = group.get("executor") or {}
            local = executor.get("local") or {}
            name = group.get("name") or rev.get("name")
            if not name:
                continue
            records.append(ExpRecord(
                name=name,
                rev=str(rev.get("rev", "")),
                baseline=str(base.get("rev", "")),
                state=executor.get("state") or DONE,
                params=_file_data((rev.get("data") or {}).get("params"), "params.yaml"),
                metrics={path: v["data"] for path, v in ((rev.get("data") or {}).get("metrics") or {}).items()
                         if isinstance(v, dict) and isinstance(v.get("data"), dict)},
                outs={path: (v or {}).get("hash") for path, v in ((rev.get("data") or {}).get("outs") or {}).items()},
                timestamp=(rev.get("data") or {}).get("timestamp"),
                error=(rev.get("error") or {}).get("msg") if rev.get("error") else None,
                task_id=local.get("task_id"),
                log=local.get("log"),
            ))
    return records


def _file_data(files: dict | None, path: str) -> dict[str, Any]:
    entry = (files or {}).get(path) or {}
    return entry.get("data") if isinstance(entry.get("data"), dict) else {}


@dataclass(frozen=True)
class QueueStatus:
    """``dvc queue status``: each task's name and status, and the number of workers."""

    tasks: list[tuple[str, str, str]]  # (task id, name, status), status as printed: Queued, Running, Success, ...
    workers: int  # active + idle

    def names(self, *statuses: str) -> set[str]:
        """Return the names of the tasks in any of ``statuses`` (case-insensitive)."""
        wanted = {s.lower() for s in statuses}
        return {name for _, name, status in self.tasks if status.lower() in wanted}


def parse_queue_status(text: str) -> QueueStatus:
    """Return the tasks and worker count ``dvc queue status`` printed (a table, then a worker line)."""
    tasks = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and re.fullmatch(r"[0-9a-f]{7,40}", parts[0]):
            tasks.append((parts[0], parts[1], parts[-1]))
    m = re.search(r"Worker status:\s*(\d+)\s+active,\s*(\d+)\s+idle", text)
    return QueueStatus(tasks, int(m.group(1)) + int(m.group(2)) if m else 0)


def dvc(*args: str, repo: str | Path = ".", check: bool = True, detach: bool = False) -> subprocess.CompletedProcess:
    """Run ``dvc ARGS`` in ``repo`` with this interpreter's DVC; return the finished process (output as text).

    The interpreter's bin folder goes first on PATH: the queue worker DVC spawns runs
    ``dvc`` by name, and the stages run ``python``, and both must be this environment's.
    ``detach`` is for commands that leave a process behind (``queue start``): their
    output is discarded, since the worker would hold a pipe open until it exits.
    """
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    argv = [sys.executable, "-m", "dvc", *args]
    if detach:
        out = subprocess.run(argv, cwd=repo, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, check=False, start_new_session=True)
    else:
        out = subprocess.run(argv, cwd=repo, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             check=False)
    if check and out.returncode:
        last = [ln for ln in ((out.stderr or "") + (out.stdout or "")).splitlines() if ln.strip()]
        why = last[-1] if last else f"exit status {out.returncode}; run `dvc {' '.join(args)}` to see why"
        raise YoloPruneError(f"dvc {' '.join(args[:3])} failed: {why}")
    return out


def experiments_in(repo: str | Path = ".") -> list[ExpRecord]:
    """Return the experiments of every commit (``dvc exp show --json --all-commits``).

    Every commit: a sweep resumed after new commits landed still finds the experiments it ran
    from older ones (the report names the commit of each).
    """
    return parse_exp_show(dvc("exp", "show", "--json", "--all-commits", repo=repo).stdout)


def pipeline_files(repo: str | Path = ".") -> list[str]:
    """Return the tracked files whose content decides a stage's results: dvc.yaml, params.yaml and code deps.

    A dependency that another stage writes (a metrics file committed to git, read by a
    later stage) is a result, not an input: committing a new run of it changes nothing
    the stages compute from.
    """
    root = Path(repo)
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    written = {next(iter(o)) if isinstance(o, dict) else o for stage in stages.values()
               for kind in ("outs", "metrics", "plots") for o in (stage or {}).get(kind) or []}
    deps = {d for stage in stages.values() for d in (stage or {}).get("deps") or []
            if isinstance(d, str) and d not in written}
    out = subprocess.run(["git", "ls-files", "--", *sorted(deps)], cwd=root, capture_output=True, text=True,
                         check=False)
    return sorted({"dvc.yaml", "params.yaml", *out.stdout.split()})


def current(records: Iterable[ExpRecord], repo: str | Path = ".") -> list[ExpRecord]:
    """Return the experiments run from a commit whose pipeline (``pipeline_files``) is HEAD's, byte for byte.

    Results of older pipeline code are not this code's results: the sweep runs those
    experiments again and the report leaves the old ones out. Commits that change
    nothing a stage depends on (docs, tests, this module) keep every result valid.
    """
    files = pipeline_files(repo)
    same: dict[str, bool] = {}
    kept = []
    for r in records:
        if r.baseline not in same:
            diff = subprocess.run(["git", "diff", "--quiet", r.baseline, "HEAD", "--", *files], cwd=repo,
                                  capture_output=True, check=False)
            same[r.baseline] = diff.returncode == 0
        if same[r.baseline]:
            kept.append(r)
    return kept


def queue_status(repo: str | Path = ".") -> QueueStatus:
    """Return ``dvc queue status``, parsed."""
    return parse_queue_status(dvc("queue", "status", repo=repo).stdout)


def dead_tasks(task_ids: Iterable[str], repo: str | Path = ".") -> set[str]:
    """Return the tasks among ``task_ids`` (full or short ids) that DVC calls running but whose process is gone.

    The queue records each task's process in ``.dvc/tmp/exps/run/<id>/<id>.json`` (pid,
    and the return code once it ends). A worker killed with its task (``dvc queue stop
    --kill``, a reboot) leaves the task "Running" for good, with no return code and no
    process; waiting for it would never end.
    """
    import psutil

    run_dir = Path(repo) / ".dvc" / "tmp" / "exps" / "run"
    dead = set()
    for task in task_ids:
        infos = list(run_dir.glob(f"{task}*/{task}*.json"))
        if len(infos) != 1:  # none, or a short id two tasks share: not known to be dead
            continue
        try:
            info, written = json.loads(infos[0].read_text()), infos[0].stat().st_mtime
        except (OSError, ValueError):
            continue  # being written
        pid = info.get("pid")
        if not isinstance(pid, int) or info.get("returncode") is not None:
            continue
        try:
            proc = psutil.Process(pid)
            # A pid taken again by a later process (after a reboot) or a zombie is not the task's.
            gone = proc.status() == psutil.STATUS_ZOMBIE or proc.create_time() > written + 1
        except psutil.NoSuchProcess:
            gone = True
        except psutil.AccessDenied:  # alive, another user's
            gone = False
        if gone:
            dead.add(task)
    return dead


def _matches(params: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Return whether ``params`` has every dotted key of ``settings`` at that value (numbers compared as numbers)."""
    for key, want in settings.items():
        node: Any = params
        for part in key.removeprefix(ADD).split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(want, (int, float)) and not isinstance(want, bool) and isinstance(node, (int, float)):
            if not math.isclose(node, want, rel_tol=1e-9):
                return False
        elif node != want:
            return False
    return True


def matching(records: Iterable[ExpRecord], experiments: Sequence[Experiment],
             profile: dict[str, Any] | None = None) -> list[ExpRecord]:
    """Return ``records`` less the finished runs of ``experiments`` whose params differ from their settings now.

    An experiment keeps its name when ``PROFILE`` changes (a longer baseline, say): its
    old result must not stand in for the new one. Records of other names pass.
    """
    settings = {e.dvc_name: e.settings(profile) for e in experiments}
    return [r for r in records if not (r.finished and r.name in settings and not _matches(r.params, settings[r.name]))]


@dataclass(frozen=True)
class QueuePlan:
    """What ``queue`` does: experiments to queue, stale results and failed tasks to remove, ones to leave."""

    to_queue: list[Experiment]
    stale: list[str]  # revs of finished runs with other params than the sweep's now: queued again (see ``queue``)
    remove: list[str]  # task ids of failed runs, removed from the queue before their experiment is queued again
    skipped: list[str]  # queued, running or done
    waiting: list[str] = field(default_factory=list)  # to queue once another experiment has trained their baseline
    failed: list[str] = field(default_factory=list)  # failed, left alone (``retry_failed=False``)


def baseline_key(e: Experiment, profile: dict[str, Any] | None = None) -> tuple[tuple[str, str], ...]:
    """Return what decides ``e``'s baseline (its BASELINE_PARAMS overrides): equal keys, one shared baseline."""
    return tuple(sorted((k, yaml_value(v)) for k, v in e.settings(profile).items()
                        if k.removeprefix(ADD).split(".")[0] in BASELINE_PARAMS))


def ready(candidates: Sequence[Experiment], experiments: Sequence[Experiment], finished: Iterable[str],
          busy: Iterable[str], profile: dict[str, Any] | None = None,
          cost: Callable[[Experiment], float] | None = None) -> list[Experiment]:
    """Return the ``candidates`` to queue now, those that train a baseline first (costliest first), then the others.

    A candidate is ready when a ``finished`` experiment (a DVC name) of ``experiments``
    has trained its baseline, or when it is the first to train it: no ``busy`` one
    (queued, running, or failed and left alone) shares its baseline. So experiments run at
    once (JOBS) never train one baseline twice, and the longest trainings start first.
    ``cost`` estimates a baseline's training time; without it the sweep's order stands.
    """
    finished, busy = set(finished), set(busy)
    trained = {baseline_key(e, profile) for e in experiments if e.dvc_name in finished}
    claimed = {baseline_key(e, profile) for e in experiments if e.dvc_name in busy}
    first, then = [], []
    for e in candidates:
        key = baseline_key(e, profile)
        if key in trained:
            then.append(e)
        elif key not in claimed:
            claimed.add(key)
            first.append(e)
    if cost is not None:
        first.sort(key=cost, reverse=True)
    return first + then


def plan_queue(experiments: Sequence[Experiment], records: Iterable[ExpRecord], pending: Iterable[str] = (),
               profile: dict[str, Any] | None = None, retry_failed: bool = True,
               cost: Callable[[Experiment], float] | None = None) -> QueuePlan:
    """Return which experiments to queue: those neither finished with the sweep's params nor queued nor running,
    whose baseline is trained or that train it (see ``ready``); the others wait.

    ``records`` are the current commit's experiments; ``pending`` the names the queue
    holds as queued or running for any commit. ``retry_failed=False`` leaves failed
    experiments (and the baseline they were to train) alone.
    """
    by_name: dict[str, list[ExpRecord]] = {}
    for r in records:
        by_name.setdefault(r.name, []).append(r)
    pending = set(pending)
    plan = QueuePlan([], [], [], [])
    finished: set[str] = set()
    candidates = []
    for e in experiments:
        recs = by_name.get(e.dvc_name, [])
        if e.dvc_name in pending or any(r.pending for r in recs):
            plan.skipped.append(e.name)
            pending.add(e.dvc_name)
            continue
        done = [r for r in recs if r.finished]
        # Done when one finished run has the sweep's params now: older runs of the name (another PROFILE, kept
        # on their commits) do not make a current result stale; ``matching`` leaves them out of the report.
        if any(_matches(r.params, e.settings(profile)) for r in done):
            plan.skipped.append(e.name)
            finished.add(e.dvc_name)
            continue
        if not retry_failed and any(r.state == FAILED for r in recs):
            plan.failed.append(e.name)
            pending.add(e.dvc_name)
            continue
        plan.stale.extend(r.rev for r in done)
        plan.remove.extend(r.task_id for r in recs if r.state == FAILED and r.task_id)
        candidates.append(e)
    plan.to_queue.extend(ready(candidates, experiments, finished, pending, profile, cost))
    queued = {e.name for e in plan.to_queue}
    plan.waiting.extend(e.name for e in candidates if e.name not in queued)
    return plan


def baseline_cost(e: Experiment, params: dict[str, Any]) -> float:
    """Return a baseline's training cost in relative units: its model's MACs times its epochs (0 for a .pt)."""
    p = apply_overrides(params, e.settings())
    if str(p["model"]).endswith(".pt"):
        return 0.0
    return float(model_macs(p["model"], p["imgsz"], dataset_classes(p)) * p["baseline"]["epochs"])


def queue(experiments: Sequence[Experiment], repo: str | Path = ".", retry_failed: bool = True) -> QueuePlan:
    """Queue the study's experiments that are not queued, running or done yet and whose baseline is trained or
    that train it (see ``ready``); return what was done. ``retry_failed=False`` leaves failed ones alone."""
    _warn_if_dirty(repo)
    _warn_if_uncached(repo)
    records = experiments_in(repo)
    names = {e.dvc_name for e in experiments}
    dead = dead_tasks([r.task_id for r in records if r.state == RUNNING and r.task_id], repo)
    for r in records:
        if r.task_id in dead and r.name in names:
            LOGGER.warning("%s: shown as running, but its process is gone (a killed worker); removed from the "
                           "queue to be queued again", r.name)
            dvc("queue", "kill", r.task_id, repo=repo, check=False)
            dvc("queue", "remove", r.task_id, repo=repo, check=False)
    records = [r for r in records if r.task_id not in dead]
    now = current(records, repo)
    for r in records:  # queued from older pipeline code (an earlier sitting): they would run that code
        if r.pending and r.name in names and r not in now and r.task_id:
            LOGGER.warning("%s: queued from commit %s, whose pipeline differs from HEAD's; removed from the queue",
                           r.name, r.baseline[:7])
            dvc("queue", "kill" if r.state == RUNNING else "remove", r.task_id, repo=repo, check=False)
    params = load_params(Path(repo) / "params.yaml")
    plan = plan_queue(experiments, now, {r.name for r in now if r.pending}, retry_failed=retry_failed,
                      cost=lambda e: baseline_cost(e, params))
    for task in plan.remove:
        dvc("queue", "remove", task, repo=repo)
    # Not `exp run --force`, which re-runs every stage past DVC's run cache: a stale result on HEAD (whose name
    # the new run takes) is removed first; one on an older commit stays, and ``matching`` leaves it out.
    stale, head = set(plan.stale), head_commit(repo)
    on_head = sorted({r.name for r in now if r.rev in stale and r.baseline == head})
    if stale:
        LOGGER.warning("%d result(s) were run with other params than the sweep's now: queued again", len(stale))
    if on_head:
        dvc("exp", "remove", *on_head, repo=repo)
    for e in plan.to_queue:
        dvc(*e.command(), repo=repo)
        LOGGER.info("queued %s", e.dvc_name)
    LOGGER.info("%d queued, %d already queued, running or done%s", len(plan.to_queue), len(plan.skipped),
                f", {len(plan.waiting)} to queue once their baseline is trained" if plan.waiting else "")
    return plan


def head_commit(repo: str | Path = ".") -> str:
    """Return the full hash of the repository's HEAD commit ("" outside git)."""
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=False)
    return out.stdout.strip()


def _warn_if_dirty(repo: str | Path) -> None:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "dvc.yaml", "params.yaml",
                          "stages", "yoloprune"], cwd=repo, capture_output=True, text=True, check=False)
    if out.stdout.strip():
        LOGGER.warning("the pipeline has uncommitted changes: the queued experiments include them, so the report "
                       "will not reproduce from a commit; commit first for a study of record")


def uncached_stages(pipeline: dict[str, Any]) -> list[str]:
    """Return the stages of a parsed ``dvc.yaml`` that DVC's run cache skips: those with a ``persist`` output.

    DVC neither saves nor restores such a stage from the run cache (``dvc/stage/cache.py``,
    ``_can_hash``), so every experiment recomputes it, however often the same inputs recur.
    """
    found = []
    for name, stage in (pipeline.get("stages") or {}).items():
        for out in (stage or {}).get("outs") or []:
            opts = next(iter(out.values()), None) if isinstance(out, dict) else None
            if isinstance(opts, dict) and opts.get("persist"):
                found.append(name)
                break
    return found


def _warn_if_uncached(repo: str | Path) -> None:
    path = Path(repo) / "dvc.yaml"
    stages = uncached_stages(yaml.safe_load(path.read_text()) or {}) if path.is_file() else []
    if stages:
        LOGGER.warning("dvc.yaml: stage(s) %s have a `persist: true` output, which turns DVC's run cache off for "
                       "them: every experiment recomputes them (a baseline is trained again for each), so the sweep "
                       "takes many times longer; drop `persist` there for the study", ", ".join(stages))


def wait(experiments: Sequence[Experiment], repo: str | Path = ".", poll_s: float = 60, jobs: int = JOBS
         ) -> list[str]:
    """Start ``jobs`` queue workers and wait until none of the study's experiments is pending or waiting.

    Whenever one finishes, the experiments waiting for its baseline are queued (see
    ``ready``). Return the names of the study's experiments that failed. Interrupting
    the wait leaves the workers running in the background.
    """
    names = {e.dvc_name for e in experiments}
    idle_polls, short_polls, warned, first, last_pending = 0, 0, set(), True, None
    waiting = True  # until a `queue` call says none waits
    while True:
        status = queue_status(repo)
        dead = dead_tasks([t for t, _, s in status.tasks if s.lower() == RUNNING], repo)
        for task, name, _ in status.tasks:
            if task in dead and name in names and task not in warned:
                LOGGER.warning("%s: shown as running, but its process is gone; `make study` queues it again", name)
                warned.add(task)
        live = [(n, s.lower()) for t, n, s in status.tasks if t not in dead]
        running = {n for n, s in live if s == RUNNING}
        pending = sorted({n for n, s in live if s in (QUEUED, RUNNING)} & names)
        if waiting and pending != last_pending:  # one finished (or this is the first poll): queue what it unblocked
            plan = queue(experiments, repo, retry_failed=False)
            waiting = bool(plan.waiting)
            if plan.to_queue:  # poll again, soon: the new tasks are pending now, and `pending` is stale
                last_pending = None
                time.sleep(min(poll_s, 5))
                continue
        last_pending = pending
        if not pending:
            break
        queued = len(pending) - len(running & names)
        if first and not running and status.workers == 0:  # `queue start` adds a worker even when one runs
            dvc("queue", "start", "-j", str(jobs), repo=repo, detach=True)
        first = False
        # A worker that died (reboot, OOM) leaves tasks queued; restart once none is seen for three polls in a row
        # with nothing running, never sooner: `dvc queue status` may count no worker while one starts or runs a task
        # (seen with DVC 3.67). A worker also leaves when the queue is empty for a few seconds (before a finished
        # baseline lets its waiting experiments in): fewer than `jobs` running with tasks queued for three polls in a
        # row starts the missing one. A worker too many costs little: each training runs on one thread.
        gone = status.workers == 0 and not running
        idle_polls = idle_polls + 1 if gone else 0
        short_polls = short_polls + 1 if queued and len(running) < jobs and not gone else 0
        if idle_polls >= 3 or short_polls >= 3:
            LOGGER.warning("fewer queue workers than %d; starting the missing", jobs)
            dvc("queue", "start", "-j", str(jobs), repo=repo, detach=True)
            idle_polls = short_polls = 0
        LOGGER.info("%s: %d pending (running: %s)", datetime.now().strftime("%H:%M"), len(pending),
                    ", ".join(sorted(running & names)) or "none yet")
        time.sleep(poll_s)
    failed = [r for r in experiments_in(repo) if r.name in names and r.state == FAILED]
    for r in failed:
        LOGGER.warning("%s failed; its log: %s (`make study` queues it again)", r.name, r.log)
    return [r.name for r in failed]


# --- the table ----------------------------------------------------------------------------------------------------

COLUMNS = {  # column -> (metrics file, key) of the experiment's metrics
    "map_base": ("metrics/benchmark.json", "baseline_map50_95"),
    "map_pruned": ("metrics/benchmark.json", "pruned_map50_95"),
    "map_ft": ("metrics/benchmark.json", "finetuned_map50_95"),
    "retention": ("metrics/benchmark.json", "retention_pct"),
    "params_base": ("metrics/benchmark.json", "baseline_params"),
    "params_ft": ("metrics/benchmark.json", "finetuned_params"),
    "macs_base": ("metrics/benchmark.json", "baseline_macs"),
    "macs_ft": ("metrics/benchmark.json", "finetuned_macs"),
    "achieved": ("metrics/benchmark.json", "macs_speed_up"),
    "lat_base": ("metrics/benchmark.json", "baseline_latency_ms"),
    "lat_ft": ("metrics/benchmark.json", "finetuned_latency_ms"),
    "lat_speed_up": ("metrics/benchmark.json", "latency_speed_up"),
    "parity": ("metrics/benchmark.json", "onnx_parity_rel_error"),
    "ft_epochs_run": ("metrics/finetune.json", "epochs"),
    "base_epochs_run": ("metrics/baseline.json", "epochs"),
    "base_tail": ("metrics/baseline.json", "map50_95_tail_gain"),  # see yoloprune.finetune.tail_gain
}
PARAM_COLUMNS = {"model": "model", "method": "method", "target": "speed_up", "imgsz": "imgsz",
                 "round_to": "prune.round_to", "ft_epochs": "finetune.epochs", "base_epochs": "baseline.epochs"}
BASELINE_OUT = "models/baseline.pt"


def collect(records: Iterable[ExpRecord], experiments: Sequence[Experiment]) -> pd.DataFrame:
    """Return one row per finished experiment of the sweep, in sweep order: its params and metrics."""
    order = {e.dvc_name: i for i, e in enumerate(experiments)}
    rows = []
    for r in records:
        if r.name not in order or not r.finished or "metrics/benchmark.json" not in r.metrics:
            continue
        row: dict[str, Any] = {"experiment": r.name.removeprefix(PREFIX), "rev": r.rev, "timestamp": r.timestamp,
                               "baseline_md5": r.outs.get(BASELINE_OUT), "_order": order[r.name]}
        row.update({f"onnx_{key}": r.outs.get(path) for key, path in onnx_outs(r.params).items()})
        for col, key in PARAM_COLUMNS.items():
            node: Any = r.params
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            row[col] = node
        for col, (path, key) in COLUMNS.items():
            row[col] = r.metrics.get(path, {}).get(key)
        rows.append(row)
    df = pd.DataFrame(rows, columns=["experiment", "rev", "timestamp", "baseline_md5", "onnx_base", "onnx_ft",
                                     "_order", *PARAM_COLUMNS, *COLUMNS])
    df = df.sort_values(["_order", "timestamp"], ascending=[True, False], na_position="last")  # newest run first
    df = df.drop(columns="_order").drop_duplicates("experiment").reset_index(drop=True)
    df["family"] = df["model"].map(lambda m: family(m) if isinstance(m, str) else None)
    for col in COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    for col in ("target", "round_to", "ft_epochs", "base_epochs", "imgsz"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def missing(records: Iterable[ExpRecord], experiments: Sequence[Experiment]) -> dict[str, str]:
    """Return each experiment of the sweep that has no finished result, with its state (or "not queued")."""
    states: dict[str, str] = {}
    for r in records:
        if r.finished:
            states[r.name] = DONE
        elif states.get(r.name) != DONE:
            states[r.name] = r.state if r.state != DONE else "incomplete"
    return {e.name: states.get(e.dvc_name, "not queued") for e in experiments if states.get(e.dvc_name) != DONE}


def pareto_front(latency: Sequence[float], accuracy: Sequence[float]) -> list[bool]:
    """Return, for each point, whether no other point is at least as fast and as accurate, and better in one.

    Identical points do not dominate each other (both stay on the front); a point
    with a missing value is never on it.
    """
    pts = [(float(x), float(y)) for x, y in zip(latency, accuracy, strict=True)]
    ok = [not (math.isnan(x) or math.isnan(y)) for x, y in pts]

    def dominated(i: int) -> bool:
        x, y = pts[i]
        return any(ok[j] and pts[j][0] <= x and pts[j][1] >= y and pts[j] != (x, y) for j in range(len(pts)))

    return [ok[i] and not dominated(i) for i in range(len(pts))]


def points(df: pd.DataFrame, control_results: Sequence[dict] = ()) -> pd.DataFrame:
    """Return the plot's points: each pruned model, each family's baseline and each control, and the Pareto front.

    A baseline is measured again in every experiment of its family; its point takes the
    median latency of those runs.
    """
    rows = [{"label": r.experiment, "kind": "pruned", "family": r.family, "latency_ms": r.lat_ft,
             "map50_95": r.map_ft} for r in df.itertuples()]
    for fam, group in df.groupby("family", sort=False):
        rows.append({"label": f"{fam} baseline", "kind": "baseline", "family": fam,
                     "latency_ms": group["lat_base"].median(), "map50_95": group["map_base"].median()})
    for c in control_results:
        rows.append({"label": c["name"], "kind": "control", "family": c["family"],
                     "latency_ms": c.get("latency_ms"), "map50_95": c.get("map50_95")})
    pts = pd.DataFrame(rows, columns=["label", "kind", "family", "latency_ms", "map50_95"])
    pts["latency_ms"] = pd.to_numeric(pts["latency_ms"], errors="coerce")
    pts["map50_95"] = pd.to_numeric(pts["map50_95"], errors="coerce")
    pts["front"] = pareto_front(pts["latency_ms"], pts["map50_95"])
    return pts


@dataclass(frozen=True)
class Target:
    """Issue 9's bar at one MACs speed-up: fine-tuned mAP50-95 retention and ONNX Runtime latency speed-up."""

    speed_up: float
    min_retention_pct: float
    min_latency_speed_up: float


TARGETS = (Target(2.0, 97.0, 1.7), Target(3.0, 93.0, 2.4))
MACS_TOLERANCE = 0.02  # achieved MACs speed-up within +-2 % of every target


def check_targets(df: pd.DataFrame, targets: Sequence[Target] = TARGETS,
                  macs_tolerance: float = MACS_TOLERANCE) -> pd.DataFrame:
    """Return one row per (experiment, criterion): required, measured, gap (measured minus the bar) and met.

    Every pruned experiment is checked for its MACs speed-up (gap: the tolerance left);
    those at a target speed-up also for retention and latency speed-up.
    """
    rows = []
    for r in df.itertuples():
        if pd.isna(r.target):
            continue
        err = r.achieved / r.target - 1 if pd.notna(r.achieved) else math.nan
        rows.append({"experiment": r.experiment, "target": r.target, "criterion": "MACs speed-up error",
                     "required": f"within ±{macs_tolerance:.0%}", "measured": err, "gap": macs_tolerance - abs(err),
                     "unit": "%"})
        bar = next((t for t in targets if math.isclose(t.speed_up, r.target)), None)
        if bar is None:
            continue
        rows.append({"experiment": r.experiment, "target": r.target, "criterion": "mAP50-95 retention",
                     "required": f"≥ {bar.min_retention_pct:g} %", "measured": r.retention,
                     "gap": r.retention - bar.min_retention_pct, "unit": "pt"})
        rows.append({"experiment": r.experiment, "target": r.target, "criterion": "latency speed-up",
                     "required": f"≥ {bar.min_latency_speed_up:g}×", "measured": r.lat_speed_up,
                     "gap": r.lat_speed_up - bar.min_latency_speed_up, "unit": "×"})
    out = pd.DataFrame(rows, columns=["experiment", "target", "criterion", "required", "measured", "gap", "unit"])
    out["met"] = out["gap"].map(lambda g: bool(pd.notna(g) and g >= 0))
    return out


def percent(part: float, whole: float) -> float:
    """Return ``part`` as a percentage of ``whole``; NaN where ``whole`` is 0 or unknown (a model that found nothing)."""
    return 100 * part / whole if whole and math.isfinite(whole) else math.nan


def with_control(df: pd.DataFrame, control_results: Sequence[dict]) -> pd.DataFrame:
    """Return ``df`` with ``retention_ctrl``: fine-tuned mAP as % of its family's control, at the control's epochs.

    A control matches an experiment with the same baseline (by hash) and the same
    number of fine-tune epochs; other rows get NaN.
    """
    df = df.copy()
    df["map_ctrl"] = math.nan
    for c in control_results:
        same = (df["baseline_md5"] == c.get("baseline_md5")) & (df["ft_epochs"] == c.get("epochs"))
        df.loc[same, "map_ctrl"] = c.get("map50_95")
    df["retention_ctrl"] = [percent(ft, ctrl) for ft, ctrl in zip(df["map_ft"], df["map_ctrl"], strict=True)]
    return df


# --- latency, timed again: every model in one quiet pass ---------------------------------------------------------

def onnx_outs(params: dict[str, Any]) -> dict[str, str]:
    """Return the export stage's ONNX outputs for an experiment's params: ``{"base": path, "ft": path}``."""
    imgsz = params.get("imgsz")
    return {"base": f"models/baseline_{imgsz}_b1.onnx", "ft": f"models/finetuned_{imgsz}_b1.onnx"}


def interleaved_rounds(factories: dict[str, Callable[[], Callable[[], object]]], rounds: int, iters: int,
                       warmup: int) -> dict[str, list[float]]:
    """Return each model's median call time (ms) in each of ``rounds`` rounds, timed model after model.

    Interleaving spreads a slow stretch of a shared CPU over every model alike, where
    timing one model after another (as each experiment's benchmark stage does) charges it
    to whichever model ran then; many short rounds, every other one in reverse order,
    give neighbours in ``factories`` (an experiment's baseline and pruned model) the same
    stretches. Measured here: one model timed 1.6 ms, then 2.4 ms for 20 s on end a few
    minutes later, and two copies of one network 1.28 and 2.06 ms in a pass of 5 long
    rounds. Each turn builds the runner, warms it up, times ``iters`` calls and drops it,
    so one session exists at a time: with all of them open, the idle sessions' ONNX
    Runtime threads spin and slow the one being timed (measured: up to 59 % between
    copies of the same network).
    """
    import torch

    from yoloprune.benchmark import time_calls

    cpu = torch.device("cpu")
    times: dict[str, list[float]] = {key: [] for key in factories}
    order = list(factories)
    for i in range(rounds):
        for key in order if i % 2 == 0 else order[::-1]:
            run = factories[key]()
            times[key].append(median(time_calls(run, warmup, iters, cpu)))
            del run
    return times


def paired_speed_up(base_ms: Sequence[float], pruned_ms: Sequence[float]) -> float:
    """Return the median over rounds of the baseline's time over the pruned model's, timed side by side each round."""
    if not base_ms or len(base_ms) != len(pruned_ms):
        raise YoloPruneError(f"paired timings need as many rounds of each model ({len(base_ms)} vs "
                             f"{len(pruned_ms)}); time them again with `python -m yoloprune.study report`")
    return median(b / p for b, p in zip(base_ms, pruned_ms))


def retime(df: pd.DataFrame, repo: str | Path = ".", out_dir: str | Path = OUT_DIR, threads: int = 2,
           rounds: int = 15, iters: int = 20, warmup: int = 3) -> dict[str, Any]:
    """Time every experiment's exported ONNX models again in one interleaved pass; write and return the record.

    Each file is read from DVC's cache at its experiment's commit (the same bytes the
    benchmark stage timed), and an experiment's baseline is timed next to its pruned
    model (``interleaved_rounds``). The record (``out_dir/study/latency.json``) maps each
    file's md5 to its median ms (``median_ms``, the median of its rounds) and its
    per-round medians (``round_ms``), with the settings and the machine; it is reused
    while the same files and settings are asked for, since timing is the one step a busy
    CPU spoils.
    """
    import dvc.api
    import torch

    from yoloprune.benchmark import library_versions, machine_info, onnx_runner

    files: dict[str, tuple[str, str, int]] = {}  # md5 -> (path in the repo, experiment commit, imgsz)
    for r in df.itertuples():
        for key, path in onnx_outs({"imgsz": int(r.imgsz)}).items():
            md5 = getattr(r, f"onnx_{key}")
            if isinstance(md5, str) and md5 not in files:
                files[md5] = (path, r.rev, int(r.imgsz))
    settings = {"threads": threads, "rounds": rounds, "iters": iters, "warmup": warmup, "batch": 1}
    path = Path(out_dir) / "study" / "latency.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("settings") == settings and set(old.get("median_ms", {})) == set(files):
            return old
    work = WORK_DIR / "onnx"
    factories = {}
    for md5, (repo_path, rev, imgsz) in files.items():
        local = work / f"{md5}.onnx"
        if not local.is_file():
            with dvc.api.open(repo_path, repo=str(repo), rev=rev, mode="rb") as src, atomic_path(local) as tmp:
                tmp.write_bytes(src.read())
        factories[md5] = functools.partial(onnx_runner, local, imgsz, 1, threads=threads)
    LOGGER.info("timing %d ONNX models, interleaved: %d rounds of %d calls each", len(factories), rounds, iters)
    round_ms = interleaved_rounds(factories, rounds, iters, warmup)
    record = {"settings": settings, "median_ms": {k: median(v) for k, v in round_ms.items()}, "round_ms": round_ms,
              "machine": {**machine_info(torch.device("cpu")), **cpu_identity()}, "versions": library_versions("onnx"),
              "timed_at": datetime.now().astimezone().isoformat(timespec="seconds")}
    write_json(record, path)
    return record


CPU_IDENTITY_KEYS = ("cpu_id", "torch_cpu_capability")


def cpu_identity(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, str]:
    """Return what decides the CPU kernels torch runs: the CPU's vendor, family, model and stepping, and torch's ISA.

    Two machines that differ in these can run other kernels (AVX2 or AVX-512, other
    blockings), whose float sums round otherwise: a study's training is deterministic on
    one of them, not across them. Keys absent where the system does not say.
    """
    import torch

    out: dict[str, str] = {}
    try:
        fields = dict(line.split(":", 1) for line in Path(cpuinfo).read_text().splitlines()[:30] if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        parts = [fields.get("vendor_id")] + [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping")
                                             if k in fields]
        if all(parts):
            out["cpu_id"] = " ".join(str(p) for p in parts)
    except OSError:
        pass
    capability = getattr(torch.backends.cpu, "get_cpu_capability", None)
    if capability is not None:
        out["torch_cpu_capability"] = str(capability())
    return out


def control_latency(control_results: Sequence[dict], df: pd.DataFrame) -> list[dict]:
    """Return the controls with their baseline's re-timed latency: a control is that network, trained longer."""
    out = []
    for c in control_results:
        row = df[df["experiment"] == c.get("source")]
        out.append({**c, "latency_ms": float(row["lat_base"].iloc[0])} if len(row) else dict(c))
    return out


def with_latency(df: pd.DataFrame, record: dict[str, Any]) -> pd.DataFrame:
    """Return ``df`` with the re-timed latencies in the latency columns (the stage's own kept as ``*_stage``).

    The speed-up is ``paired_speed_up`` of the two models' rounds where the record has
    them (``round_ms``), else the ratio of their medians.
    """
    df = df.copy()
    medians, rounds = record.get("median_ms", {}), record.get("round_ms", {})
    for col in ("lat_base", "lat_ft", "lat_speed_up"):
        df[f"{col}_stage"] = df[col]
    df["lat_base"] = pd.to_numeric(df["onnx_base"].map(medians), errors="coerce")
    df["lat_ft"] = pd.to_numeric(df["onnx_ft"].map(medians), errors="coerce")
    paired = [paired_speed_up(rounds[b], rounds[f]) if b in rounds and f in rounds else math.nan
              for b, f in zip(df["onnx_base"], df["onnx_ft"])]
    df["lat_speed_up"] = pd.Series(paired, index=df.index).fillna(df["lat_base"] / df["lat_ft"])
    return df


# --- the reading: prose generated from the table alone --------------------------------------------------------------

def _row(df: pd.DataFrame, name: str) -> Any:
    hit = df[df["experiment"] == name]
    return next(hit.itertuples()) if len(hit) else None


def _rows(df: pd.DataFrame, names: Iterable[str]) -> list:
    return [r for r in (_row(df, n) for n in names) if r is not None]


def _pending(names: Iterable[str]) -> str:
    return f"Not measured yet ({', '.join(names)} unfinished)."


def reading(df: pd.DataFrame, pts: pd.DataFrame, checks: pd.DataFrame, control_results: Sequence[dict]) -> dict:
    """Return the report's sentences, one per finding, each computed from the tables (never typed in)."""
    out: dict[str, str] = {}
    front = pts.loc[pts["front"].astype(bool)].sort_values("latency_ms")
    out["front"] = ("On the Pareto front (no other model at least as fast and as accurate): " + "; ".join(
        f"{p.label} ({p.latency_ms:.2f} ms, mAP50-95 {p.map50_95:.3f})" for p in front.itertuples()) + "."
        if len(front) else "No points yet.")

    if len(checks):
        missed = checks[~checks["met"]]
        worst = "; ".join(f"{m.experiment} {m.criterion} {_measured(m)} vs {m.required} (gap {_gap(m)})"
                          for m in missed.itertuples())
        out["targets"] = (f"{int(checks['met'].sum())} of {len(checks)} target checks met."
                          + (f" Missed: {worst}." if len(missed) else ""))
    else:
        out["targets"] = "No target checks yet."
    out["spread"] = _spread(df)

    pruned = df.dropna(subset=["lat_speed_up", "achieved"])
    if len(pruned):
        share = 100 * pruned["lat_speed_up"] / pruned["achieved"]
        lo, hi = pruned.loc[share.idxmin()], pruned.loc[share.idxmax()]
        out["latency_vs_macs"] = (
            f"The ONNX Runtime latency speed-up was a median {share.median():.0f} % of the MACs speed-up over "
            f"{len(pruned)} pruned models (MACs speed-up -> latency speed-up): least {lo.experiment} "
            f"{lo.achieved:.2f}× -> {lo.lat_speed_up:.2f}×, most {hi.experiment} {hi.achieved:.2f}× -> "
            f"{hi.lat_speed_up:.2f}×.")
    else:
        out["latency_vs_macs"] = "No pruned models measured yet."

    methods = _rows(df, [exp_name(V8N, m, 2.0) for m in (DEFAULT_METHOD, *METHODS)])
    if methods:
        best = max(methods, key=lambda r: r.map_ft)
        out["methods"] = ("At 2× on yolov8n, fine-tuned mAP50-95 by method: " + ", ".join(
            f"{r.method} {r.map_ft:.3f} ({r.lat_ft:.2f} ms)" for r in methods) + f"; best: {best.method}.")
    else:
        out["methods"] = _pending(["the method series"])

    rounds = sorted(_rows(df, [DEFAULT, *(exp_name(V8N, DEFAULT_METHOD, 2.0, f"-r{r}") for r in ROUND_TOS)]),
                    key=lambda r: r.round_to)
    out["round_to"] = ("Same 2× target by round_to: " + ", ".join(
        f"{r.round_to:g}: {r.lat_ft:.2f} ms ({r.lat_speed_up:.2f}× vs its baseline run), mAP50-95 {r.map_ft:.3f}"
        for r in rounds) + ".") if rounds else _pending(["the round_to series"])

    budget = _budget(df)
    out["budget"] = ("Retention at 2× by fine-tune epochs: " + ", ".join(
        f"{e:g}: {ret:.1f} %" for e, ret in budget) + ".") if budget else _pending([DEFAULT])

    gens = _rows(df, [exp_name(m, DEFAULT_METHOD, s) for m in GENERATIONS for s in GENERATION_SPEED_UPS])
    out["generations"] = ("By generation (lamp): " + "; ".join(
        f"{r.family} {r.target:g}× retains {r.retention:.1f} % at {r.lat_speed_up:.2f}× latency" for r in gens)
        + ".") if gens else _pending(["the generation series"])

    out["frontier"] = _frontier(df)
    out["control"] = _control(df, control_results)
    out["curves"] = _curves(df)
    out["remedy"] = _remedy(df)
    out["gaps"] = _gaps(df, checks)
    out["recommendation"] = _recommendation(df, checks)
    return out


def _measured(m: Any) -> str:
    return f"{m.measured:+.1%}" if m.unit == "%" else f"{m.measured:.2f}{' %' if m.unit == 'pt' else m.unit}"


def _gap(m: Any) -> str:
    return f"{m.gap:+.1%}" if m.unit == "%" else f"{m.gap:+.2f}{' pt' if m.unit == 'pt' else m.unit}"


def _budget(df: pd.DataFrame) -> list[tuple[float, float]]:
    """Return (fine-tune epochs, retention %) at 2× on yolov8n: 0 (the pruned model), then each run budget."""
    default = _row(df, DEFAULT)
    out = []
    if default is not None and pd.notna(default.map_pruned) and default.map_base:
        out.append((0.0, 100 * default.map_pruned / default.map_base))
    for r in _rows(df, [DEFAULT, *(exp_name(V8N, DEFAULT_METHOD, 2.0, f"-ft{e}") for e in (FEW_EPOCHS, LONG_EPOCHS))]):
        out.append((float(r.ft_epochs), float(r.retention)))
    return sorted(out)


def seed_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Return the finished runs of each replicated experiment and its seed replicates (``REPLICATE_GROUPS``).

    The ``group`` column names the experiment a run replicates (itself for the sweep's run).
    """
    group_of = {n: g for g, reps in REPLICATE_GROUPS.items() for n in (g, *reps)}
    if "experiment" not in df:
        return df.iloc[:0].assign(group=pd.Series(dtype=str))
    runs = df[df["experiment"].isin(group_of)].copy()
    runs["group"] = runs["experiment"].map(group_of)
    return runs


def seed_spread(df: pd.DataFrame) -> pd.DataFrame:
    """Return each replicated experiment's spread over training seeds: a row per group and compared figure.

    Columns: group (the replicated experiment), figure (the experiments table's column,
    ``COMPARED``), label, kind, n (runs), mean, sd (sample standard deviation), min and
    max. Groups with fewer than two finished runs are left out.
    """
    rows = []
    for group, runs in seed_runs(df).groupby("group", sort=False):
        for col, (label, kind) in COMPARED.items():
            values = pd.to_numeric(runs[col], errors="coerce").dropna() if col in runs else pd.Series(dtype=float)
            if len(values) >= 2:
                rows.append({"group": group, "figure": col, "label": label, "kind": kind, "n": len(values),
                             "mean": values.mean(), "sd": values.std(ddof=1), "min": values.min(),
                             "max": values.max()})
    return pd.DataFrame(rows, columns=["group", "figure", "label", "kind", "n", "mean", "sd", "min", "max"])


def _replicates_pending(df: pd.DataFrame) -> str:
    return _pending([n for g, reps in REPLICATE_GROUPS.items() for n in (g, *reps) if _row(df, n) is None])


def _spread(df: pd.DataFrame) -> str:
    """Say how far the replicated experiments move when only the training seed changes (see REPLICATE_SEEDS)."""
    spread = seed_spread(df)
    timing = _timing_spread(df)
    if not len(spread):
        pending = _replicates_pending(df)
        return f"{timing} Accuracy: {pending}" if timing else pending
    specs = {"map": ".3f", "pt": ".1f", "macs": ".3f", "latency": ".2f"}
    units = {"pt": " %", "macs": "×", "latency": "×"}
    groups = []
    for group, rows in spread.groupby("group", sort=False):
        figures = ", ".join(f"{r.label} {r.mean:{specs[r.kind]}}{units.get(r.kind, '')} ± {r.sd:{specs[r.kind]}} "
                            f"({r.min:{specs[r.kind]}} to {r.max:{specs[r.kind]}})" for r in rows.itertuples())
        groups.append(f"{group} over {int(rows['n'].max())} runs: {figures}")
    accuracy = ("Runs that differ only in the training seed of the baseline and the fine-tune (the sweep's and "
                "the seed replicates; mean ± standard deviation, range): " + "; ".join(groups) + ".")
    tols = {f: t for f, t in family_tolerances(df).items() if "map_ft" in t}
    if tols:
        accuracy += (" Two runs of one setting that differ by less than this are within this noise ("
                     f"{NOISE_SIGMAS:g} standard deviations of a two-run difference, per model family): " + "; ".join(
                         f"{f} {t['map_ft']:.3f} fine-tuned mAP50-95, {t.get('map_base', math.nan):.3f} baseline"
                         for f, t in tols.items())
                     + ". Measured on the 2× default experiment; settings that prune harder or by a weaker "
                     "criterion may spread wider.")
    return f"{timing} Accuracy: {accuracy}" if timing else accuracy


def _timing_spread(df: pd.DataFrame) -> str:
    """Say how far the latency of one pruned network moves between its copies (same widths, other weights)."""
    same = df.dropna(subset=["lat_ft", "macs_ft"]).groupby(["family", "macs_ft", "params_ft"])["lat_ft"]
    spreads = [g.max() / g.min() - 1 for _, g in same if len(g) > 1]
    if not spreads:
        return ""
    return (f"Latency: experiments that prune to the same widths and differ only in their weights (fine-tune budget) "
            f"timed up to {max(spreads):.1%} apart ({len(spreads)} such group(s)), so latency speed-ups closer than "
            "that are within timing noise.")


def _frontier(df: pd.DataFrame) -> str:
    big, small = _row(df, FRONTIER_NAME), _row(df, DEFAULT)
    if big is None or small is None:
        return _pending([n for n, r in ((FRONTIER_NAME, big), (DEFAULT, small)) if r is None])
    gain = big.map_ft - small.map_base
    speed = small.lat_base / big.lat_ft
    verdict = ("worth it: more accurate than the smaller model trained from scratch at the same MACs"
               if gain > 0 else "not worth it: the smaller model trained from scratch is at least as accurate")
    return (f"{family(FRONTIER[0])} pruned {big.achieved:.2f}× to {family(FRONTIER[1])}'s MACs reaches mAP50-95 "
            f"{big.map_ft:.3f} at {big.lat_ft:.2f} ms; {family(FRONTIER[1])} from scratch {small.map_base:.3f} at "
            f"{small.lat_base:.2f} ms ({gain:+.3f} mAP, {speed:.2f}× its speed): {verdict}.")


def _control(df: pd.DataFrame, control_results: Sequence[dict]) -> str:
    if not control_results:
        return _pending([c.name for c in controls()])
    parts = []
    for c in control_results:
        gain = c["map50_95"] - c["baseline_map50_95"]
        rows = df[(df["baseline_md5"] == c["baseline_md5"]) & df["retention_ctrl"].notna()]
        ret = ", ".join(f"{r.experiment} {r.retention_ctrl:.1f} % (vs baseline {r.retention:.1f} %)"
                        for r in rows.itertuples())
        plateau = ("the baseline had plateaued" if abs(gain) < PLATEAU_TOL else
                   "the baseline had NOT plateaued (see *Baseline budget*)" if gain > 0 else
                   "further training lowered it")
        parts.append(f"{c['name']}: {c['epochs']} more epochs on the fine-tune schedule took mAP50-95 "
                     f"{c['baseline_map50_95']:.3f} -> {c['map50_95']:.3f} ({gain:+.3f}: {plateau})"
                     + (f"; retention against it: {ret}" if ret else ""))
    return "; ".join(parts) + "."


def _curves(df: pd.DataFrame) -> str:
    """Say, from each baseline's own training curve, how much its last epochs still gained (``tail_gain``)."""
    rows = df.dropna(subset=["base_tail"]).drop_duplicates("baseline_md5") if "base_tail" in df else df.iloc[:0]
    if not len(rows):
        return ("No baseline curve recorded yet (the baseline stage writes `map50_95_tail_gain` to "
                f"`metrics/baseline.json` when it trains {2 * TAIL_WINDOW} epochs or more).")
    flat = rows["base_tail"] < PLATEAU_TOL
    return (f"Mean mAP50-95 of each baseline's last {TAIL_WINDOW} epochs minus that of the {TAIL_WINDOW} before, "
            "from its own training curve (`metrics/baseline_curves.csv`): " + "; ".join(
                f"{r.family} ({r.experiment}) {r.base_tail:+.3f} after {r.base_epochs_run:.0f} epochs"
                f"{'' if ok else ' (still rising)'}" for r, ok in zip(rows.itertuples(), flat, strict=True))
            + f". {int(flat.sum())} of {len(rows)} baselines rose less than {PLATEAU_TOL} (the plateau bar).")


def budget_table(df: pd.DataFrame, probe_df: pd.DataFrame, control_results: Sequence[dict]) -> pd.DataFrame:
    """Return, per generation and baseline budget, the 2x experiment's baseline, control and fine-tuned mAP50-95.

    ``df`` holds the sweep's rows, ``probe_df`` the budget probe's; ``control_results``
    both sets of controls. A control counts for the row whose baseline it trained.
    Rows go by generation, the shorter baseline first.
    """
    by_source = {c["source"]: c for c in control_results}
    rows = []
    for m in GENERATIONS:
        for table, suffix in ((probe_df, PROBE_SUFFIX), (df, "")):
            name = exp_name(m, DEFAULT_METHOD, 2.0, suffix)
            r = _row(table, name)
            if r is None:
                continue
            c = by_source.get(name)
            ours = bool(c) and c.get("baseline_md5") == r.baseline_md5
            ctrl = float(c["map50_95"]) if ours else math.nan
            rows.append({"family": family(m), "experiment": name, "base_epochs": r.base_epochs,
                         "map_base": r.map_base, "ctrl_epochs": float(c["epochs"]) if ours else math.nan,
                         "map_ctrl": ctrl, "ctrl_gain": ctrl - r.map_base, "map_ft": r.map_ft,
                         "retention": r.retention, "retention_ctrl": percent(r.map_ft, ctrl), "achieved": r.achieved})
    return pd.DataFrame(rows, columns=["family", "experiment", "base_epochs", "map_base", "ctrl_epochs", "map_ctrl",
                                       "ctrl_gain", "map_ft", "retention", "retention_ctrl", "achieved"])


def _gain(r: Any) -> str:
    """Return what a budget-table row's control gained, and whether that is a plateau (a loss is one too)."""
    if math.isnan(r.ctrl_gain):
        return "its control not run yet"
    verdict = "a plateau" if r.ctrl_gain < PLATEAU_TOL else "still gaining"
    return f"{r.ctrl_gain:+.3f} from {r.ctrl_epochs:.0f} more epochs ({verdict})"


def _budget_reading(bt: pd.DataFrame) -> str:
    """Return the budget probe's reading: per generation, what the longer baseline changed, then the verdict."""
    probed = set(bt.loc[bt["experiment"].str.endswith(PROBE_SUFFIX), "family"]) if len(bt) else set()
    parts = [] if probed else [_pending([e.name for e in budget_probe()]).removesuffix(".")]
    for fam, rows in bt.groupby("family", sort=False):
        if fam not in probed:
            continue
        short, long = rows.iloc[0], rows.iloc[-1]
        if len(rows) < 2:
            parts.append(f"{fam}: baseline {long.map_base:.3f} after {long.base_epochs:.0f} epochs, then "
                         f"{_gain(long)}; 2× retention {long.retention:.1f} %")
            continue
        ctrl = ("" if math.isnan(short.retention_ctrl) or math.isnan(long.retention_ctrl) else
                f", against the control {short.retention_ctrl:.1f} % -> {long.retention_ctrl:.1f} %")
        parts.append(f"{fam}: baseline {short.map_base:.3f} -> {long.map_base:.3f} "
                     f"({long.map_base - short.map_base:+.3f}) from {short.base_epochs:.0f} to "
                     f"{long.base_epochs:.0f} epochs; then {_gain(short)} at {short.base_epochs:.0f}, "
                     f"{_gain(long)} at {long.base_epochs:.0f}; 2× retention {short.retention:.1f} % -> "
                     f"{long.retention:.1f} %{ctrl}")
    sweep_rows = bt[~bt["experiment"].str.endswith(PROBE_SUFFIX) & bt["ctrl_gain"].notna()] if len(bt) else bt
    flat = sweep_rows["ctrl_gain"] < PLATEAU_TOL
    verdict = ("" if not len(sweep_rows) else
               f" With the study's {PROFILE['baseline.epochs']}-epoch baselines, {int(flat.sum())} of {len(flat)} "
               f"controls gained less than {PLATEAU_TOL} mAP50-95 (this report's plateau bar).")
    return "; ".join(parts) + "." + verdict


def _remedy(df: pd.DataFrame) -> str:
    pairs = [(exp_name(m, DEFAULT_METHOD, 3.0), exp_name(m, DEFAULT_METHOD, 3.0, REMEDY_SUFFIX)) for m in GENERATIONS]
    found = [(_row(df, a), _row(df, b)) for a, b in pairs]
    done = [(base, fix) for base, fix in found if base is not None and fix is not None]
    if not done:
        return _pending([n for pair, rows in zip(pairs, found) for n, r in zip(pair, rows) if r is None])
    return "A longer fine-tune at 3× moved retention: " + "; ".join(
        f"{base.family} {base.retention:.1f} % -> {fix.retention:.1f} % ({fix.retention - base.retention:+.1f} pt, "
        f"{base.ft_epochs:g} -> {fix.ft_epochs:g} epochs)" for base, fix in done) + "."


def _gaps(df: pd.DataFrame, checks: pd.DataFrame) -> str:
    """Say which measured setting moved each kind of missed target furthest, and what the sweep did not try."""
    if not len(checks) or checks["met"].all():
        return "No target missed." if len(checks) else _pending(["the sweep"])
    parts = []
    for target in sorted({t.speed_up for t in TARGETS}):
        for col, what, fmt in (("lat_speed_up", "latency speed-up", "{:.2f}×"), ("retention", "retention", "{:.1f} %")):
            rows = df[(df["target"] == target) & df[col].notna()]
            if len(rows):
                best = rows.loc[rows[col].idxmax()]
                parts.append(f"the highest {what} at {target:g}× was {best.experiment}'s {fmt.format(best[col])}")
    return ("Of the settings measured, " + "; ".join(parts) + ". Not tried here: distillation from the unpruned "
            "model during the fine-tune, sparsity training before pruning, and a larger image size (where the "
            "convolutions, not the per-call overhead, take the time).")


def _recommendation(df: pd.DataFrame, checks: pd.DataFrame) -> str:
    methods = _rows(df, [exp_name(V8N, m, 2.0) for m in (DEFAULT_METHOD, *METHODS)])
    rounds = _rows(df, [DEFAULT, *(exp_name(V8N, DEFAULT_METHOD, 2.0, f"-r{r}") for r in ROUND_TOS)])
    if not methods or not rounds:
        return _pending(["the method and round_to series"])
    method = max(methods, key=lambda r: r.map_ft)
    best_map = max(r.map_ft for r in rounds)
    near = [r for r in rounds if r.map_ft >= best_map - 0.01]  # within a point of mAP50-95: latency decides
    rnd = min(near, key=lambda r: r.lat_ft)
    met = [t.speed_up for t in TARGETS if (checks["target"] == t.speed_up).any()
           and checks[checks["target"] == t.speed_up]["met"].all()]
    speed = (f"the largest speed-up whose targets every measured model met is {max(met):g}×" if met
             else "no speed-up met all its targets")
    bar = next(t.min_retention_pct for t in TARGETS if t.speed_up == 2.0)
    enough = [epochs for epochs, kept in _budget(df) if epochs > 0 and kept >= bar]
    budget = (f"by \"fewest fine-tune epochs keeping ≥ {bar:g} % at 2×\" the fine-tune is {min(enough):g} epochs"
              if enough else f"no fine-tune budget measured kept ≥ {bar:g} % at 2×")
    return (f"By the rule \"highest fine-tuned mAP50-95 at 2×\" the method is {method.method}; by \"fastest "
            f"round_to within 0.01 mAP50-95 of the best\" round_to is {rnd.round_to:g}; {budget}; {speed}.")


# --- the report ---------------------------------------------------------------------------------------------------

TABLE = [  # (column, header, format)
    ("experiment", "experiment", "{}"), ("family", "model", "{}"), ("method", "method", "{}"),
    ("round_to", "round_to", "{:g}"), ("ft_epochs", "ft epochs", "{:g}"), ("target", "target ×", "{:g}"),
    ("achieved", "MACs ×", "{:.3f}"), ("params_base", "params M (base)", "{:.2f}", 1e-6),
    ("params_ft", "params M (pruned)", "{:.2f}", 1e-6), ("macs_base", "GMACs (base)", "{:.3f}", 1e-9),
    ("macs_ft", "GMACs (pruned)", "{:.3f}", 1e-9), ("map_base", "mAP50-95 base", "{:.3f}"),
    ("map_pruned", "pruned", "{:.3f}"), ("map_ft", "fine-tuned", "{:.3f}"), ("retention", "retention %", "{:.1f}"),
    ("retention_ctrl", "vs control %", "{:.1f}"), ("lat_base", "latency ms (base)", "{:.2f}"),
    ("lat_ft", "latency ms (pruned)", "{:.2f}"), ("lat_speed_up", "latency ×", "{:.2f}"),
]


def md_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Return a GitHub markdown table."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return spec.format(value * scale if scale != 1.0 else value)


def experiments_table(df: pd.DataFrame) -> str:
    """Return the per-experiment markdown table."""
    rows = [[_fmt(getattr(r, col), *spec) for col, _, *spec in TABLE] for r in df.itertuples()]
    return md_table(rows, [h for _, h, *_ in TABLE])


def targets_table(checks: pd.DataFrame) -> str:
    """Return the targets markdown table: met or missed, and by how much."""
    rows = [[m.experiment, f"{m.target:g}×", m.criterion, m.required, _measured(m) if pd.notna(m.measured) else "–",
             _gap(m) if pd.notna(m.gap) else "–", "met" if m.met else "**missed**"] for m in checks.itertuples()]
    return md_table(rows, ["experiment", "target", "criterion", "required", "measured", "gap", ""])


def plot(pts: pd.DataFrame, path: str | Path) -> Path:
    """Write the accuracy-vs-latency scatter (PNG) with the Pareto front marked; return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    colours = {fam: f"C{i}" for i, fam in enumerate(dict.fromkeys(pts["family"]))}
    markers = {"pruned": "o", "baseline": "s", "control": "X"}
    for (kind, fam), g in pts.groupby(["kind", "family"], sort=False):
        ax.scatter(g["latency_ms"], g["map50_95"], marker=markers.get(kind, "o"), s=60 if kind == "pruned" else 80,
                   edgecolors=colours[fam], facecolors="none" if kind == "baseline" else colours[fam],
                   label=f"{fam} {kind}", zorder=3)
    front = pts.loc[pts["front"].astype(bool)].sort_values("latency_ms")
    if len(front):
        ax.step(front["latency_ms"], front["map50_95"], where="post", color="black", lw=1, ls="--", zorder=2,
                label="Pareto front")
        ax.scatter(front["latency_ms"], front["map50_95"], s=180, facecolors="none", edgecolors="black", zorder=4)
    for p in pts.itertuples():
        if pd.notna(p.latency_ms) and pd.notna(p.map50_95):
            ax.annotate(p.label, (p.latency_ms, p.map50_95), fontsize=6, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("ONNX Runtime CPU latency (ms, median, batch 1)")
    ax.set_ylabel("mAP50-95 (after fine-tuning)")
    ax.set_title("Accuracy vs latency: pruned models, baselines and controls")
    ax.grid(alpha=0.3)
    if len(pts):
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


@dataclass(frozen=True)
class Context:
    """What the report says besides the numbers: where they came from and how to make them again."""

    commit: str = "unknown"  # the commits the experiments ran from, comma-separated (their pipeline files are HEAD's)
    commands: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    measured_by: str = ""  # where machine and versions come from
    missing: dict[str, str] = field(default_factory=dict)  # experiment -> state
    span: str = ""


def render(df: pd.DataFrame, pts: pd.DataFrame, checks: pd.DataFrame, control_results: Sequence[dict],
           ctx: Context, budget: pd.DataFrame | None = None) -> str:
    """Return ``results.md``: the reading, the plot, the tables, the budget probe, commands, machine and versions."""
    said = reading(df, pts, checks, control_results)
    budget = budget_table(df, df.iloc[:0], control_results) if budget is None else budget
    done = f"{len(df)} of {len(df) + len(ctx.missing)} experiments finished" + (f" ({ctx.span})" if ctx.span else "")
    lines = [
        "# Pruning study: accuracy and real speed",
        "",
        ("<!-- Generated by `python -m yoloprune.study report` from DVC experiments; do not edit: `make study` "
         "rewrites it. -->"),
        "",
        (f"Every figure below comes from the project's own pipeline (`dvc.yaml`), run as DVC experiments from "
         f"{_commits(ctx.commit)}; {done}. mAP50-95 is measured on the validation split with ONNX Runtime, latency "
         "is the median ONNX Runtime CPU forward pass at batch 1 (see *Machine and versions*)."),
        "",
        "![mAP50-95 after fine-tuning vs ONNX Runtime CPU latency](results.png)",
        "",
        ("Filled circles: pruned and fine-tuned; hollow squares: baselines (median latency over their runs); "
         "crosses: equal-budget controls; ringed and joined: the Pareto front."),
        "",
        "## Reading",
        "",
        *(f"- **{title}.** {said[key]}" for key, title in READING),
        "",
        "## Targets (issue 9)",
        "",
        ("At 2× MACs: fine-tuned mAP50-95 ≥ 97 % of the baseline and ONNX Runtime latency speed-up ≥ 1.7×; at 3×: "
         "≥ 93 % and ≥ 2.4×; every achieved MACs speed-up within ±2 % of its target. Gap: measured minus the bar "
         "(MACs: tolerance left)."),
        "",
        targets_table(checks) if len(checks) else "_No finished experiments yet._",
        "",
        "## All experiments",
        "",
        ("mAP50-95 *base* is the baseline, *pruned* before fine-tuning (PyTorch validation), *fine-tuned* after; "
         "retention is fine-tuned / base; *vs control* is fine-tuned / the equal-budget control (same baseline, "
         "same fine-tune epochs). Latency is the median of a model's rounds in one interleaved pass "
         "(`docs/study/latency.json`); the latency speed-up is the median over rounds of the baseline's time over "
         "the pruned model's, the two timed side by side in every round, so a CPU that speeds up or slows down "
         "between rounds moves both alike; a control's latency is its baseline's (the same network)."),
        "",
        experiments_table(df) if len(df) else "_No finished experiments yet._",
        "",
        "## Equal-budget controls",
        "",
        _controls_table(control_results),
        "",
        "## Baseline budget",
        "",
        (f"Each generation's 2× experiment again with its baseline trained {PROBE_EPOCHS} epochs instead of "
         f"{PROFILE['baseline.epochs']}, with an equal-budget control on that baseline (`make study-probe`, not "
         f"part of `make study`), set against the sweep's row. A control that gains less than {PLATEAU_TOL} "
         "mAP50-95 counts as a plateau. A baseline short of its plateau makes retention look better than it is."),
        "",
        _budget_reading(budget),
        "",
        _budget_md(budget),
        "",
        "## Run-to-run spread",
        "",
        ("Each generation's 2× experiment run again with other training seeds for the baseline and the fine-tune ("
         + "; ".join(f"{g}: {', '.join(str(s) for s in REPLICATE_SEEDS[m])}" for g, m in
                     zip(REPLICATE_GROUPS, REPLICATE_SEEDS))
         + "; `make study-probe`, not part of `make study`), beside the sweep's run: the noise that `python -m "
           "yoloprune.study compare` holds two runs of the study against (`docs/study/spread.csv`)."),
        "",
        _spread_md(df),
        "",
    ]
    if ctx.missing:
        lines += ["## Not finished", "", md_table([[n, s] for n, s in ctx.missing.items()], ["experiment", "state"]),
                  "", "`make study` queues what is missing and waits for it.", ""]
    lines += [
        "## Reproduce",
        "",
        "```bash",
        "make study   # resumable: run it again after an interruption; finished stages come from DVC's run cache",
        "```",
        "",
        "It runs these, in order (`dvc` is the project's venv's):",
        "",
        "```bash",
        *ctx.commands,
        "```",
        "",
        ("The points as a `dvc plots` view: `dvc plots show docs/study/points.json --template scatter "
         "-x latency_ms -y map50_95`."),
        "",
        "## Machine and versions",
        "",
        f"{ctx.measured_by}",
        "",
        md_table([[k, _fmt(v, "{:.2f}") if isinstance(v, float) else v]
                  for k, v in {**ctx.machine, **ctx.versions}.items()], ["", ""]),
        "",
    ]
    return "\n".join(lines)


READING = [("front", "Pareto front"), ("targets", "Targets"), ("spread", "Run-to-run spread"),
           ("latency_vs_macs", "Latency vs MACs"), ("methods", "Importance method"), ("round_to", "round_to"),
           ("budget", "Fine-tune budget"), ("generations", "Generations"), ("frontier", "Family frontier"),
           ("control", "Equal-budget control"), ("curves", "Baseline curves"), ("remedy", "Remedy tried"),
           ("gaps", "Closing the gaps"),
           ("recommendation", "Recommended default")]


def _commits(commits: str) -> str:
    """Return "commit `a`", or "commits `a`, `b` (...)" for the comma-separated list of ``Context.commit``."""
    shas = [c.strip() for c in commits.split(",") if c.strip()]
    if len(shas) < 2:
        return f"commit `{commits}`"
    listed = ", ".join(f"`{c}`" for c in shas)
    return f"commits {listed} (the same pipeline files: `dvc.yaml`, `params.yaml` and every stage's code)"


def _controls_table(control_results: Sequence[dict]) -> str:
    if not control_results:
        return "_Not run yet (`python -m yoloprune.study control`)._"
    rows = [[c["name"], c["source"], c["epochs"], _fmt(c["baseline_map50_95"], "{:.3f}"), _fmt(c["map50_95"], "{:.3f}"),
             _fmt(c["latency_ms"], "{:.2f}")] for c in control_results]
    return md_table(rows, ["control", "baseline of", "extra epochs", "mAP50-95 baseline", "mAP50-95 control",
                           "latency ms"])


def _spread_md(df: pd.DataFrame) -> str:
    runs, spread = seed_runs(df), seed_spread(df)
    if not len(spread):
        return _replicates_pending(df)
    cols = (("map_base", "{:.3f}"), ("map_ft", "{:.3f}"), ("retention", "{:.1f} %"), ("achieved", "{:.3f}×"),
            ("lat_speed_up", "{:.2f}×"))
    rows = []
    for group, group_runs in runs.groupby("group", sort=False):
        rows += [[r.experiment, *(_fmt(getattr(r, c), spec) for c, spec in cols)] for r in group_runs.itertuples()]
        stats = spread[spread["group"] == group].set_index("figure")
        if len(stats):
            rows += [[f"**{stat}** ({group})", *(_fmt(stats[stat].get(c), spec) for c, spec in cols)]
                     for stat in ("mean", "sd")]
    return md_table(rows, ["run", "mAP50-95 base", "fine-tuned", "retention", "MACs speed-up", "latency speed-up"])


def _budget_md(pl: pd.DataFrame) -> str:
    if not len(pl):
        return ""
    rows = [[r.experiment, _fmt(r.base_epochs, "{:.0f}"), _fmt(r.map_base, "{:.3f}"), _fmt(r.map_ctrl, "{:.3f}"),
             _fmt(r.ctrl_gain, "{:+.3f}"), _fmt(r.map_ft, "{:.3f}"), _fmt(r.retention, "{:.1f} %"),
             _fmt(r.retention_ctrl, "{:.1f} %"), _fmt(r.achieved, "{:.3f}×")] for r in pl.itertuples()]
    return md_table(rows, ["experiment", "baseline epochs", "mAP50-95 baseline", "control", "control gain",
                           "fine-tuned 2×", "retention", "vs control", "MACs speed-up"])


def write_report(df: pd.DataFrame, control_results: Sequence[dict], ctx: Context, out_dir: str | Path = OUT_DIR,
                 probe_df: pd.DataFrame | None = None, probe_controls: Sequence[dict] = ()) -> tuple[Path, Path]:
    """Write ``results.md``, ``results.png`` and ``study/{experiments,budget,spread}.csv, points.json`` under ``out_dir``.

    ``probe_df`` and ``probe_controls`` are the budget probe's rows and controls, if
    any. Every file is written atomically. Return the paths of the markdown and the PNG.
    """
    out_dir = Path(out_dir)
    df = with_control(df, control_results)
    bt = budget_table(df, df.iloc[:0] if probe_df is None else probe_df, [*control_results, *probe_controls])
    pts = points(df, control_results)
    checks = check_targets(df)
    png = plot(pts, out_dir / "results.png")
    md = out_dir / "results.md"
    with atomic_path(md) as tmp:
        tmp.write_text(render(df, pts, checks, control_results, ctx, bt))
    with atomic_path(out_dir / "study" / "experiments.csv") as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(out_dir / "study" / "budget.csv") as tmp:
        bt.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(out_dir / "study" / "spread.csv") as tmp:
        seed_spread(df).to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(out_dir / "study" / "points.json") as tmp:
        tmp.write_text(pts.to_json(orient="records", indent=2) + "\n")
    return md, png


def read_controls(out_dir: str | Path = OUT_DIR, probe: bool = False) -> list[dict]:
    """Return the control results written by ``run_control``, in ``controls(probe)`` order."""
    found = []
    for c in controls(probe):
        path = Path(out_dir) / "study" / f"{c.name}.json"
        if path.is_file():
            found.append(json.loads(path.read_text()))
    return found


def context(records: Sequence[ExpRecord], experiments: Sequence[Experiment], repo: str | Path = ".") -> Context:
    """Return the report's provenance: commit, commands, the benchmark's machine and versions, what is missing."""
    names = {e.dvc_name for e in experiments}
    commits = sorted({r.baseline[:12] for r in records if r.finished and r.name in names and r.baseline})
    commit = ", ".join(commits) or head_commit(repo)[:12] or "unknown"
    commands = [f"dvc {' '.join(e.command())}" for e in experiments]
    commands += [f"python -m yoloprune.study run   # dvc queue start -j {JOBS}; queued once its baseline is trained",
                 "python -m yoloprune.study control   # the equal-budget controls (docs/study/*-control.json)",
                 "python -m yoloprune.study report    # this file, results.png, docs/study/"]
    machine, versions, measured_by = {}, {}, ""
    source = next((r for r in records if r.finished and r.name in names), None)
    if source is not None:
        shown = subprocess.run(["git", "show", f"{source.rev}:metrics/benchmark_full.json"], cwd=repo,
                               capture_output=True, text=True, check=False)
        if shown.returncode == 0:
            base = json.loads(shown.stdout).get("base", {})
            machine, versions = base.get("machine", {}), base.get("versions", {})
            measured_by = f"As recorded by the benchmark stage of {source.name} (`metrics/benchmark_full.json`):"
    if not machine:
        import torch

        from yoloprune.benchmark import library_versions, machine_info

        machine, versions = machine_info(torch.device("cpu")), library_versions("onnx")
        measured_by = "Collected when this report was written (no experiment's benchmark record was readable):"
    stamps = sorted(r.timestamp for r in records if r.finished and r.name in names and r.timestamp)
    span = f"finished between {stamps[0]} and {stamps[-1]}" if stamps else ""
    return Context(commit, commands, machine, versions, measured_by, missing(records, experiments), span)


def report(experiments: Sequence[Experiment], repo: str | Path = ".", out_dir: str | Path = OUT_DIR
           ) -> tuple[Path, Path]:
    """Collect the finished experiments and controls and write the report; return the markdown and PNG paths."""
    records = matching(current(experiments_in(repo), repo), [*experiments, *probes()])
    # The replicate's and the remedies' rows, when there are, with the sweep's.
    df = collect(records, [*experiments, *replicates(), *generation_remedies()])
    ctx = context(records, experiments, repo)
    if len(df):
        threads = int(next((r.params.get("benchmark", {}).get("threads", 2) for r in records if r.finished), 2))
        timing = retime(df, repo, out_dir, threads=threads)
        df = with_latency(df, timing)
        ctx = replace(ctx, machine=timing["machine"], versions=timing["versions"],
                      measured_by=(f"Latency: every model timed again in one interleaved pass at "
                                   f"{timing['timed_at']} ({timing['settings']['rounds']} rounds of "
                                   f"{timing['settings']['iters']} calls each, {threads} threads; "
                                   "`docs/study/latency.json`), on:"))
    probe_df = collect(records, budget_probe())
    md, png = write_report(df, control_latency(read_controls(out_dir), df), ctx, out_dir, probe_df,
                           read_controls(out_dir, probe=True))
    LOGGER.info("wrote %s and %s (%d experiments)", md, png, len(df))
    return md, png


# --- two runs of the study, side by side ---------------------------------------------------------------------------

# Column of experiments.csv -> (label, tolerance kind). Kinds: "map" (mAP50-95, absolute: MAP_TOL), "pt" (retention,
# in points: RETENTION_TOL), "latency" (a speed-up ratio, relative: LATENCY_TOL), "macs" (relative: MACS_TOL).
COMPARED = {"map_base": ("baseline mAP50-95", "map"), "map_ft": ("fine-tuned mAP50-95", "map"),
            "retention": ("retention %", "pt"), "achieved": ("MACs speed-up", "macs"),
            "lat_speed_up": ("latency speed-up", "latency")}
RELATIVE = {"latency", "macs"}  # kinds compared as new / old - 1
MAP_TOL = 0.01  # mAP50-95: the report's resolution (PLATEAU_TOL); a same-seed re-run on the same CPU differs by less
RETENTION_TOL = 2.0  # points: MAP_TOL on a ~0.5 baseline
LATENCY_TOL = 0.10  # relative: ONNX files of the same widths were timed up to ~10 % apart in one interleaved pass
MACS_TOL = 0.001  # relative: pruning is deterministic given the same baseline
SETTINGS = ("model", "method", "target", "imgsz", "round_to", "ft_epochs", "base_epochs")  # must agree to compare
# A difference of two runs beyond this many of its standard deviations (from the seed replicates) is not chance:
# about 0.3 % of figures would cross it by chance alone if the noise were normal.
NOISE_SIGMAS = 3.0


def seed_tolerances(*tables: pd.DataFrame, sigmas: float = NOISE_SIGMAS, family: str | None = None
                    ) -> dict[str, float]:
    """Return a tolerance per compared column (``COMPARED``) from the seed replicates the experiments tables hold.

    The tolerance is ``sigmas`` standard deviations of the difference of two runs:
    ``sigmas * sqrt(2) * sd``, with one run's sd pooled over the replicated experiments
    of every table (each group's variance about its own mean, weighted by its degrees of
    freedom) and taken relative to the mean for the ratio kinds (``RELATIVE``), as
    ``compare_runs`` compares them. ``family`` (``v8n``): only that model family's
    groups. A column no group has two seed runs of is left out.
    """
    pooled: dict[str, list[tuple[float, int]]] = {}
    for table in tables:
        spread = seed_spread(table)
        if family is not None:
            spread = spread[spread["group"].map(GROUP_FAMILY) == family]
        for r in spread.itertuples():
            sd = r.sd / r.mean if r.kind in RELATIVE else r.sd  # the sd of values / mean, for ratios
            pooled.setdefault(r.figure, []).append((sd ** 2, r.n - 1))
    return {col: sigmas * math.sqrt(2 * sum(v * dof for v, dof in parts) / sum(dof for _, dof in parts))
            for col, parts in pooled.items()}


def family_tolerances(*tables: pd.DataFrame, sigmas: float = NOISE_SIGMAS) -> dict[str, dict[str, float]]:
    """Return ``seed_tolerances`` for each model family the tables hold seed replicates of: family -> column -> tol.

    Per family, since their noise differs (measured: yolo26n's baseline 0.226 and 0.475
    on two seeds, yolov8n's within 0.536 to 0.619 on four); a family with no replicates
    has none, and ``compare_runs`` holds it to the fixed tolerances.
    """
    families = {GROUP_FAMILY[g] for t in tables for g in seed_runs(t)["group"]}
    found = {f: seed_tolerances(*tables, sigmas=sigmas, family=f) for f in sorted(families)}
    return {f: tol for f, tol in found.items() if tol}


def read_experiments(path: str | Path) -> pd.DataFrame:
    """Return a study run's experiments table: ``path`` is its ``experiments.csv`` or the report folder holding
    ``study/experiments.csv`` (``docs``)."""
    path = Path(path)
    csv_path = path / "study" / "experiments.csv" if path.is_dir() else path
    if not csv_path.is_file():
        raise YoloPruneError(f"{csv_path}: no experiments table; pass a report folder (docs) or its "
                             "study/experiments.csv, written by `python -m yoloprune.study report`")
    try:
        df = pd.read_csv(csv_path)
    except (ValueError, UnicodeDecodeError) as e:  # pandas' EmptyDataError and ParserError are ValueErrors
        raise YoloPruneError(f"{csv_path}: unreadable experiments table ({type(e).__name__}); write it again with "
                             "`python -m yoloprune.study report`") from e
    if "experiment" not in df:
        raise YoloPruneError(f"{csv_path}: not a study experiments table (no 'experiment' column)")
    return df


def compare_runs(old: pd.DataFrame, new: pd.DataFrame, map_tol: float = MAP_TOL, retention_tol: float = RETENTION_TOL,
                 latency_tol: float = LATENCY_TOL, measured: dict[str, dict[str, float]] | None = None
                 ) -> pd.DataFrame:
    """Return every compared figure (``COMPARED``) of the experiments both runs have, old beside new.

    Columns: experiment, figure, kind, old, new, diff (new - old; relative for ratios),
    tol and ``within`` (the difference is inside its tolerance: the noise between two
    runs). A figure one run lacks is not within; so is every figure of an experiment
    whose settings (``SETTINGS``) differ between the runs, which has a row of its own.
    ``measured`` (family -> column -> tolerance, ``family_tolerances``) widens a figure's
    fixed tolerance to the noise measured for its model family; it never narrows one.
    """
    tols = {"map": map_tol, "pt": retention_tol, "latency": latency_tol, "macs": MACS_TOL}
    measured = measured or {}
    both = old.merge(new, on="experiment", suffixes=("_old", "_new"))
    rows = []
    for r in both.itertuples(index=False):
        changed = [k for k in SETTINGS
                   if f"{k}_old" in both and str(getattr(r, f"{k}_old")) != str(getattr(r, f"{k}_new"))]
        if changed:
            rows.append({"experiment": r.experiment, "figure": "settings", "kind": "settings", "old": math.nan,
                         "new": math.nan, "diff": math.nan, "tol": 0.0, "within": False,
                         "note": ", ".join(f"{k} {getattr(r, f'{k}_old')} -> {getattr(r, f'{k}_new')}"
                                           for k in changed)})
        for col, (label, kind) in COMPARED.items():
            a, b = getattr(r, f"{col}_old", math.nan), getattr(r, f"{col}_new", math.nan)
            if pd.isna(a) and pd.isna(b):
                continue
            diff = (b / a - 1 if kind in RELATIVE else b - a) if not (pd.isna(a) or pd.isna(b)) else math.nan
            tol = max(tols[kind], measured.get(str(getattr(r, "family_old", "")), {}).get(col, 0.0))
            rows.append({"experiment": r.experiment, "figure": label, "kind": kind, "old": float(a), "new": float(b),
                         "diff": float(diff), "tol": tol,
                         "within": not changed and not math.isnan(diff) and abs(diff) <= tol + 1e-12, "note": ""})
    return pd.DataFrame(rows, columns=["experiment", "figure", "kind", "old", "new", "diff", "tol", "within", "note"])


def comparison_md(old: pd.DataFrame, new: pd.DataFrame, table: pd.DataFrame, basis: Sequence[str] = ()) -> str:
    """Return the comparison as markdown: the verdict, what moved, the experiments only one run has, and the table.

    ``basis``: sentences that say where the tolerances come from and what the runs ran on.
    """
    only_old = sorted(set(old["experiment"]) - set(new["experiment"]))
    only_new = sorted(set(new["experiment"]) - set(old["experiment"]))
    specs = {"map": "±{:.3g}", "pt": "±{:.3g} pt", "latency": "±{:.1%}", "macs": "±{:.2%}"}
    figures = table[table["kind"] != "settings"].groupby("figure", sort=False)
    bounds = ", ".join(f"{label} {specs[g['kind'].iloc[0]].format(g['tol'].min())}"
                       + (f" to {specs[g['kind'].iloc[0]].format(g['tol'].max())}" if g["tol"].nunique() > 1 else "")
                       for label, g in figures)
    verdict = (f"{int(table['within'].sum())} of {len(table)} figures of {table['experiment'].nunique()} "
               f"experiments agree within noise{f' ({bounds})' if bounds else ''}.")
    lines = [verdict, *basis]
    outside = table[~table["within"]]
    if len(outside):
        lines.append("Outside: " + "; ".join(r.note and f"{r.experiment} settings differ ({r.note})" or
                                             f"{r.experiment} {r.figure} {r.old:.4g} -> {r.new:.4g}"
                                             for r in outside.itertuples()) + ".")
    for label, names_ in (("Only in the first run", only_old), ("Only in the second run", only_new)):
        if names_:
            lines.append(f"{label}: {', '.join(names_)}.")
    specs = {"map": (".4f", "+.4f"), "pt": (".2f", "+.2f"), "latency": (".3f", "+.1%"), "macs": (".3f", "+.2%")}

    def fmt(r: Any) -> list[str]:
        if r.kind == "settings":
            return [r.experiment, "settings", "", "", r.note, "**no**"]
        value, diff = specs[r.kind]
        cells = [format(v, value) if not math.isnan(v) else "–" for v in (r.old, r.new)]
        return [r.experiment, r.figure, *cells, format(r.diff, diff) if not math.isnan(r.diff) else "–",
                "yes" if r.within else "**no**"]
    return "\n\n".join([*lines, md_table([fmt(r) for r in table.itertuples()],
                                          ["experiment", "figure", "first run", "second run", "difference",
                                           "within noise"])]) + "\n"


def tolerance_basis(measured: dict[str, dict[str, float]], *tables: pd.DataFrame) -> str:
    """Say where ``compare_runs``' tolerances came from: the fixed ones, widened by ``measured`` if any."""
    if not measured:
        return ("Tolerances: the fixed ones; neither run holds two or more seed runs of one experiment to "
                "measure the noise with (`make study-probe` runs them).")
    counts = " and ".join(str(len(seed_runs(t))) for t in tables)
    widened = "; ".join(f"{f}: fine-tuned mAP50-95 ±{tol['map_ft']:.3f}" for f, tol in measured.items()
                        if "map_ft" in tol)
    return (f"Tolerances: the fixed ones, widened to {NOISE_SIGMAS:g} standard deviations of a two-run difference "
            f"where a model family's seed replicates measured more noise ({counts} runs of "
            f"{', '.join(REPLICATE_GROUPS)} that differ only in the training seed; {widened or 'none widened'}); "
            "a family without replicates keeps the fixed ones.")


def machine_of(path: str | Path) -> dict[str, Any]:
    """Return the machine a report's latency pass ran on (``study/latency.json`` beside its table), or {}."""
    path = Path(path)
    latency = path / "study" / "latency.json" if path.is_dir() else path.with_name("latency.json")
    try:
        return dict(json.loads(latency.read_text()).get("machine") or {})
    except (OSError, ValueError):
        return {}


def machines_compared(first: dict[str, Any], second: dict[str, Any]) -> str:
    """Say what the two runs were timed on, and whether that differs in what decides the kernels."""
    keys = ("cpu", *CPU_IDENTITY_KEYS)

    def name(m: dict[str, Any]) -> str:
        return ", ".join(str(m[k]) for k in keys if m.get(k)) or "unrecorded"

    line = f"Timed on: first run {name(first)}; second run {name(second)}."
    known = [k for k in keys if first.get(k) and second.get(k)]
    if any(first[k] != second[k] for k in known):
        line += (" The machines differ: other kernels round float sums otherwise, which over a baseline's training "
                 "grows into other weights, and the same ONNX file times otherwise, so latency ratios may move "
                 "beyond one machine's noise.")
    elif not all(first.get(k) and second.get(k) for k in CPU_IDENTITY_KEYS):
        line += " Not recorded for both runs: whether they ran the same kernels is unknown."
    return line


def reproduced(old: pd.DataFrame, new: pd.DataFrame, table: pd.DataFrame, common: bool = False) -> bool:
    """Return whether the second run reproduced the first: the same experiments, and every figure within noise.

    ``common``: the experiments both runs have suffice (say, a ``make study`` run against
    a report that holds the probes too); there must be some.
    """
    same = common or set(old["experiment"]) == set(new["experiment"])
    return same and len(table) > 0 and bool(table["within"].all())


# --- the equal-budget control ---------------------------------------------------------------------------------------

def run_control(control: Control, experiments: Sequence[Experiment], repo: str | Path = ".",
                out_dir: str | Path = OUT_DIR, work_dir: str | Path = WORK_DIR) -> dict | None:
    """Train ``control.source``'s baseline the fine-tune's epochs more, as the finetune stage does; return the result.

    The baseline is read from DVC's cache at the experiment's commit; the data is made
    again from the same params (the dataset stage is seeded: same bytes). mAP and
    latency are measured as the benchmark stage measures them. The result
    (``out_dir/study/<name>.json``) is reused while the baseline and settings match.
    ``experiments`` holds the source: only a run with its current settings counts.
    Return None when the source experiment has not finished.
    """
    import dvc.api

    from yoloprune.benchmark import benchmark
    from yoloprune.finetune import finetune
    from yoloprune.io import load_model, save_model

    dvc_name = PREFIX + control.source
    records = matching(current(experiments_in(repo), repo), experiments)
    source = next((r for r in records if r.name == dvc_name and r.finished), None)
    if source is None:
        LOGGER.warning("%s: %s has not finished; run the sweep first", control.name, dvc_name)
        return None
    params = source.params  # as the experiment's stages read (and validated) them
    f, b = params["finetune"], params["benchmark"]
    settings = {"epochs": f["epochs"], "finetune": f, "imgsz": params["imgsz"], "data": params["data"],
                "dataset": params["dataset"], "benchmark": b, "baseline_md5": source.outs.get(BASELINE_OUT)}
    path = Path(out_dir) / "study" / f"{control.name}.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if {k: old.get(k) for k in settings} == settings:
            LOGGER.info("%s: up to date (%s)", control.name, path)
            return old
    work = Path(work_dir) / control.name
    work.mkdir(parents=True, exist_ok=True)
    baseline = work / "baseline.pt"
    with dvc.api.open(BASELINE_OUT, repo=str(repo), rev=source.rev, mode="rb") as src, atomic_path(baseline) as tmp:
        tmp.write_bytes(src.read())
    if params["data"] == SYNTHETIC:
        from yoloprune.data import make_dataset

        d = params["dataset"]
        data = make_dataset(work / "data", n_train=d["n_train"], n_val=d["n_val"], imgsz=params["imgsz"],
                            seed=d["seed"])
    else:
        data = Path(params["data"])
    extra = dict(f.get("args") or {})  # the finetune stage's other Ultralytics settings, where params has them
    if "workers" in f:
        extra["workers"] = f["workers"]
    result = finetune(baseline, data, epochs=f["epochs"], imgsz=params["imgsz"], batch=f["batch"],
                      device=str(f["device"]), threads=f.get("threads"), out_dir=work / "finetune", **extra)
    trained = save_model(load_model(result.best), work / "control.pt", {"control_of": dvc_name,
                                                                         "epochs": result.epochs})
    measured = benchmark(trained, imgsz=params["imgsz"], runtime="onnx", data=str(data), iters=b["iters"],
                         warmup=b["warmup"], threads=b["threads"])
    out = {"name": control.name, "source": control.source, "family": family(params["model"]),
           "baseline_map50_95": source.metrics.get("metrics/benchmark.json", {}).get("baseline_map50_95"),
           "map50_95": measured.get("map50_95"), "latency_ms": measured["latency_median_ms"], **settings}
    write_json(out, path)
    base = out["baseline_map50_95"]
    LOGGER.info("%s: mAP50-95 %.3f -> %.3f", control.name, math.nan if base is None else base, out["map50_95"])
    return out


# --- the CLI ------------------------------------------------------------------------------------------------------

def _plan(experiments: Sequence[Experiment], probe: bool = False) -> str:
    profile = ", ".join(f"{k}={yaml_value(v)}" for k, v in PROFILE.items())
    lines = [f"{len(experiments)} experiments (profile: {profile}):"]
    width = max(len(e.name) for e in experiments)
    lines += [f"  {e.name:<{width}}  {e.purpose}" for e in experiments]
    lines += ["", "controls: " + ", ".join(f"{c.name} (baseline of {c.source})" for c in controls(probe)), "",
              "commands:"]
    lines += [f"  dvc {' '.join(e.command())}" for e in experiments]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command of the study; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m yoloprune.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="the pipeline's params file (default: params.yaml)")
    parser.add_argument("--out", default=str(OUT_DIR), help="where the report goes (default: docs)")
    parser.add_argument("--probe", action="store_true",
                        help=f"plan, queue, run and control the probes ({PROBE_EPOCHS}-epoch baselines, the seed "
                             "replicate, the 3x remedy for every generation) instead of the sweep; the report "
                             "shows both")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plan", help="print the experiments and the commands that queue them")
    sub.add_parser("queue", help="queue the experiments not yet queued, running or done")
    run_p = sub.add_parser("run", help=f"start {JOBS} queue workers, queue each experiment once its baseline is "
                                       "trained, wait for the study's experiments")
    run_p.add_argument("--poll", type=float, default=60, help="seconds between checks of the queue (default 60)")
    sub.add_parser("control", help="train the equal-budget controls")
    sub.add_parser("report", help="write docs/results.md, docs/results.png and docs/study/")
    cmp_p = sub.add_parser("compare", help="set two runs' reports side by side: does the second reproduce the "
                                           "first within noise? (exit 1 if not)")
    cmp_p.add_argument("first", help="a report folder (docs) or its study/experiments.csv")
    cmp_p.add_argument("second", help="the other run's, alike")
    cmp_p.add_argument("--map-tol", type=float, default=MAP_TOL, help=f"mAP50-95 tolerance (default {MAP_TOL})")
    cmp_p.add_argument("--retention-tol", type=float, default=RETENTION_TOL,
                       help=f"retention tolerance in points (default {RETENTION_TOL:g})")
    cmp_p.add_argument("--latency-tol", type=float, default=LATENCY_TOL,
                       help=f"relative latency speed-up tolerance (default {LATENCY_TOL})")
    cmp_p.add_argument("--noise", choices=("seeds", "fixed"), default="seeds",
                       help=f"seeds (default): widen each tolerance to {NOISE_SIGMAS:g} standard deviations of a "
                            "two-run difference where the runs' seed replicates measured more; fixed: the fixed "
                            "tolerances alone")
    cmp_p.add_argument("--out", help="also write the comparison (markdown) to this file")
    cmp_p.add_argument("--common", action="store_true",
                       help="judge the experiments both runs have; those only one has are listed, not counted "
                            "(a `make study` run against a report that holds the probes too)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "compare":
            first, second = read_experiments(args.first), read_experiments(args.second)
            tols = {"map_tol": args.map_tol, "retention_tol": args.retention_tol, "latency_tol": args.latency_tol}
            measured = family_tolerances(first, second) if args.noise == "seeds" else {}
            table = compare_runs(first, second, **tols, measured=measured)
            basis = [tolerance_basis(measured, first, second),
                     machines_compared(machine_of(args.first), machine_of(args.second))]
            if args.common:
                basis.append("Judged on the experiments both runs have (`--common`): those only one has are listed "
                             "below, not counted.")
            md = comparison_md(first, second, table, basis)
            if args.out:
                with atomic_path(args.out) as tmp:
                    tmp.write_text(md)
            print(md, end="")
            return 0 if reproduced(first, second, table, common=args.common) else 1
        experiments = study_sweep(args.params, probe=args.probe and args.command != "report")
        if args.command == "plan":
            print(_plan(experiments, args.probe))
            _warn_if_uncached(".")
        elif args.command == "queue":
            queue(experiments)
        elif args.command == "run":
            failed = wait(experiments, poll_s=args.poll)
            if failed:
                LOGGER.warning("%d experiment(s) failed: %s", len(failed), ", ".join(failed))
        elif args.command == "control":
            for c in controls(args.probe):
                run_control(c, experiments, out_dir=args.out)
        else:
            report(experiments, out_dir=args.out)
    except YoloPruneError as e:
        print(f"yoloprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("yoloprune: interrupted; queued experiments keep running in the background (`dvc queue status`); "
              "`make study` again resumes", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
