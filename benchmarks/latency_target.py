"""Prune to a latency target and check it on ONNX Runtime: asked vs predicted vs measured speed-up, written as JSON.

For every model, image size and asked speed-up, prunes a copy of the model (random init,
BN statistics calibrated on random images) with ``target: latency`` and, for comparison,
``target: macs``; exports the converted base and the pruned model to ONNX and times them
interleaved on ONNX Runtime's CPU provider (``rounds`` short rounds, every other one in
reverse order, so both see the same states of the machine; the speed-up is the ratio of
the fastest runs, the median of the paired ratios is kept beside it). Targets (issue 21): asked 2x -> measured >= 1.95x, 3x -> >= 2.85x, the
prediction within 10 % of the measurement.

    python benchmarks/latency_target.py                       # the record: 4 models x 640, 160 px x 2x, 3x
    python benchmarks/latency_target.py --models yolov8n.yaml --imgsz 160 --speed-ups 2 --rounds 5   # a quick check

The latency tables are cached (``--cache``), so a second run only prunes and times.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import time

import torch

import yoloprune  # noqa: F401  (offline switches before ultralytics is imported)
from yoloprune.errors import YoloPruneError
from yoloprune.io import load_model, write_json
from yoloprune.latency import LatencyConfig, LatencyModel, get_runtime, measure_speed_up
from yoloprune.macs import deployed_branch
from yoloprune.prune import PruneConfig, calibrate_bn, kept_whole, narrowed_copies, prepare, prune_model
from yoloprune.runtime import machine_info, versions

MEASURED_MIN = {2.0: 1.95, 3.0: 2.85}  # issue 21's bars; other asks: 97.5 % of the ask
PREDICTION_ERROR_MAX = 0.10

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--models", nargs="+", default=["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml", "yolov8s.yaml"])
parser.add_argument("--imgsz", nargs="+", type=int, default=[640, 160])
parser.add_argument("--speed-ups", nargs="+", type=float, default=[2.0, 3.0])
parser.add_argument("--targets", nargs="+", default=["latency", "macs"], choices=["latency", "macs"])
parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per pair (median of ratios)")
parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
parser.add_argument("--cache", default=None, help="latency table folder (default ~/.cache/yoloprune/latency)")
parser.add_argument("--out", default="benchmarks/results/latency_target.json")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(message)s")

rows = []
t_start = time.perf_counter()
for name in args.models:
    gen = torch.Generator().manual_seed(0)
    calibrated = calibrate_bn(load_model(name), [torch.rand(4, 3, 128, 128, generator=gen) for _ in range(2)]).eval()
    for imgsz in args.imgsz:
        base = prepare(copy.deepcopy(calibrated))  # converted: the network the prediction and the pruning start from
        for target in args.targets:
            for asked in args.speed_ups:
                model = copy.deepcopy(base)
                cfg = PruneConfig(speed_up=asked, imgsz=imgsz, target=target, threads=args.threads,
                                  latency_cache=args.cache)
                # the same table predicts the MACs-targeted model: built on this copy before pruning it in place
                _, unused = deployed_branch(model, cfg.branch)
                kept = kept_whole(model)
                blocks = math.lcm(cfg.round_to, get_runtime(cfg.runtime, cfg.threads).block)
                lat = LatencyModel(model, LatencyConfig(threads=args.threads, imgsz=imgsz, cache_dir=args.cache),
                                   exclude=set(unused), fixed_out=set(kept),
                                   calibration=lambda: narrowed_copies(model, kept, blocks))  # noqa: B023 (called now)
                row = {"model": name, "imgsz": imgsz, "target": target, "asked": asked}
                t0 = time.perf_counter()
                try:
                    report = prune_model(model, cfg, progress=False)
                except YoloPruneError as e:
                    rows.append({**row, "error": str(e)})
                    logging.warning("%s %d %s %gx: %s", name, imgsz, target, asked, e)
                    continue
                predicted = lat.whole_ms / lat()
                table_only = lat.whole_ms / lat.table_only()  # the profile's split, uncalibrated (before 2026-12-03)
                measured = measure_speed_up(base, model, imgsz, threads=args.threads, rounds=args.rounds)
                row.update(
                    prune_seconds=round(time.perf_counter() - t0, 1),
                    macs_speed_up=report.macs_speed_up,
                    predicted_speed_up=predicted,
                    measured_speed_up=measured["speed_up"],  # median of the rounds' paired ratios, interleaved
                    measured_fastest_ratio=measured["fastest_ratio"],  # fastest run / fastest run (before 2026-12-03)
                    measured_base_ms=measured["base_ms"],
                    measured_pruned_ms=measured["pruned_ms"],
                    measured_ratio_iqr=measured["ratio_iqr"],
                    node_speed_up=measured["node_speed_up"],  # sums of per-node fastest times: load-proof
                    load_avg_1m=measured["load_avg_1m"],
                    other_load=measured["other_load"],  # other processes' share of the CPU while timing
                    table_only_speed_up=table_only,
                    table_only_error=table_only / measured["speed_up"] - 1,
                    calibration=lat.calibration,
                    prediction_error=predicted / measured["speed_up"] - 1,
                    node_prediction_error=predicted / measured["node_speed_up"] - 1,
                    measured_ok=measured["speed_up"] >= MEASURED_MIN.get(asked, 0.975 * asked),
                    prediction_ok=abs(predicted / measured["speed_up"] - 1) <= PREDICTION_ERROR_MAX,
                    round_to=report.round_to,
                    checks=report.latency_checks,  # the pruner's own checks on the runtime (target latency)
                )
                rows.append(row)
                logging.info("%s %d px %s %gx: predicted %.3fx, measured %.3fx (MACs %.3fx)", name, imgsz, target,
                             asked, predicted, measured["speed_up"], report.macs_speed_up)

result = {
    "rows": rows,
    "settings": {**vars(args), "measured_min": MEASURED_MIN, "prediction_error_max": PREDICTION_ERROR_MAX},
    "seconds": round(time.perf_counter() - t_start, 1),
    "machine": machine_info(torch.device("cpu")),
    "versions": {**versions(), "onnxruntime": __import__("onnxruntime").__version__},
}
write_json(result, args.out)
print(f"{'model':14} {'px':>4} {'target':8} {'asked':>5} {'MACs':>6} {'pred':>6} {'meas':>6} {'err':>6} {'nodes':>6} "
      f"{'table':>6} {'t.err':>6}")
for r in rows:
    if "error" in r:
        print(f"{r['model']:14} {r['imgsz']:>4} {r['target']:8} {r['asked']:>5g} error: {r['error']}")
        continue
    print(f"{r['model']:14} {r['imgsz']:>4} {r['target']:8} {r['asked']:>5g} {r['macs_speed_up']:6.2f} "
          f"{r['predicted_speed_up']:6.2f} {r['measured_speed_up']:6.2f} {r['prediction_error']:+6.1%} "
          f"{r['node_speed_up']:6.2f} {r['table_only_speed_up']:6.2f} {r['table_only_error']:+6.1%}")
print(f"-> {args.out}")
