"""Measure what pruning buys: size, MACs, latency and accuracy of a checkpoint, and compare two of them.

Latency is the forward pass alone (no pre- or post-processing, no NMS), timed per
call after warm-up with a fixed thread count, the way a deployed model runs: the
``torch`` runtime fuses Conv+BN as Ultralytics' predictor does; the ``onnx`` runtime
times ONNX Runtime on the file ``yoloprune.export`` writes (exported once and
cached beside the checkpoint). MACs and parameters count only the head branch
inference runs (see ``yoloprune.macs.deployed_branch``). Sessions, devices and timing
are ``yoloprune.runtime``'s; this module measures, compares and formats.

Reports are JSON-ready dicts, so DVC can track them as metrics.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from yoloprune.config import Config
from yoloprune.errors import YoloPruneError, check_imgsz
from yoloprune.macs import MacCounter, count_params, deployed_branch
from yoloprune.runtime import (
    machine_info,
    onnx_runner,
    paired_ratio,
    resolve_device,
    round_best,
    seeded_images,
    time_rounds,
    versions,
)
from yoloprune.threads import torch_threads_kept

LOGGER = logging.getLogger("yoloprune")


@dataclass(frozen=True)
class BenchmarkConfig(Config):
    """Validated benchmark settings."""

    SECTION = "benchmark"
    INHERITS = ("imgsz",)

    imgsz: int = 640  # square input size, a multiple of the stride 32
    batch: int = 1  # images per forward pass
    device: str = "cpu"  # "cpu", "0"/"cuda:0" (torch and onnx), "mps" (torch)
    warmup: int = 10  # untimed passes first (allocations, kernel selection, caches)
    iters: int = 100  # timed passes
    threads: int | None = None  # CPU threads for torch / ONNX Runtime; None = torch's current setting
    half: bool = False  # FP16 (torch: CUDA only; onnx: an FP16 export)
    runtime: str = "torch"  # see RUNTIMES
    data: str | None = None  # a local data.yaml: also measure mAP50 and mAP50-95 with Ultralytics' validator

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise YoloPruneError(msg)

        def positive_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v > 0

        check_imgsz(self.imgsz)
        if not positive_int(self.batch):
            bad(f"batch must be a positive integer, got {self.batch!r}")
        if not (isinstance(self.warmup, int) and self.warmup >= 0):
            bad(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if not positive_int(self.iters):
            bad(f"iters must be a positive integer, got {self.iters!r}")
        if self.threads is not None and not positive_int(self.threads):
            bad(f"threads must be a positive integer or None (torch's current setting), got {self.threads!r}")
        if self.runtime not in RUNTIMES:
            bad(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.data is not None and not Path(self.data).is_file():
            bad(f"data {self.data}: no such file; pass a local data.yaml (datasets are not downloaded)")


def benchmark(model_path: str | Path, cfg: BenchmarkConfig | None = None, **settings) -> dict:
    """Return params, MACs, file size, latency, FPS (and mAP with ``data``) of a checkpoint, as a JSON-ready dict.

    ``settings`` override fields of ``cfg``: ``benchmark("m.pt", imgsz=320, runtime="onnx")``.
    ``macs``/``gflops`` are per image; ``fps`` is images per second (batch * 1000 / median ms).
    """
    return benchmark_many([model_path], cfg, **settings)[0]


def benchmark_many(model_paths: Sequence[str | Path], cfg: BenchmarkConfig | None = None, **settings) -> list[dict]:
    """Return ``benchmark``'s report of each checkpoint, their timed passes taking turns (``time_interleaved``), so
    that the ratio of two models' latencies holds on a machine whose speed drifts."""
    try:
        cfg = replace(cfg or BenchmarkConfig(), **settings)
    except TypeError as e:
        names = ", ".join(f.name for f in fields(BenchmarkConfig))
        raise YoloPruneError(f"unknown benchmark setting ({e}); the settings are {names}") from e
    device = resolve_device(cfg.device)
    if cfg.half and cfg.runtime == "torch" and device.type == "cpu":
        raise YoloPruneError("half=True with the torch runtime needs a CUDA device (Ultralytics runs FP32 on CPU); "
                             "use device='0', or runtime='onnx' for an FP16 ONNX model")
    threads = cfg.threads or torch.get_num_threads()
    prepared = [_prepare(Path(p), cfg, device, threads) for p in model_paths]
    with torch_threads_kept(), torch.inference_mode():
        torch.set_num_threads(threads)  # for this timing only: the caller's count is back afterwards
        timings = time_rounds([run for _, run in prepared], cfg.warmup, cfg.iters, device)
    reports = []
    together = uuid.uuid4().hex  # the rounds of reports timed together pair up (compare)
    for (report, _), per_round in zip(prepared, timings, strict=True):
        times = [t for turn in per_round for t in turn]
        median = statistics.median(times)
        report.update({
            "latency_best_ms": round_best(per_round),  # each round's fastest call, median over rounds
            "latency_rounds_ms": [min(turn) for turn in per_round if turn],
            "latency_timed_with": together,
            "latency_median_ms": median,
            "latency_p90_ms": float(np.percentile(times, 90)),
            "latency_mean_ms": statistics.fmean(times),
            "latency_min_ms": min(times),
            "latency_std_ms": statistics.pstdev(times),
            "fps": cfg.batch * 1000 / median,
        })
        if cfg.data is not None:
            report.update(accuracy(Path(report["file"]), cfg, device))
        report["machine"] = machine_info(device)
        report["versions"] = versions(cfg.runtime)
        LOGGER.info("%s (%s, %s): %.2f ms median, %.1f FPS, %.3f GMACs", Path(report["model"]).name, cfg.runtime,
                    device, median, report["fps"], report["macs"] / 1e9)
        reports.append(report)
    return reports


def _prepare(path: Path, cfg: BenchmarkConfig, device: torch.device, threads: int) -> tuple[dict, Callable]:
    """Return a checkpoint's static figures and the call that runs it once on ``cfg.runtime``."""
    from yoloprune.io import load_model

    model = load_model(path).eval()
    branch, unused = deployed_branch(model)
    skipped = {id(p) for m in unused for p in m.parameters()}
    params = sum(p.numel() for p in model.parameters() if id(p) not in skipped)
    params_total = count_params(model)  # before the runtime fuses BN away
    macs = MacCounter(model, cfg.imgsz, exclude=set(unused))()
    artifact, run = RUNTIMES[cfg.runtime](model, path, cfg, device, threads)
    report = {
        "model": str(path),
        "file": str(artifact),
        "runtime": cfg.runtime,
        "device": str(device),
        "half": cfg.half,
        "imgsz": cfg.imgsz,
        "batch": cfg.batch,
        "threads": threads,
        "warmup": cfg.warmup,
        "iters": cfg.iters,
        "task": str(getattr(model, "task", "detect")),
        "branch": branch,
        "params": params,
        "params_total": params_total,
        "macs": macs,
        "gflops": 2 * macs / 1e9,
        "file_mb": _size(artifact) / 2**20,
    }
    return report, run


def _torch_runtime(model: nn.Module, path: Path, cfg: BenchmarkConfig, device: torch.device, threads: int):
    model = model.fuse(verbose=False)  # Conv+BN folded, unused head branch dropped, as Ultralytics predicts
    dtype = torch.float16 if cfg.half else torch.float32
    model = model.to(device, dtype)
    x = seeded_images(cfg.batch, cfg.imgsz).to(device, dtype)

    return path, lambda: model(x)  # benchmark() holds the thread count and inference_mode around the timing


def _onnx_runtime(model: nn.Module, path: Path, cfg: BenchmarkConfig, device: torch.device, threads: int):
    onnx_path = cached_onnx(path, cfg.imgsz, cfg.batch, cfg.half)
    return onnx_path, onnx_runner(onnx_path, cfg.imgsz, cfg.batch, device, threads)


# Adding a runtime is one function (model, path, cfg, device, threads) -> (artifact, run) and one line here.
RUNTIMES = {"torch": _torch_runtime, "onnx": _onnx_runtime}


def onnx_cache_path(model_path: str | Path, imgsz: int, batch: int = 1, half: bool = False) -> Path:
    """Return where the onnx runtime looks for the export of ``model_path``: ``model_640_b1.onnx`` beside it."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}_{imgsz}_b{batch}{'_fp16' if half else ''}.onnx")


def cached_onnx(model_path: Path, imgsz: int, batch: int, half: bool) -> Path:
    """Return the ONNX file of ``model_path`` for these settings, exported beside it if missing or older than it."""
    from yoloprune.export import ExportConfig, export_model

    if model_path.suffix != ".pt":
        raise YoloPruneError(f"{model_path}: runtime 'onnx' needs a .pt checkpoint to export; save the model first")
    onnx_path = onnx_cache_path(model_path, imgsz, batch, half)
    if onnx_path.is_file() and onnx_path.stat().st_mtime >= model_path.stat().st_mtime:
        return onnx_path
    LOGGER.info("exporting %s to %s for the onnx runtime", model_path, onnx_path)
    export_model(model_path, ExportConfig(imgsz=imgsz, batch=batch, half=half), out=onnx_path)
    return onnx_path


def accuracy(artifact: Path, cfg: BenchmarkConfig, device: torch.device) -> dict:
    """Return mAP50 and mAP50-95 (top-1/top-5 for classifiers) of ``artifact`` on ``cfg.data``'s val split."""
    from ultralytics import YOLO

    ul_device = "cpu" if device.type == "cpu" else "mps" if device.type == "mps" else str(device.index or 0)
    with torch_threads_kept(), tempfile.TemporaryDirectory(prefix="yoloprune-val-") as project:  # runs/ stays out
        metrics = YOLO(str(artifact)).val(
            data=cfg.data, imgsz=cfg.imgsz, batch=cfg.batch, plots=False, device=ul_device,
            quantize=16 if cfg.half else None, project=project, name="val", verbose=False,
        )
    if hasattr(metrics, "box"):
        return {"map50": float(metrics.box.map50), "map50_95": float(metrics.box.map)}
    return {"top1": float(metrics.top1), "top5": float(metrics.top5)}


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


# Compared settings: numbers measured under different ones are not comparable.
SAME = ("imgsz", "batch", "runtime", "device", "half", "threads")
# metric -> (label in the table, scale for display, how the change reads)
ROWS = {
    "params": ("params (M)", 1e-6, "ratio"),
    "macs": ("GMACs", 1e-9, "fewer"),
    "gflops": ("GFLOPs", 1, "fewer"),
    "file_mb": ("file (MB)", 1, "ratio"),
    "latency_best_ms": ("latency (ms)", 1, "faster"),
    "latency_median_ms": ("latency median (ms)", 1, "faster"),
    "latency_p90_ms": ("latency p90 (ms)", 1, "faster"),
    "fps": ("FPS", 1, "ratio"),
    "map50": ("mAP50", 1, "retained"),
    "map50_95": ("mAP50-95", 1, "retained"),
    "top1": ("top-1", 1, "retained"),
    "top5": ("top-5", 1, "retained"),
}


def paired_speed_up(base_report: dict, pruned_report: dict) -> float | None:
    """Return the median over rounds of base / pruned, each round's fastest calls compared within the round, for two
    reports timed together (``benchmark_many``): a slow spell of the machine slows both sides of a round and cancels,
    as in the pruner's latency checks (``Runtime.speed_up``); None for reports timed apart, or from before."""
    b, p = base_report.get("latency_rounds_ms"), pruned_report.get("latency_rounds_ms")
    if not b or not p or len(b) != len(p) or base_report.get("latency_timed_with") is None \
            or base_report.get("latency_timed_with") != pruned_report.get("latency_timed_with"):
        return None
    return paired_ratio(b, p)


def compare(base_report: dict, pruned_report: dict) -> dict:
    """Return base and pruned values side by side with their ratios, as a JSON-ready dict.

    Headline figures: ``params_ratio`` (pruned/base), ``macs_speed_up`` and
    ``latency_speed_up`` (base/pruned: ``paired_speed_up`` for reports timed together, else the
    ratio of ``latency_best_ms``, else of the medians), ``fps_ratio`` (pruned/base) and
    ``map50_retention_pct``/``map50_95_retention_pct`` (pruned/base * 100, when both
    reports have mAP and the base's is not zero).
    """
    differ = [k for k in SAME if base_report.get(k) != pruned_report.get(k)]
    if differ:
        pairs = ", ".join(f"{k} {base_report.get(k)!r} vs {pruned_report.get(k)!r}" for k in differ)
        raise YoloPruneError(f"the reports were measured under different settings ({pairs}); benchmark both "
                             "models with the same settings")
    metrics = {}
    for key in ROWS:
        if key in base_report and key in pruned_report:
            b, p = base_report[key], pruned_report[key]
            metrics[key] = {"base": b, "pruned": p}
            if b:
                metrics[key]["ratio"] = p / b
    out = {k: base_report[k] for k in SAME}
    out.update(base=base_report.get("model", ""), pruned=pruned_report.get("model", ""), metrics=metrics)

    def ratio(key: str, invert: bool = False) -> float | None:
        b, p = metrics.get(key, {}).get("base"), metrics.get(key, {}).get("pruned")
        if b and p:
            return b / p if invert else p / b
        return None

    headline = {
        "params_ratio": ratio("params"),
        "macs_speed_up": ratio("macs", invert=True),
        "latency_speed_up": paired_speed_up(base_report, pruned_report) or ratio("latency_best_ms", invert=True)
        or ratio("latency_median_ms", invert=True),
        "fps_ratio": ratio("fps"),
    }
    for key in ("map50", "map50_95", "top1", "top5"):
        r = ratio(key)
        if r is not None:
            headline[f"{key}_retention_pct"] = 100 * r
    out.update({k: v for k, v in headline.items() if v is not None})
    return out


def format_table(cmp: dict) -> str:
    """Return ``compare``'s result as a markdown table (readable as plain text) and a line of the settings."""
    import pandas as pd

    rows = []
    for key, (label, scale, reads) in ROWS.items():
        row = cmp["metrics"].get(key)
        if row is None:
            continue
        r = row.get("ratio")
        change = "n/a" if not r else CHANGE[reads](r)
        rows.append((label, _num(row["base"] * scale), _num(row["pruned"] * scale), change))
    table = pd.DataFrame(rows, columns=["metric", "base", "pruned", "change"]).to_markdown(
        index=False, colalign=("left", "right", "right", "right"), disable_numparse=True)
    return (f"{table}\n\nimgsz {cmp['imgsz']}, batch {cmp['batch']}, {cmp['runtime']} on {cmp['device']}, "
            f"threads {cmp['threads']}{', fp16' if cmp['half'] else ''}")


# How a row's pruned/base ratio reads in the table's last column.
CHANGE = {
    "fewer": lambda r: f"{1 / r:.2f}x fewer",
    "faster": lambda r: f"{1 / r:.2f}x faster",
    "retained": lambda r: f"{100 * r:.1f}% retained",
    "ratio": lambda r: f"{r:.2f}x",
}


def tradeoff_points(base_report: dict, tuned_report: dict, speed_up: float | None, method: str) -> list[dict]:
    """Return one accuracy-vs-latency point for the baseline and one for the fine-tuned pruned model.

    The points of several experiments together make the scatter ``dvc plots diff``
    draws (one colour per experiment). ``speed_up`` (achieved MACs ratio) and
    ``method`` (importance) label the pruned point; the baseline's are 1.0 and ``"none"``.
    """
    def point(model: str, report: dict, speed_up: float | None, method: str) -> dict:
        return {"model": model, "latency_ms": report["latency_best_ms"], "map50_95": report.get("map50_95"),
                "speed_up": speed_up, "method": method}

    return [point("baseline", base_report, 1.0, "none"), point("finetuned", tuned_report, speed_up, method)]


def _num(v: float) -> str:
    if isinstance(v, int) or abs(v) >= 100:
        return f"{v:,.0f}" if abs(v) >= 100 else str(v)
    return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
