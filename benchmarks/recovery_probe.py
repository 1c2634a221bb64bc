"""Probe a pruning or fine-tune setting's accuracy cost on the pipeline's own baseline; write JSON.

A small, fast tool for iterating on the method before the study: it takes the pipeline's
converted baseline (``models/sparse.pt``, from ``dvc repro``), prunes it with each named
variant's settings on top of ``params.yaml``, fine-tunes it as the finetune stage does,
and reports mAP50-95 (PyTorch, the val split) against the equal-budget control the
pipeline trained (``models/control.pt``, measured the same way). One model, one seed per
run: differences under about two points are noise (seeds move retention by about that).

    python benchmarks/recovery_probe.py                              # every variant below
    python benchmarks/recovery_probe.py --only lamp-global lamp-local --seeds 0 1
    python benchmarks/recovery_probe.py --only lamp-local --set prune.speed_up=3 finetune.epochs=20
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

import yoloprune  # noqa: F401  (offline switches before ultralytics is imported)
from yoloprune.benchmark import BenchmarkConfig, accuracy
from yoloprune.calibration import batches_loss, calibration_batches
from yoloprune.config import FinetuneConfig
from yoloprune.finetune import finetune
from yoloprune.importance import get_method
from yoloprune.io import load_model, save_model, write_json
from yoloprune.params import data_yaml, load_params
from yoloprune.prune import PruneConfig, prune_model
from yoloprune.sparsity import SparsityConfig, sparsity_train

# name -> dotted overrides of params.yaml (prune.*, finetune.*, finetune.args.*)
VARIANTS: dict[str, dict[str, object]] = {
    "lamp-global": {},  # params.yaml as it is (finetune lr0 0.002)
    "lamp-lr1": {"finetune.args.lr0": 0.001},  # the fine-tune's rate before 2026-12-02
    "lamp-local": {"prune.global_pruning": False},
    "l1-local": {"prune.global_pruning": False, "method": "l1"},
    "lamp-global-cap50": {"prune.max_layer_ratio": 0.5},
    "lamp-lr2": {"finetune.args.lr0": 0.002},
    "lamp-lr4": {"finetune.args.lr0": 0.004},
    "lamp-output": {"finetune.distill.method": "output"},
    "lamp-cwd": {"finetune.distill.method": "cwd"},
    "lamp-both": {"finetune.distill.method": "both"},
    "lamp-lr2-cwd": {"finetune.args.lr0": 0.002, "finetune.distill.method": "cwd"},
    "lamp-lr3": {"finetune.args.lr0": 0.003},
    "taylor-lr2": {"finetune.args.lr0": 0.002, "method": "taylor"},
    # the converged baseline's three best, stacked (2026-12-03 evening)
    "taylor-cap50": {"method": "taylor", "prune.max_layer_ratio": 0.5},
    "lamp-cap50-both": {"prune.max_layer_ratio": 0.5, "finetune.distill.method": "both"},
    "taylor-cap50-both": {"method": "taylor", "prune.max_layer_ratio": 0.5, "finetune.distill.method": "both"},
    "control-lr2": {"unpruned": True, "finetune.args.lr0": 0.002},  # the baseline fine-tuned alike, not pruned
    "control-lr1": {"unpruned": True, "finetune.args.lr0": 0.001},
    "control-lr3": {"unpruned": True, "finetune.args.lr0": 0.003},
    # sparsity training (group lasso / BN-scale L1) on the converted baseline before pruning; its epochs add to the cost
    "sparse5": {"sparsity.epochs": 5},
    "sparse5-bn": {"sparsity.epochs": 5, "sparsity.kind": "bn_l1"},
    "lamp-ft+5": {"finetune.epochs": "+5"},  # the equal-cost reference for the sparse5 variants: 5 more fine-tune epochs
    # gradual: prune speed_up ** (1/K) and fine-tune epochs/K, K times (the same epochs in all)
    "rounds2": {"rounds": 2},
    "rounds4": {"rounds": 4},
    # linear compensation of the removed channels (yoloprune/compensate.py), 2026-12-03 (second night)
    "lamp-comp": {"prune.compensate": True},
    "lamp-comp-cap50": {"prune.compensate": True, "prune.max_layer_ratio": 0.5},
    "taylor-comp": {"prune.compensate": True, "method": "taylor"},
    "lamp-comp-both": {"prune.compensate": True, "finetune.distill.method": "both"},
    "lamp-comp-lr1": {"prune.compensate": True, "finetune.args.lr0": 0.001},
    "lamp-comp-lr05": {"prune.compensate": True, "finetune.args.lr0": 0.0005},
}


def override(params: dict, dotted: dict[str, object]) -> dict:
    out = copy.deepcopy(params)
    for key, value in dotted.items():
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = node.get(leaf, 0) + int(value) if isinstance(value, str) and value.startswith("+") else value
    return out


def parse_set(items: list[str]) -> dict[str, object]:
    return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in items)}


def sparse_model(model: str, params: dict, done: dict[tuple, Path], work: Path) -> str | Path:
    """Return ``model`` trained with the variant's sparsity penalty (``model`` itself when ``sparsity.epochs`` is 0)."""
    cfg = SparsityConfig.from_params(params)
    if cfg.epochs == 0:
        return model
    key = (cfg.epochs, cfg.reg, cfg.kind)
    if key not in done:
        t0, f = time.perf_counter(), params["finetune"]
        result = sparsity_train(model, data_yaml(params), cfg, work / f"sparse{len(done)}", imgsz=params["imgsz"],
                                batch=f["batch"], device="cpu", workers=f["workers"], threads=f["threads"], **f["args"])
        done[key] = work / f"sparse{len(done)}.pt"
        save_model(load_model(result.best), done[key], {"sparsity": {"epochs": cfg.epochs, "kind": cfg.kind}})
        print(f"sparsity {key}: mAP50-95 {result.map50_95:.4f} in {time.perf_counter() - t0:.0f} s", flush=True)
    return done[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=sorted(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="fine-tune seeds (Ultralytics' seed)")
    parser.add_argument("--set", nargs="*", default=[], help="dotted params overrides for every variant, k=v")
    parser.add_argument("--model", default="models/sparse.pt", help="the converted baseline to prune")
    parser.add_argument("--control", default="models/control.pt", help="the equal-budget control to compare with")
    parser.add_argument("--baseline", default="models/baseline.pt", help="what control-* variants fine-tune")
    parser.add_argument("--teacher", default="models/baseline.pt", help="the distillation teacher")
    parser.add_argument("--out", default="benchmarks/results/recovery_probe_run.json",
                        help="the rows, rewritten after every run (recovery_probe.json: the record of 2026-12-02)")
    args = parser.parse_args()

    base_params = override(load_params(), parse_set(args.set))
    data = str(data_yaml(base_params))
    val = BenchmarkConfig(imgsz=base_params["imgsz"], data=data)
    control = accuracy(Path(args.control), val, torch.device("cpu"))["map50_95"]
    print(f"control {args.control}: mAP50-95 {control:.4f}", flush=True)
    rows, sparse = [], {}
    work = tempfile.TemporaryDirectory(prefix="yoloprune-probe-sparse-")
    for name in args.only:
        variant = dict(VARIANTS[name])
        unpruned = bool(variant.pop("unpruned", False))
        rounds = int(variant.pop("rounds", 1))
        params = override(base_params, variant)
        cfg, ft = PruneConfig.from_params(params), FinetuneConfig.from_params(params)
        model = load_model(args.baseline if unpruned else sparse_model(args.model, params, sparse, Path(work.name)))
        batches = calibration_batches(model, data, cfg.imgsz, cfg.calib_batches, seed=cfg.seed) \
            if not unpruned and (cfg.compensate or get_method(cfg.method).needs_gradients) else []
        loss_fn = batches_loss(batches) if get_method(cfg.method).needs_gradients and batches else None
        images = [b["img"] for b in batches] if cfg.compensate else None
        report = {"macs_speed_up": 1.0, "pruned_params": sum(p.numel() for p in model.parameters())} if unpruned \
            else prune_model(model, cfg, loss_fn=loss_fn, images=images).to_dict() if rounds == 1 else None
        start = copy.deepcopy(model) if rounds > 1 else None  # gradual: each seed prunes and fine-tunes in rounds
        for seed in args.seeds:
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="yoloprune-probe-") as tmp:
                settings = ft.settings(params["imgsz"])
                settings.update(seed=seed, distill=ft.distill, teacher=args.teacher if ft.distill.terms else None)
                current, macs0 = copy.deepcopy(start) if rounds > 1 else model, None
                for r in range(rounds):
                    if rounds > 1:  # this round's share of the speed-up, on the model the last round fine-tuned
                        part = PruneConfig(**{**cfg.__dict__, "speed_up": cfg.speed_up ** (1 / rounds)})
                        report = prune_model(current, part, images=images).to_dict()
                        macs0 = macs0 or report["base_macs"]
                        report["macs_speed_up"] = macs0 / report["pruned_macs"]
                        settings["epochs"] = ft.epochs // rounds + (r < ft.epochs % rounds)
                    pruned = Path(tmp) / f"pruned{r}.pt"
                    save_model(current, pruned, report)
                    result = finetune(pruned, data, device="cpu", workers=ft.workers, threads=ft.threads,
                                      out_dir=Path(tmp) / f"run{r}", **settings)
                    if r < rounds - 1:
                        current = load_model(result.best)
                score = accuracy(Path(result.best), val, torch.device("cpu"))["map50_95"]
            row = {"variant": name, "seed": seed, "overrides": {**parse_set(args.set), **VARIANTS[name]},
                   "macs_speed_up": round(report["macs_speed_up"], 3),
                   "params_m": round(report["pruned_params"] / 1e6, 3), "map50_95": round(score, 4),
                   "control_map50_95": round(control, 4), "vs_control_pct": round(100 * score / control, 1),
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_json({"rows": rows}, args.out)  # after every run: an interrupted probe keeps what it measured


if __name__ == "__main__":
    main()
