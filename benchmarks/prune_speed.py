"""Time prune_model on yolov8n.yaml to 2x MACs at imgsz 640: median of repeats, written as JSON.

Target (the pruning-speed issue): at most 20 s on a 2-core CPU. Model building and BN
calibration are not timed; each repeat prunes a fresh copy of the same calibrated model.

    python benchmarks/prune_speed.py [--repeats 3] [--out benchmarks/results/prune_speed.json]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import torch

import yoloprune  # noqa: F401  (offline switches before ultralytics is imported)
from yoloprune.benchmark import library_versions, machine_info
from yoloprune.io import load_model, write_json
from yoloprune.prune import PruneConfig, calibrate_bn, prune_model

TARGET_S = 20.0

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="yolov8n.yaml")
parser.add_argument("--speed-up", type=float, default=2.0)
parser.add_argument("--imgsz", type=int, default=640)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--out", default="benchmarks/results/prune_speed.json")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(message)s")

gen = torch.Generator().manual_seed(0)
base = calibrate_bn(load_model(args.model), [torch.rand(4, 3, 128, 128, generator=gen) for _ in range(2)])
cfg = PruneConfig(speed_up=args.speed_up, imgsz=args.imgsz)
runs = []
for i in range(args.repeats):
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    report = prune_model(model, cfg, progress=False)
    seconds = time.perf_counter() - t0
    runs.append({"seconds": seconds, "speed_up": report.speed_up, "steps": report.steps,
                 "pruned_macs": report.pruned_macs, "pruned_params": report.pruned_params})
    print(f"repeat {i + 1}: {seconds:.1f} s, {report.speed_up:.3f}x in {report.steps} steps", flush=True)
median = statistics.median(r["seconds"] for r in runs)
result = {
    "model": args.model,
    "speed_up_target": args.speed_up,
    "imgsz": args.imgsz,
    "method": cfg.method,
    "iterative_steps": cfg.iterative_steps,
    "repeats": args.repeats,
    "median_s": median,
    "min_s": min(r["seconds"] for r in runs),
    "target_s": TARGET_S,
    "meets_target": median <= TARGET_S,
    "torch_threads": torch.get_num_threads(),
    "base_macs": report.base_macs,
    "base_params": report.base_params,
    "runs": runs,
    "machine": machine_info(torch.device("cpu")),
    "versions": library_versions("torch"),
}
write_json(result, args.out)
print(f"median {median:.1f} s over {args.repeats} repeats (target <= {TARGET_S:.0f} s): "
      f"{'met' if result['meets_target'] else 'NOT met'} -> {args.out}")
