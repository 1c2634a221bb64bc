"""The measured study: a sweep of DVC experiments, collected into ``docs/results.md``, its plot and its table.

The sweep is data (``sweep()``: model, speed-up, method, pruning target, distillation,
fine-tune epochs), and every experiment runs through the project's own pipeline, so DVC's
run cache computes each generation's dataset and baseline once::

    python -m tools.study plan      # the experiments and the `dvc exp run --queue` lines; runs nothing
    python -m tools.study queue     # queue the missing experiments that are ready (see `ready`)
    python -m tools.study run       # queue and run (`dvc exp run --run-all -j 2`; the latency target's runs -j 1)
    python -m tools.study latency   # time every finished run against its baseline, alone: docs/study/latency.csv
    python -m tools.study report    # collect through DVC's API: docs/study/experiments.csv, docs/results.{md,png}
    python -m tools.study report --csv docs/study/experiments.csv   # redraw from the committed table, no DVC

``make study`` runs run, latency and report; run again, it skips what is done. Each run's equal-budget control
(its baseline fine-tuned as long, unpruned) is the pipeline's own ``control`` stage, shared by DVC's run cache.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import yaml

from yoloprune.errors import YoloPruneError

LOGGER = logging.getLogger("tools.study")

PREFIX = "study-"  # DVC experiment names are PREFIX + Experiment.name: the study's, among everyone else's
OUT_DIR = Path("docs")  # results.md and results.png; the table and the controls under OUT_DIR / "study"
TIMED = OUT_DIR / "study" / "latency.csv"  # `latency`'s timings of each run, alone: they replace the pipeline's
TIMED_COLUMNS = ["experiment", "rev", "base_latency_ms", "latency_ms", "latency_speed_up", "rounds", "threads",
                 "other_load"]
JOBS = 2  # experiments at once, one training thread each (PROFILE): measured 6-32 % more steps/s than one 2-thread run
# Every experiment's overrides before its own: one training thread per job, and steadier latency medians on a shared
# CPU. The baselines train as params.yaml has it (140 epochs since 2026-12-03; the committed rows: 60, not a plateau):
# retention against each run's control (the baseline fine-tuned as long as the pruned model) says what pruning cost,
# whatever the baseline still lacked.
PROFILE: dict[str, Any] = {"baseline.threads": 1, "finetune.threads": 1, "benchmark.iters": 100,
                           "benchmark.warmup": 10}
ADDED = ("baseline.args.seed",)  # keys an experiment may set that params.yaml need not have
BASELINE_PARAMS = ("model", "data", "imgsz", "dataset", "baseline")  # equal values: one baseline, shared
GENERATIONS = ("configs/yolov8n.yaml", "configs/yolo11n.yaml", "configs/yolo26n.yaml")  # Ultralytics' yamls
SEEDS = (0, 1, 2)  # baseline training seeds (Ultralytics' seed: data order and augmentation; the initial weights are
# seeded alike, stages/baseline.py): each trains its own baseline and control


class Setting(NamedTuple):
    """One row of the sweep per generation (and seed): ``ft_epochs`` None keeps params.yaml's."""

    speed_up: float
    target: str = "macs"
    distill: str = "none"
    ft_epochs: int | None = None
    sparsity: int = 0  # epochs of sparsity training before pruning (0: none)


EVERY_SEED = (Setting(2.0),)  # issue 24's first bar: 2x at 10 epochs, in every seed
# seed 0 only: 3x at 20 epochs (issue 24's second bar), 3x at 10 epochs (the MACs target's point at the latency
# target's speed, issue 21), the latency target at 2x, and cwd distillation at 2x. Sparsity training (5 epochs before
# pruning) did not beat 5 more fine-tune epochs in the probes (docs/study/probes.md), so it has no row.
FIRST_SEED = (Setting(3.0, ft_epochs=20), Setting(3.0), Setting(2.0, target="latency"), Setting(2.0, distill="cwd"))
BASELINE_OUT = "models/baseline.pt"
TABLE = ["experiment", "kind", "model", "seed", "method", "speed_up", "target", "ft_epochs", "distill", "sparsity",
         "map50_95",
         "base_map50_95", "control_map50_95", "retention", "retention_vs_control", "macs_speed_up", "latency_speed_up",
         "predicted_latency_speed_up", "latency_ms", "base_latency_ms", "latency_timed", "commit"]
METRICS = {"map50_95": "finetuned_map50_95", "base_map50_95": "baseline_map50_95",
           "control_map50_95": "control_map50_95", "macs_speed_up": "macs_speed_up",
           "latency_speed_up": "latency_speed_up", "predicted_latency_speed_up": "predicted_latency_speed_up",
           "latency_ms": "finetuned_latency_ms", "base_latency_ms": "baseline_latency_ms"}
# table column -> metric key (metrics/benchmark.json first)
PARAMS = {"model": "model", "seed": "baseline.args.seed", "method": "method", "speed_up": "speed_up", "target": "prune.target",
          "ft_epochs": "finetune.epochs", "distill": "finetune.distill.method",
          "sparsity": "sparsity.epochs"}  # table column -> params.yaml key
ABSENT = {"target": "macs", "distill": "none", "seed": 0, "sparsity": 0}  # what a run from before these params existed did


def family(model: str) -> str:
    """Return the short label of a model yaml or checkpoint: ``yolov8n.yaml`` -> ``v8n``."""
    return Path(str(model)).stem.removeprefix("yolo")


def yaml_value(value: Any) -> str:
    """Return ``value`` written as ``dvc exp run -S key=value`` reads it back (YAML)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("...").strip()


@dataclass(frozen=True)
class Experiment:
    """One DVC experiment of the sweep; ``ft_epochs`` None keeps params.yaml's."""

    model: str
    speed_up: float
    method: str = "lamp"
    target: str = "macs"
    distill: str = "none"
    ft_epochs: int | None = None
    seed: int = 0  # the baseline's training seed; 0: params.yaml's (Ultralytics' default)
    sparsity: int = 0  # sparsity-training epochs before pruning; 0: params.yaml's (none)

    @property
    def name(self) -> str:
        """Return the short name: ``v8n-lamp-2x``, ``11n-lamp-3x-latency-both``, ``v8n-lamp-3x-sp5-ft20-s1``."""
        parts = [family(self.model), self.method, f"{self.speed_up:g}x"]
        parts += [self.target] if self.target != "macs" else []
        parts += [self.distill] if self.distill != "none" else []
        parts += [f"sp{self.sparsity}"] if self.sparsity else []
        parts += [f"ft{self.ft_epochs}"] if self.ft_epochs is not None else []
        parts += [f"s{self.seed}"] if self.seed else []
        return "-".join(parts)

    @property
    def alone(self) -> bool:
        """Return whether the run must have the CPU to itself: the latency target times the network while pruning."""
        return self.target == "latency"

    @property
    def dvc_name(self) -> str:
        """Return the experiment's name in DVC."""
        return PREFIX + self.name

    def overrides(self) -> dict[str, Any]:
        """Return every ``-S`` override: the profile's, then this experiment's dimensions."""
        own = {"model": self.model, "speed_up": self.speed_up, "method": self.method, "prune.target": self.target,
               "finetune.distill.method": self.distill}
        own |= {"finetune.epochs": self.ft_epochs} if self.ft_epochs is not None else {}
        own |= {"sparsity.epochs": self.sparsity} if self.sparsity else {}
        return {**PROFILE, **own, **({"baseline.args.seed": self.seed} if self.seed else {})}

    def command(self) -> list[str]:
        """Return the ``dvc`` argv (after ``dvc``) that queues this experiment."""
        # ++: DVC's Hydra overrides add a key params.yaml lacks (baseline.args has no seed) only so
        sets = [a for k, v in self.overrides().items() for a in ("-S", f"{'++' * (k in ADDED)}{k}={yaml_value(v)}")]
        return ["exp", "run", "--queue", "--name", self.dvc_name, *sets]

    def baseline_key(self) -> tuple[tuple[str, str], ...]:
        """Return what decides this experiment's baseline: equal keys share one trained baseline."""
        return tuple(sorted((k, yaml_value(v)) for k, v in self.overrides().items()
                            if k.split(".")[0] in BASELINE_PARAMS))


def sweep() -> list[Experiment]:
    """Return the study's experiments: per generation and seed the ``EVERY_SEED`` rows, then seed 0's
    ``FIRST_SEED`` rows; the first row of a generation and seed trains its baseline."""
    def experiment(model: str, setting: Setting, seed: int = 0) -> Experiment:
        return Experiment(model, setting.speed_up, target=setting.target, distill=setting.distill,
                          ft_epochs=setting.ft_epochs, seed=seed, sparsity=setting.sparsity)

    rows = [experiment(m, setting, seed) for m in GENERATIONS for seed in SEEDS for setting in EVERY_SEED]
    return rows + [experiment(m, setting) for m in GENERATIONS for setting in FIRST_SEED]


# --- DVC ---------------------------------------------------------------------------------------------------------

FINISHED, QUEUED, RUNNING, FAILED = ("done", "success"), "queued", "running", "failed"


@dataclass(frozen=True)
class Record:
    """One experiment as DVC shows it (``dvc exp show --json``'s structure)."""

    name: str
    rev: str  # the experiment's commit
    baseline: str  # the commit it ran from
    state: str  # "done" (run in the workspace), or the queue's: queued, running, success, failed
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # metrics file -> its data (readable ones)

    @property
    def finished(self) -> bool:
        """Return whether the run completed and left metrics."""
        return self.state in FINISHED and bool(self.metrics)

    def metric(self, key: str) -> Any:
        """Return ``key`` from metrics/benchmark.json, else from the first other metrics file that has it."""
        files = sorted(self.metrics, key=lambda p: p != "metrics/benchmark.json")
        return next((self.metrics[p][key] for p in files if key in self.metrics[p]), None)

    def param(self, dotted: str) -> Any:
        """Return a params.yaml value by its dotted key (None where absent)."""
        node: Any = self.params
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node


def parse_exp_show(states: list[dict]) -> list[Record]:
    """Return the experiments in ``dvc exp show --json`` data: a list of baseline commits, each with experiments."""
    records = []
    for base in states:
        for group in base.get("experiments") or []:
            rev = (group.get("revs") or [{}])[0]
            name, data = group.get("name") or rev.get("name"), rev.get("data") or {}
            if not name:
                continue
            params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
            metrics = {p: v["data"] for p, v in (data.get("metrics") or {}).items() if isinstance(v.get("data"), dict)}
            state = ((group.get("executor") or {}).get("state") or "done").lower()
            records.append(Record(name, str(rev.get("rev")), str(base.get("rev")), state, params, metrics))
    return records


def exp_show(repo: str | Path = ".") -> list[dict]:
    """Return ``dvc exp show --json --all-commits``'s data, through DVC's Python API."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return [s.dumpd() for s in dvc_repo.experiments.show(all_commits=True)]


def pipeline_files(repo: str | Path = ".") -> list[str]:
    """Return the tracked files a stage's result depends on: dvc.yaml, params.yaml and the code deps it declares."""
    stages = (yaml.safe_load((Path(repo) / "dvc.yaml").read_text()) or {}).get("stages") or {}
    deps = {d for s in stages.values() for d in s.get("deps") or [] if isinstance(d, str)}
    tracked = subprocess.run(["git", "ls-files", "--", *sorted(deps)], cwd=repo, capture_output=True, text=True,
                             check=False).stdout.split()
    return sorted({"dvc.yaml", "params.yaml", *tracked})


def current(records: Iterable[Record], repo: str | Path = ".") -> list[Record]:
    """Return the records run from a commit whose ``pipeline_files`` equal HEAD's: older code's results are not
    this code's (commits of docs or tests keep every result)."""
    files, same, kept = pipeline_files(repo), {}, []
    for r in records:
        if r.baseline not in same:
            same[r.baseline] = subprocess.run(["git", "diff", "--quiet", r.baseline, "HEAD", "--", *files],
                                              cwd=repo, capture_output=True, check=False).returncode == 0
        kept += [r] if same[r.baseline] else []
    return kept


def dvc(*args: str, repo: str | Path = ".") -> None:
    """Run ``dvc ARGS`` with this interpreter's DVC, its bin folder first on PATH (the queue's workers run ``dvc``,
    the stages ``python``); raise on a non-zero exit code."""
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    code = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, stdin=subprocess.DEVNULL,
                          check=False).returncode
    if code:
        raise YoloPruneError(f"dvc {' '.join(args[:4])} exited with {code} (its output is above); fix that and "
                             "run `make study` again")


def ready(experiments: Sequence[Experiment], records: Iterable[Record], skip: Iterable[str] = (),
          alone: bool | None = None) -> list[Experiment]:
    """Return the experiments to queue now: neither finished, queued, running nor in ``skip``, whose baseline is
    trained or that are the first to train it, so that two workers never train one baseline twice; only those whose
    ``alone`` is ``alone``, unless that is None."""
    records = list(records)
    done = {r.name for r in records if r.finished}
    busy = {r.name for r in records if r.state in (QUEUED, RUNNING)} | set(skip)
    trained = {e.baseline_key() for e in experiments if e.dvc_name in done}
    claimed = {e.baseline_key() for e in experiments if e.dvc_name in busy}
    out = []
    for e in experiments:
        key = e.baseline_key()
        if (alone is not None and e.alone != alone) or e.dvc_name in done | busy or (key not in trained and key in claimed):
            continue
        claimed.add(key)
        out.append(e)
    return out


def queue(experiments: Sequence[Experiment], repo: str | Path = ".", skip: Iterable[str] = (),
          alone: bool | None = None) -> list[Experiment]:
    """Queue the ``ready`` experiments; return them."""
    todo = ready(experiments, current(parse_exp_show(exp_show(repo)), repo), skip, alone)
    for e in todo:
        dvc(*e.command(), repo=repo)
    LOGGER.info("queued %d experiment(s): %s", len(todo), ", ".join(e.name for e in todo) or "none")
    return todo


def run(experiments: Sequence[Experiment], repo: str | Path = ".", jobs: int = JOBS) -> list[str]:
    """Queue and run until every experiment finished or was tried once; return the names of those that did not
    finish. Each round runs the whole queue (``dvc exp run --run-all``, which waits for it): first the experiments
    that may share the CPU, ``jobs`` at a time, then those that must have it to themselves (``alone``), one by one."""
    tried: set[str] = set()
    for alone in (False, True):
        while True:
            queued = queue(experiments, repo, skip=tried, alone=alone)
            tried |= {e.dvc_name for e in queued}
            dvc("exp", "run", "--run-all", "-j", "1" if alone else str(jobs), repo=repo)
            if not queued:  # the queue held only what an earlier `queue` put there
                break
            if not ready(experiments, current(parse_exp_show(exp_show(repo)), repo), skip=tried, alone=alone):
                break
    return list(missing(current(parse_exp_show(exp_show(repo)), repo), experiments))


def missing(records: Iterable[Record], experiments: Sequence[Experiment]) -> dict[str, str]:
    """Return each experiment without a finished run, with its last state (or "not queued")."""
    states: dict[str, str] = {}
    for r in records:
        states[r.name] = "done" if r.finished or states.get(r.name) == "done" else r.state
    return {e.name: states.get(e.dvc_name, "not queued") for e in experiments if states.get(e.dvc_name) != "done"}


def time_alone(records: Iterable[Record], experiments: Sequence[Experiment], repo: str | Path = ".",
               rounds: int = 15, threads: int = 2, done: pd.DataFrame | None = None) -> pd.DataFrame:
    """Return each finished run's ONNX Runtime CPU latency and its baseline's, timed now, interleaved, one pair at a
    time: the pipeline's figures of runs that ran two at a time were taken while the other one trained. ``latency_ms``
    is the fastest of ``rounds`` rounds (as the latency target's checks); ``other_load`` the share of the CPU other
    processes used meanwhile (above ``BUSY`` the figure is not to be trusted, and a warning says so). Runs ``done``
    (an earlier table) timed already, same experiment and commit, keep that row and are not timed again."""
    import dvc.api

    from yoloprune.latency import BUSY, OnnxRuntime, OtherLoad

    runtime, rows = OnnxRuntime(threads), []
    kept = {} if done is None else {(d["experiment"], str(d["rev"])): d for d in done.to_dict("records")}
    for r in newest_runs(records, experiments):
        if (old := kept.get((r.name.removeprefix(PREFIX), r.rev))) is not None:
            rows.append(old)
            continue
        size = r.param("imgsz")
        onnx = [dvc.api.read(f"models/{m}_{size}_b1.onnx", repo=str(repo), rev=r.rev, mode="rb")
                for m in ("baseline", "finetuned")]
        with OtherLoad() as load:
            base_ms, pruned_ms = runtime.paired_times(onnx[0], onnx[1], size, rounds)
        if load.share > BUSY:
            LOGGER.warning("%s: other processes used %.0f %% of the CPU while it was timed; time it again on a quiet "
                           "machine", r.name, 100 * load.share)
        rows.append({"experiment": r.name.removeprefix(PREFIX), "rev": r.rev, "base_latency_ms": min(base_ms),
                     "latency_ms": min(pruned_ms), "latency_speed_up": min(base_ms) / min(pruned_ms),
                     "rounds": rounds, "threads": threads, "other_load": load.share})
        LOGGER.info("%s: %.2f ms -> %.2f ms, %.2fx", rows[-1]["experiment"], min(base_ms), min(pruned_ms),
                    rows[-1]["latency_speed_up"])
    return pd.DataFrame(rows, columns=TIMED_COLUMNS)


def read_timed(path: str | Path = TIMED) -> pd.DataFrame | None:
    """Return ``latency``'s table, or None where there is none yet."""
    if not Path(path).is_file():
        return None
    timed = pd.read_csv(path, dtype={"rev": str})
    return timed if len(timed) else None


# --- the table, the front, the plot, the report ---------------------------------------------------------------------

def percent(part: float, whole: float) -> float:
    """Return ``part`` as a percentage of ``whole``; NaN where ``whole`` is 0 or unknown (a model that found nothing)."""
    return 100 * part / whole if whole and math.isfinite(whole) else math.nan


def newest_runs(records: Iterable[Record], experiments: Sequence[Experiment]) -> list[Record]:
    """Return the newest finished run of each experiment of the sweep, in sweep order."""
    order = {e.dvc_name: i for i, e in enumerate(experiments)}
    newest: dict[str, Record] = {}
    for r in records:  # exp show lists the newest commit's runs first
        if r.name in order and r.finished and r.name not in newest:
            newest[r.name] = r
    return sorted(newest.values(), key=lambda r: order[r.name])


def table(records: Iterable[Record], experiments: Sequence[Experiment], timed: pd.DataFrame | None = None
          ) -> pd.DataFrame:
    """Return one row per finished experiment of the sweep (its newest run), in sweep order; ``timed`` (``latency``'s
    table) replaces the pipeline's latency figures of the runs it timed (same experiment commit)."""
    quiet = {} if timed is None else {(t.experiment, t.rev): t for t in timed.itertuples()}
    rows = []
    for r in newest_runs(records, experiments):
        row = {"experiment": r.name.removeprefix(PREFIX), "kind": "pruned", "commit": r.baseline[:12],
               "latency_timed": "pipeline", **{c: r.param(k) if r.param(k) is not None else ABSENT.get(c)
                                               for c, k in PARAMS.items()},
               **{c: r.metric(k) for c, k in METRICS.items()}}
        if (t := quiet.get((row["experiment"], r.rev))) is not None:
            row.update(latency_ms=t.latency_ms, base_latency_ms=t.base_latency_ms,
                       latency_speed_up=t.latency_speed_up, latency_timed="alone")
        rows.append(row)
    df = pd.DataFrame(rows, columns=TABLE)
    for c in ("speed_up", "ft_epochs", "seed", "sparsity", *METRICS):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df["retention"] = [percent(m, b) for m, b in zip(df["map50_95"], df["base_map50_95"], strict=True)]
    df["retention_vs_control"] = [percent(m, c) for m, c in zip(df["map50_95"], df["control_map50_95"], strict=True)]
    df["latency_speed_up"] = df["latency_speed_up"].fillna(df["base_latency_ms"] / df["latency_ms"])
    return df


def pareto_front(latency: Sequence[float], accuracy: Sequence[float]) -> list[bool]:
    """Return, for each point, whether no other point is at least as fast and as accurate and better in one; a point
    with a missing value is never on it, identical points both are."""
    pts = [(float(x), float(y)) for x, y in zip(latency, accuracy, strict=True)]
    ok = [not (math.isnan(x) or math.isnan(y)) for x, y in pts]
    return [ok[i] and not any(ok[j] and q[0] <= p[0] and q[1] >= p[1] and q != p for j, q in enumerate(pts))
            for i, p in enumerate(pts)]


def points(df: pd.DataFrame) -> pd.DataFrame:
    """Return the plotted points on axes that seeds share: measured speed-up over the run's own baseline, and
    fine-tuned mAP50-95 as % of the run's own equal-budget control. One point per setting (mean over its seeds, with
    their lowest and highest %), each generation's control (1x, 100 %) and baseline (1x, the median baseline as %
    of its control), and each generation's Pareto front. Raw mAP50-95 would put a lucky seed's baseline above
    every other seed's runs (yolo11n: 0.239 with seed 0, 0.534 with seed 1)."""
    pruned = df[df["kind"] == "pruned"].assign(family=df["model"].map(family))
    pruned = pruned.assign(base_pct=100 * pruned["base_map50_95"] / pruned["control_map50_95"])
    keys = ["family", "method", "speed_up", "target", "ft_epochs", "distill", "sparsity"]
    g = pruned.groupby(keys, sort=False, dropna=False)
    runs = g.agg(label=("experiment", "first"), seeds=("experiment", "size"),
                 speed_up_x=("latency_speed_up", "mean"), vs_control=("retention_vs_control", "mean"),
                 low=("retention_vs_control", "min"), high=("retention_vs_control", "max")).reset_index()
    runs["kind"] = "pruned"
    refs = pruned.groupby("family", sort=False).agg(base_pct=("base_pct", "median"), seeds=("seed", "nunique"))
    refs = refs.reset_index()
    base = refs.assign(label=refs["family"] + " baseline", kind="baseline", speed_up_x=1.0, vs_control=refs["base_pct"])
    control = refs.assign(label=refs["family"] + " control", kind="control", speed_up_x=1.0, vs_control=100.0)
    pts = pd.concat([runs, base.drop(columns="base_pct"), control.drop(columns="base_pct")], ignore_index=True)
    pts["front"] = False
    for _, grp in pts.groupby("family", sort=False):  # faster is a lower latency: 1 / speed-up
        pts.loc[grp.index, "front"] = pareto_front(1 / grp["speed_up_x"], grp["vs_control"])
    return pts


def variant(row: Any, default_ft: float) -> str:
    """Return the plot's line label of a pruned run: method, target, distillation and an unusual fine-tune."""
    label = f"{row.method}, {row.target} target" + (f", distill {row.distill}" if row.distill != "none" else "")
    label += f", {row.sparsity:g} sparsity epochs" if row.sparsity else ""
    return label + (f", {row.ft_epochs:g} ft epochs" if row.ft_epochs != default_ft else "")


def plot(df: pd.DataFrame, path: str | Path) -> Path:
    """Write the accuracy-vs-speed figure: one panel per generation, % of the equal-budget control against the
    measured speed-up (``points``), one line per variant through its asked speed-ups, the seeds' range as bars, the
    control and baseline marked, the Pareto front ringed; a legend, no annotations."""
    import matplotlib

    matplotlib.use("Agg")  # offline, no display
    import matplotlib.pyplot as plt

    pts = points(df)
    runs = pts[pts["kind"] == "pruned"]
    default_ft = runs["ft_epochs"].mode().iloc[0] if len(runs) else math.nan
    runs = runs.assign(variant=[variant(r, default_ft) for r in runs.itertuples()])
    colours = {v: f"C{i % 10}" for i, v in enumerate(dict.fromkeys(runs["variant"]))}
    families = list(dict.fromkeys(pts["family"]))
    fig, axes = plt.subplots(1, max(len(families), 1), figsize=(4.6 * max(len(families), 1), 4.6), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, fam in zip(axes[0], families, strict=False):
        for v, g in runs[runs["family"] == fam].groupby("variant", sort=False):
            g = g.sort_values("speed_up_x")
            handles[v], = ax.plot(g["speed_up_x"], g["vs_control"], "o-", color=colours[v], ms=5, lw=1.2)
            several = g[g["seeds"] > 1]
            if len(several):
                ax.errorbar(several["speed_up_x"], several["vs_control"], fmt="none", ecolor=colours[v], capsize=3,
                            yerr=[several["vs_control"] - several["low"], several["high"] - several["vs_control"]])
        mine = pts[pts["family"] == fam]
        b, c, f = (mine[mine["kind"] == "baseline"], mine[mine["kind"] == "control"], mine[mine["front"]])
        handles["baseline (unpruned)"] = ax.scatter(b["speed_up_x"], b["vs_control"], marker="*", s=240, c="gold",
                                                    edgecolors="black", zorder=4)
        handles["equal-budget control"] = ax.scatter(c["speed_up_x"], c["vs_control"], marker="X", s=70,
                                                     c="dimgray", zorder=6)
        if len(f):
            handles["on the Pareto front"] = ax.scatter(f["speed_up_x"], f["vs_control"], s=260, facecolors="none",
                                                        edgecolors="crimson", lw=1.4, zorder=5)
        ax.axhline(100, color="dimgray", lw=0.8, ls=":")
        ax.set_title(fam)
        ax.set_xlabel("measured speed-up (x, ONNX Runtime CPU, batch 1)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mAP50-95, % of the equal-budget control")
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(4, max(len(handles), 1)), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * math.ceil(len(handles) / 4), 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


SHOWN = {"experiment": "experiment", "map50_95": "mAP50-95", "base_map50_95": "baseline",
         "control_map50_95": "control", "retention": "retention %", "retention_vs_control": "vs control %",
         "macs_speed_up": "MACs ×", "latency_speed_up": "latency ×", "latency_ms": "latency ms"}


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Return each setting's runs across seeds: how many, mean and lowest retention against the control, mean
    retention against the baseline, mean MACs and latency speed-ups."""
    pruned = df[df["kind"] == "pruned"].assign(family=df["model"].map(family))
    keys = ["family", "speed_up", "target", "ft_epochs", "distill", "sparsity"]
    g = pruned.groupby(keys, sort=False, dropna=False)
    out = g.agg(seeds=("experiment", "size"), vs_control_mean=("retention_vs_control", "mean"),
                vs_control_min=("retention_vs_control", "min"), vs_control_sd=("retention_vs_control", "std"),
                retention_mean=("retention", "mean"), macs_speed_up=("macs_speed_up", "mean"),
                latency_speed_up=("latency_speed_up", "mean"))
    return out.reset_index()


SUMMARY = {"family": "model", "speed_up": "asked ×", "target": "target", "ft_epochs": "ft epochs",
           "distill": "distill", "sparsity": "sparsity epochs", "seeds": "seeds", "vs_control_mean": "vs control % (mean)",
           "vs_control_min": "lowest %", "vs_control_sd": "sd", "retention_mean": "vs baseline %",
           "macs_speed_up": "MACs ×", "latency_speed_up": "latency ×"}


def render(df: pd.DataFrame, missing_runs: dict[str, str] | None = None) -> str:
    """Return ``results.md``: provenance, the plot, the Pareto front and the table of every run."""
    pts = points(df)
    front = pts[pts["front"]].sort_values(["family", "speed_up_x"])[["label", "seeds", "speed_up_x", "vs_control"]]
    commits = ", ".join(sorted(set(df["commit"].dropna().astype(str)))) or "none yet"
    lines = ["# Pruning study: accuracy and real speed", "",
             "<!-- Generated by `python -m tools.study report` from docs/study/experiments.csv; do not edit. -->", "",
             (f"{len(df)} runs from the pipeline (`dvc.yaml`) as DVC experiments of commit(s) {commits}. mAP50-95 on "
              "the validation split with ONNX Runtime; latency: ONNX Runtime CPU at batch 1, 2 threads, each run and its "
              "baseline timed alone by `python -m tools.study latency` (fastest of 15 interleaved rounds by default; "
              "`latency_timed` in the table says which runs were), else the benchmark stage's median; "
              "retention: fine-tuned mAP50-95 as % of the run's own baseline (NaN where that is 0); vs control: as % of "
              "the control, the same baseline fine-tuned as long without pruning (equal training budget)."), ""]
    if missing_runs:
        lines += ["Not finished: " + ", ".join(f"{k} ({v})" for k, v in missing_runs.items()) + ".", ""]
    lines += ["![% of the equal-budget control vs measured speed-up, one panel per generation](results.png)", "",
              "## Pareto front", "",
              ("Per generation, no other setting of it is at least as fast and keeps as much of its control "
               "(means over seeds; a setting is named by its first run):"), "",
              front.rename(columns={"label": "setting", "speed_up_x": "latency ×", "vs_control": "vs control %"})
              .to_markdown(index=False, floatfmt=("", "g", ".2f", ".1f")), "", "## Across seeds", "",
              "Each setting's runs, one per baseline training seed; retention as % of each run's own control:", "",
              summary(df).rename(columns=SUMMARY).to_markdown(
                  index=False, floatfmt=("", "g", "", "g", "", "g", "d", ".1f", ".1f", ".1f", ".1f", ".2f", ".2f")), "",
              "## Every run", "",
              df[list(SHOWN)].rename(columns=SHOWN)
              .to_markdown(index=False, floatfmt=("", ".3f", ".3f", ".3f", ".1f", ".1f", ".2f", ".2f", ".2f")),
              "",
              "The sweep's settings per run: `docs/study/experiments.csv`; the commands: `python -m tools.study plan`.",
              ""]
    return "\n".join(lines)


def write_report(df: pd.DataFrame, out_dir: str | Path = OUT_DIR, missing_runs: dict[str, str] | None = None,
                 write_csv: bool = True) -> tuple[Path, Path]:
    """Write ``study/experiments.csv`` (unless redrawing from it), ``results.md`` and ``results.png``; return the
    markdown and PNG paths."""
    out_dir = Path(out_dir)
    (out_dir / "study").mkdir(parents=True, exist_ok=True)
    if write_csv:
        df.to_csv(out_dir / "study" / "experiments.csv", index=False, float_format="%.6g")
    md = out_dir / "results.md"
    probes = out_dir / "study" / "probes.md"  # hand-run probes of new methods, kept until the sweep measures them
    md.write_text(render(df, missing_runs) + ("\n" + probes.read_text() if probes.is_file() else ""))
    return md, plot(df, out_dir / "results.png")


def report(experiments: Sequence[Experiment], repo: str | Path = ".", out_dir: str | Path = OUT_DIR,
           keep: bool = False) -> tuple[Path, Path]:
    """Collect the finished experiments (DVC's API) and write the report; with ``keep``, the committed table's rows
    of experiments that have no run on this code stay in it (their ``commit`` column names the code that ran them)."""
    records = current(parse_exp_show(exp_show(repo)), repo)
    timed = read_timed(Path(out_dir) / "study" / TIMED.name)
    df, absent = table(records, experiments, timed), missing(records, experiments)
    committed = Path(out_dir) / "study" / "experiments.csv"
    if keep and committed.is_file():
        df = kept_rows(df, read_table(committed), experiments)
        absent = {k: v for k, v in absent.items() if k not in set(df["experiment"])}
    return write_report(df, out_dir, absent)


def kept_rows(new: pd.DataFrame, old: pd.DataFrame, experiments: Sequence[Experiment]) -> pd.DataFrame:
    """Return ``new`` with the rows of ``old`` whose experiment of the sweep ``new`` lacks, in sweep order."""
    order = {e.name: i for i, e in enumerate(experiments)}
    old = old[old["experiment"].isin(order) & ~old["experiment"].isin(new["experiment"])]
    both = pd.concat([df for df in (new, old) if len(df)], ignore_index=True) if len(old) else new
    return both.sort_values("experiment", key=lambda c: c.map(order), kind="stable", ignore_index=True)


def read_table(path: str | Path) -> pd.DataFrame:
    """Return a committed ``experiments.csv``."""
    if not Path(path).is_file():
        raise YoloPruneError(f"{path}: no such table; run `python -m tools.study report` first, or pass its path")
    # a table from before a column existed reads it as missing values, or as what runs did before its param existed
    df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    return df.assign(**{c: v for c, v in ABSENT.items() if c not in df.columns}).reindex(columns=TABLE)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command of the study; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m tools.study", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(OUT_DIR), help="where the report goes (default: docs)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plan", help="print the experiments' queue commands")
    sub.add_parser("queue", help="queue the missing experiments that are ready and may share the CPU")
    sub.add_parser("run", help=f"queue and run ({JOBS} at a time, the latency target's runs one at a time) until "
                               "every experiment was tried")
    lat = sub.add_parser("latency", help=f"time every finished run and its baseline alone, into {TIMED}")
    lat.add_argument("--rounds", type=int, default=15, help="interleaved rounds per pair (the fastest counts)")
    lat.add_argument("--again", action="store_true", help="time every run again, not only those not timed yet")
    rep = sub.add_parser("report", help="write docs/study/experiments.csv, docs/results.md and docs/results.png")
    rep.add_argument("--csv", help="redraw from this experiments.csv instead of collecting from DVC")
    rep.add_argument("--keep", action="store_true", help="keep the committed table's rows of experiments not run on "
                                                          "this code (yet): their commit column says which code ran them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    experiments = sweep()
    try:
        if args.command == "plan":
            print("\n".join(f"dvc {' '.join(e.command())}" for e in experiments))
        elif args.command == "queue":
            queue(experiments, alone=False)  # `run` queues the latency target's runs itself, to run them alone
        elif args.command == "run":
            if failed := run(experiments):
                LOGGER.warning("not finished: %s (`dvc queue logs NAME` says why)", ", ".join(failed))
        elif args.command == "latency":
            out = Path(args.out) / "study" / TIMED.name
            out.parent.mkdir(parents=True, exist_ok=True)
            done = None if args.again else read_timed(out)
            time_alone(current(parse_exp_show(exp_show()), "."), experiments, rounds=args.rounds, done=done).to_csv(
                out, index=False, float_format="%.6g")
            LOGGER.info("wrote %s; `python -m tools.study report` puts it in the table", out)
        elif args.csv:
            write_report(read_table(args.csv), args.out, write_csv=Path(args.csv).resolve() !=
                         (Path(args.out) / "study" / "experiments.csv").resolve())
        else:
            report(experiments, out_dir=args.out, keep=args.keep)
    except YoloPruneError as e:
        print(f"tools.study: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
