"""The ``yoloprune`` command: thin verbs over the library.

Errors a user can fix print as one line (``yoloprune: error: ...``) with exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from yoloprune.errors import YoloPruneError, run_main
from yoloprune.offline import configure_offline


def _default_out(model: str, suffix: str) -> Path:
    return Path(Path(model).stem + f"-{suffix}.pt")


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a model's blocks to their pruning-friendly forms and save it."""
    from yoloprune.convert import convert_model
    from yoloprune.io import load_model, save_model
    from yoloprune.runtime import versions

    model = load_model(args.model)
    n = convert_model(model)
    out = save_model(model, args.output or _default_out(args.model, "converted"),
                     {"converted_blocks": n, "source": str(args.model), "versions": versions()})
    print(f"converted {n} blocks -> {out}")
    return 0


def _calibration(model, cfg, args: argparse.Namespace):
    """Return ``(loss_fn, images)`` from --data's training batches: the real loss a gradient method (taylor) scores
    with, and the images compensation fits on; each None when not needed or without --data."""
    from yoloprune.importance import get_method

    gradients = get_method(cfg.method).needs_gradients
    if not args.data or not (gradients or cfg.compensate):
        return None, None  # prune_model warns that taylor falls back to random images; compensate says it needs data
    from yoloprune.calibration import batches_loss, calibration_batches

    batches = calibration_batches(model, args.data, cfg.imgsz, args.calib_batches, seed=cfg.seed)
    return batches_loss(batches) if gradients else None, [b["img"] for b in batches] if cfg.compensate else None


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune a model to a target speed-up, save it and optionally write a JSON report."""
    from yoloprune.data import check_data_yaml
    from yoloprune.io import load_model, save_model, write_json
    from yoloprune.prune import PruneConfig, prune_model

    cfg = PruneConfig.from_args(args, exclude=("threads",),  # --threads: the fine-tune's, not the latency target's
                                threads=args.latency_threads,  # compensation by default wherever --data gives images
                                compensate=bool(args.data) if args.compensate is None else args.compensate)
    out = Path(args.output) if args.output else _default_out(args.model, "pruned")
    if args.data:  # the seed tool's flow: prune, then fine-tune the pruned network right away
        check_data_yaml(args.data)  # before minutes of pruning, not after
    model = load_model(args.model)
    loss_fn, images = _calibration(model, cfg, args)
    report = prune_model(model, cfg, loss_fn=loss_fn, progress=not args.quiet, images=images).to_dict()
    report.update(source=str(args.model), output=str(out))
    print(f"pruned {args.model}: {report['base_macs'] / 1e9:.2f} -> {report['pruned_macs'] / 1e9:.2f} GMACs "
          f"({report['macs_speed_up']:.3f}x, {report['base_params'] / 1e6:.2f}M -> "
          f"{report['pruned_params'] / 1e6:.2f}M "
          f"params) in {report['seconds']:.1f}s")
    if report["target"] == "latency":
        print(f"predicted {report['runtime']} latency: {report['predicted_base_ms']:.2f} -> "
              f"{report['predicted_pruned_ms']:.2f} ms ({report['predicted_latency_speed_up']:.3f}x)")
    if args.data:
        run_dir = Path(args.project) / out.stem
        pruned = save_model(model, run_dir / "pruned.pt", report)  # fine-tuning reads a checkpoint file
        result = _finetune(pruned, args, run_dir / "finetune", resume=False)
        report["finetune"] = {"epochs": result.epochs, "map50": result.map50, "map50_95": result.map50_95,
                              "run": str(result.save_dir)}
        model = load_model(result.best)
    save_model(model, out, report)
    if args.report:
        write_json(report, args.report)
    print(f"saved -> {out}")
    return 0


def _finetune(model: Path, args: argparse.Namespace, out_dir: Path, resume: bool):
    from yoloprune.config import DistillConfig
    from yoloprune.finetune import finetune

    distill = DistillConfig.from_args({}, method=getattr(args, "distill", None),  # the prune verb has no such flags
                                      weight=getattr(args, "distill_weight", None),
                                      temperature=getattr(args, "distill_temperature", None))
    result = finetune(model, args.data, epochs=args.epochs, imgsz=args.imgsz, batch=args.batch,
                      device=str(args.device), out_dir=out_dir, resume=resume, workers=args.workers,
                      threads=args.threads, teacher=getattr(args, "teacher", None), distill=distill)
    print(f"fine-tuned {result.epochs} epochs: mAP50 {_fmt(result.map50)}, mAP50-95 {_fmt(result.map50_95)} "
          f"(run: {result.save_dir})")
    return result


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a pruned checkpoint with the Ultralytics trainer; save the best weights (fp32)."""
    from yoloprune.io import load_model, save_model

    out = Path(args.output) if args.output else _default_out(args.model, "finetuned")
    run_dir = Path(args.project) / out.stem
    result = _finetune(Path(args.model), args, run_dir, resume=args.resume)
    save_model(load_model(result.best), out, {"source": str(args.model), "epochs": result.epochs,
                                              "map50": result.map50, "map50_95": result.map50_95})
    print(f"saved -> {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a checkpoint through the Ultralytics exporter, with the ONNX parity check."""
    from yoloprune.export import ExportConfig, export_model
    from yoloprune.io import write_json

    cfg = ExportConfig.from_args(args)
    report = export_model(args.model, cfg, out=args.output).to_dict()
    if args.report:
        write_json(report, args.report)
    parity = ("" if report["max_rel_error"] is None
              else f", parity {report['max_rel_error']:.2e} of output scale (tolerance {report['tolerance']:g})")
    print(f"exported {args.model} -> {report['path']} ({report['size_mb']:.1f} MB{parity})")
    return 0


def _square(imgs: list[int]) -> int:
    h, w = imgs
    if h != w:
        raise YoloPruneError(f"--imgs {h} {w}: only square inputs are timed; use --imgs {max(h, w)} {max(h, w)}")
    return h


def cmd_fps(args: argparse.Namespace) -> int:
    """Time a checkpoint's forward pass: latency median/p90 and FPS (the seed tool's get_fps)."""
    from yoloprune.benchmark import BenchmarkConfig, benchmark
    from yoloprune.io import write_json

    report = benchmark(args.weights, BenchmarkConfig.from_args(args, imgsz=_square(args.imgs), iters=args.testtime))
    if args.report:
        write_json(report, args.report)
    acc = "".join(f", {k} {report[k]:.4f}" for k in ("map50", "map50_95") if k in report)
    print(f"{args.weights} ({report['runtime']}, {report['device']}, batch {report['batch']}, imgsz "
          f"{report['imgsz']}, {report['threads']} threads): latency {report['latency_best_ms']:.2f} ms (each round's "
          f"fastest, median over rounds), median {report['latency_median_ms']:.2f} ms, p90 "
          f"{report['latency_p90_ms']:.2f} ms, {report['fps']:.1f} FPS, {report['gflops']:.2f} GFLOPs{acc}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    """Benchmark a base and a pruned checkpoint under the same settings; print and save the comparison."""
    from yoloprune.benchmark import BenchmarkConfig, benchmark_many, compare, format_table
    from yoloprune.io import write_json

    cfg = BenchmarkConfig.from_args(args, runtime=args.runtime[0])  # each runtime in turn, below
    result: dict = {"base": {}, "pruned": {}, "compare": {}}
    for runtime in dict.fromkeys(args.runtime):  # each runtime once, in the order given
        # the two timed taking turns (time_interleaved); accuracy measured with the first runtime only
        base, pruned = benchmark_many([args.base, args.pruned], cfg, runtime=runtime,
                                      data=args.data if not result["base"] else None)
        if args.data and result["base"]:  # accuracy is measured once; the same numbers hold for every runtime
            first = next(iter(result["base"]))
            for rep, saved in ((base, result["base"][first]), (pruned, result["pruned"][first])):
                rep.update({k: saved[k] for k in ("map50", "map50_95", "top1", "top5") if k in saved})
        result["base"][runtime], result["pruned"][runtime] = base, pruned
        result["compare"][runtime] = cmp = compare(base, pruned)
        print(f"\n{runtime}: {args.base} vs {args.pruned}\n{format_table(cmp)}")
    if args.report:
        write_json(result, args.report)
        print(f"\nreport -> {args.report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every verb."""
    from yoloprune.benchmark import RUNTIMES
    from yoloprune.calibration import CALIB_BATCHES
    from yoloprune.config import DISTILL_METHODS
    from yoloprune.export import FORMATS
    from yoloprune.importance import METHODS
    from yoloprune.latency import RUNTIMES as latency_runtimes

    p = argparse.ArgumentParser(prog="yoloprune", description="Structured pruning for Ultralytics YOLO models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="verb", required=True)

    c = sub.add_parser("convert", help="swap C2f/C3k2/C2PSA/Attention for split-free equivalents")
    c.add_argument("model", help="YOLO .pt checkpoint or model yaml (e.g. yolo11n.yaml)")
    c.add_argument("-o", "--output", help="output .pt (default: <model>-converted.pt)")
    c.set_defaults(func=cmd_convert)

    r = sub.add_parser("prune", help="prune to a target MACs or latency speed-up")
    r.add_argument("model", nargs="?", help="YOLO .pt checkpoint or model yaml (e.g. yolo11n.yaml)")
    r.add_argument("--model_path", dest="model_path", help=argparse.SUPPRESS)  # the seed tool's name
    r.add_argument("--speed-up", "--speed_up", type=float, default=2.0,
                   help="target base/pruned MACs, or latency with --target latency (default 2.0)")
    r.add_argument("--method", "--prune_method", default="lamp", choices=sorted(METHODS),
                   help="channel importance (default lamp); " + "; ".join(f"{n}: {m.doc}" for n, m in METHODS.items()))
    r.add_argument("--calib-batches", "--calib_batches", type=int, default=CALIB_BATCHES,
                   help=f"real training batches of 8 from --data: taylor's loss gradients, --compensate's regression "
                        f"(default {CALIB_BATCHES})")
    r.add_argument("--compensate", action=argparse.BooleanOptionalAction,
                   help="fold each removed channel into the kept ones, fitted on --data's training images (default: "
                        "on with --data); yolov8n at 2x fewer MACs keeps 0.49 mAP50-95 before fine-tuning, not 0.08")
    r.add_argument("--global-pruning", "--global_pruning", action=argparse.BooleanOptionalAction, default=True,
                   help="rank channels across layers (default) or prune each layer alike")
    r.add_argument("--iterative-steps", "--iterative_steps", type=int, default=40, help="pruning schedule steps")
    r.add_argument("--round-to", "--round_to", type=int, default=8, help="keep channel counts multiples of N")
    r.add_argument("--max-layer-ratio", type=float, default=0.75, help="most any layer may lose (default 0.75)")
    r.add_argument("--imgsz", type=int, default=640, help="image size at which MACs (or latency) are counted")
    r.add_argument("--target", choices=("macs", "latency"), help="what --speed-up divides (default macs)")
    r.add_argument("--runtime", choices=sorted(latency_runtimes),
                   help="--target latency: the runtime timed (default onnxruntime, CPU)")
    r.add_argument("--latency-threads", type=int, help="--target latency: the runtime's threads (default 2)")
    r.add_argument("--latency-cache", help="--target latency: folder of the cached latency tables "
                                           "(default ~/.cache/yoloprune/latency)")
    r.add_argument("--verify", type=int, help="--target latency: time the pruned network on the runtime up to N "
                                             "times, pruning on while it is short of the target (default 6; 0: "
                                             "trust the table)")
    r.add_argument("--cost-power", type=float, help="--target latency: rank channels by importance / (ms saved) "
                                                    "** P (default 0: importance alone, measured best)")
    r.add_argument("-o", "--output", help="output .pt (default: <model>-pruned.pt)")
    r.add_argument("--report", help="write a JSON report here")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.add_argument("--data", help="data.yaml: fine-tune right after pruning (the seed tool's flow); -o is then "
                                  "the fine-tuned model. taylor scores channels and --compensate fits on its training batches")
    _training_args(r, epochs=10)
    r.set_defaults(func=cmd_prune)

    f = sub.add_parser("finetune", help="recover accuracy: train the pruned network itself (Ultralytics trainer)")
    f.add_argument("model", help="pruned .pt checkpoint")
    f.add_argument("--data", required=True, help="data.yaml of your dataset")
    f.add_argument("--imgsz", type=int, default=640, help="training image size (default 640)")
    _training_args(f, epochs=10)
    f.add_argument("--resume", action="store_true", help="continue the interrupted run of this output")
    f.add_argument("--teacher", help="the unpruned .pt checkpoint to distil from (with --distill)")
    f.add_argument("--distill", choices=list(DISTILL_METHODS), default=None,
                   help="distillation: output (class scores, box distributions), cwd (channel-wise, neck features) "
                        "or both (default none)")
    f.add_argument("--distill-weight", type=float, help="multiplies the distillation loss (default 1.0)")
    f.add_argument("--distill-temperature", type=float, help="softening temperature (default 1.0)")
    f.add_argument("-o", "--output", help="output .pt, the best epoch in fp32 (default: <model>-finetuned.pt)")
    f.set_defaults(func=cmd_finetune)

    e = sub.add_parser("export", help="export through Ultralytics (ONNX with a parity check vs PyTorch)")
    e.add_argument("model", help=".pt checkpoint")
    e.add_argument("--format", default="onnx", choices=sorted(FORMATS), help="output format (default onnx)")
    e.add_argument("--opset", type=int, help="ONNX opset (default: Ultralytics' choice)")
    e.add_argument("--imgsz", type=int, default=640, help="input size (default 640)")
    e.add_argument("--batch", type=int, default=1, help="input batch (default 1)")
    e.add_argument("--half", action="store_true", help="FP16 weights")
    e.add_argument("--dynamic", action="store_true", help="dynamic batch and image size")
    e.add_argument("--simplify", action=argparse.BooleanOptionalAction, default=True, help="slim the ONNX graph")
    e.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="ONNX Runtime vs PyTorch parity check (default on)")
    e.add_argument("-o", "--output", help="output file (default: beside the model, Ultralytics' name)")
    e.add_argument("--report", help="write the export report (path, parity error, ...) as JSON")
    e.set_defaults(func=cmd_export)

    s = sub.add_parser("fps", help="time a model's forward pass: latency and FPS (the seed tool's get_fps)")
    s.add_argument("weights", help=".pt checkpoint")
    _timing_args(s, batch=32, warmup=10)
    s.add_argument("--imgs", type=int, nargs=2, default=[640, 640], metavar=("H", "W"),
                   help="input height and width (square; default 640 640)")
    s.add_argument("--testtime", type=int, default=100, help="timed passes (default 100)")
    s.add_argument("--runtime", default="torch", choices=sorted(RUNTIMES), help="torch (default) or onnx")
    s.add_argument("--report", help="write the measurement as JSON")
    s.set_defaults(func=cmd_fps)

    b = sub.add_parser("benchmark", help="base vs pruned side by side: params, MACs, latency, FPS, mAP")
    b.add_argument("base", help="base .pt checkpoint")
    b.add_argument("pruned", help="pruned .pt checkpoint")
    b.add_argument("--imgsz", type=int, default=640, help="input size (default 640)")
    _timing_args(b, batch=1, warmup=10)
    b.add_argument("--iters", type=int, default=100, help="timed passes per model and runtime (default 100)")
    b.add_argument("--runtime", nargs="+", default=["onnx"], choices=sorted(RUNTIMES),
                   help="runtimes to time, e.g. --runtime onnx torch (default onnx)")
    b.add_argument("--report", help="write both reports and the comparison as JSON")
    b.set_defaults(func=cmd_benchmark)
    return p


def _training_args(p: argparse.ArgumentParser, epochs: int) -> None:
    p.add_argument("--epochs", type=int, default=epochs, help=f"fine-tuning epochs (default {epochs})")
    p.add_argument("--batch", type=int, default=16, help="images per batch (default 16)")
    p.add_argument("--device", default="cpu", help="cpu, 0, or 0,1,... for Ultralytics DDP (default cpu)")
    p.add_argument("--workers", type=int, default=0, help="dataloader worker processes (default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads while training (default: every core)")
    p.add_argument("--project", default="runs/yoloprune", help="run folder parent (default runs/yoloprune)")


def _timing_args(p: argparse.ArgumentParser, batch: int, warmup: int) -> None:
    p.add_argument("--batch", type=int, default=batch, help=f"images per pass (default {batch})")
    p.add_argument("--device", default="cpu", help="cpu, 0 / cuda:0, or mps (default cpu)")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed passes first (default {warmup})")
    p.add_argument("--half", action="store_true", help="FP16 (torch on CUDA, or an FP16 ONNX export)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's current setting)")
    p.add_argument("--data", help="data.yaml: also measure mAP50 and mAP50-95 on its val split")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    configure_offline()  # first: building the parser imports Ultralytics, which reads the switches once
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "model_path", None):
        args.model = args.model or args.model_path
    if hasattr(args, "model") and not args.model:
        parser.error("a MODEL (.pt or model yaml) is required")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_main(lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
