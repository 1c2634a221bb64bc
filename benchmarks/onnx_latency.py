"""ONNX Runtime CPU latency of yolov8n before and after pruning to 2x MACs, at imgsz 640, batch 1.

Builds yolov8n from its yaml (random weights, BN recalibrated so activations are
alive), prunes a copy to 2x MACs at 640, exports both through ``yoloprune.export``
(with its parity check) and times both with ``yoloprune.benchmark``. Latency does not
depend on the weights' values, so an untrained model times like a trained one.

    python benchmarks/onnx_latency.py [--threads N] [--out benchmarks/results/onnx_latency.json]
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
from pathlib import Path

import torch

import yoloprune  # noqa: F401  (offline switches before ultralytics is imported)
from yoloprune.benchmark import benchmark, compare, format_table, onnx_cache_path
from yoloprune.export import ExportConfig, export_model
from yoloprune.io import load_model, save_model, write_json
from yoloprune.prune import PruneConfig, calibrate_bn, prune_model

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="yolov8n.yaml")
parser.add_argument("--speed-up", type=float, default=2.0)
parser.add_argument("--imgsz", type=int, default=640)
parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: torch's, = cores)")
parser.add_argument("--warmup", type=int, default=10)
parser.add_argument("--iters", type=int, default=100)
parser.add_argument("--workdir", default=None, help="keep the .pt/.onnx files here (default: a temporary folder)")
parser.add_argument("--out", default="benchmarks/results/onnx_latency.json")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(message)s")

with tempfile.TemporaryDirectory() as tmp:
    work = Path(args.workdir or tmp)
    gen = torch.Generator().manual_seed(0)
    base = calibrate_bn(load_model(args.model), [torch.rand(2, 3, args.imgsz, args.imgsz, generator=gen)
                                                 for _ in range(2)])
    pruned = copy.deepcopy(base)
    prune_report = prune_model(pruned, PruneConfig(speed_up=args.speed_up, imgsz=args.imgsz), progress=False)
    paths = {"base": save_model(base, work / "base" / "model.pt"),
             "pruned": save_model(pruned, work / "pruned" / "model.pt", prune_report.to_dict())}
    exports, reports = {}, {}
    for name, pt in paths.items():
        # Export where benchmark(runtime="onnx") looks, so it times exactly the file checked here.
        exports[name] = export_model(pt, ExportConfig(imgsz=args.imgsz), out=onnx_cache_path(pt, args.imgsz)).to_dict()
        reports[name] = benchmark(pt, imgsz=args.imgsz, batch=1, runtime="onnx", threads=args.threads,
                                  warmup=args.warmup, iters=args.iters)
    cmp = compare(reports["base"], reports["pruned"])
    table = format_table(cmp)
    print(table)
    write_json({"compare": cmp, "table": table, "base": reports["base"], "pruned": reports["pruned"],
                "export": exports, "prune": prune_report.to_dict()}, args.out)
print(f"-> {args.out}")
