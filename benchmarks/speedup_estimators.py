"""Time the same (unpruned, pruned) pair many times and compare how steady three speed-up estimators are; write JSON.

Each timing is ``Runtime.paired_times`` (9 interleaved rounds, each network's fastest run per round); from it:
``paired``: the median over rounds of the rounds' ratios (what ``Runtime.speed_up`` returns since 2026-12-03);
``fastest``: the two fastest runs' ratio (before); ``medians``: the ratio of the two networks' medians over rounds
(the benchmark stage's ``latency_best_ms``). The steadier an estimator over timings minutes apart, the less the latency
checks chase noise.

    python benchmarks/speedup_estimators.py --imgsz 160 --timings 12
"""

from __future__ import annotations

import argparse
import statistics

import torch

import yoloprune  # noqa: F401  (offline switches before ultralytics is imported)
from yoloprune.io import load_model, write_json
from yoloprune.latency import OnnxRuntime
from yoloprune.prune import PruneConfig, prepare, prune_model
from yoloprune.runtime import machine_info, paired_ratio

ESTIMATORS = {
    "paired": paired_ratio,
    "fastest": lambda b, p: min(b) / min(p),
    "medians": lambda b, p: statistics.median(b) / statistics.median(p),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["yolov8n.yaml", "yolo11n.yaml"])
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--macs", type=float, default=2.8, help="the pruned copy's MACs speed-up (lamp)")
    parser.add_argument("--timings", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="default benchmarks/results/speedup_estimators_<imgsz>.json")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        base = prepare(load_model(name)).eval()
        pruned = load_model(name)
        prune_model(pruned, PruneConfig(speed_up=args.macs, imgsz=args.imgsz, iterative_steps=20), progress=False)
        rt = OnnxRuntime(args.threads)
        runs = (rt.runner(base, args.imgsz), rt.runner(pruned.eval(), args.imgsz))
        timings = [rt.paired_times(base, pruned, args.imgsz, 9, runs=runs) for _ in range(args.timings)]
        for key, fn in ESTIMATORS.items():
            values = [fn(b, p) for b, p in timings]
            of3 = [statistics.median(values[i:i + 3]) for i in range(0, len(values) - 2, 3)]
            rows.append({"model": name, "estimator": key, "values": values, "low": min(values), "high": max(values),
                         "sd_pct": 100 * statistics.stdev(values) / statistics.mean(values),
                         "median_of_3_low": min(of3), "median_of_3_high": max(of3)})
            print(f"{name} {args.imgsz} px {key:8s} {min(values):.3f}-{max(values):.3f}x sd {rows[-1]['sd_pct']:.1f} % "
                  f"median of 3: {min(of3):.3f}-{max(of3):.3f}x", flush=True)
    write_json({"rows": rows, "settings": vars(args), "machine": machine_info(torch.device("cpu"))},
               args.out or f"benchmarks/results/speedup_estimators_{args.imgsz}.json")


if __name__ == "__main__":
    main()
