"""The ``yoloprune`` command: thin verbs over the library.

Errors a user can fix print as one line (``yoloprune: error: ...``) with exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from yoloprune.errors import YoloPruneError

LOGGER = logging.getLogger("yoloprune")


def _default_out(model: str, suffix: str) -> Path:
    return Path(Path(model).stem + f"-{suffix}.pt")


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a model's blocks to their pruning-friendly forms and save it."""
    from yoloprune.convert import convert_model
    from yoloprune.io import load_model, save_model
    from yoloprune.prune import versions

    model = load_model(args.model)
    n = convert_model(model)
    out = save_model(model, args.output or _default_out(args.model, "converted"),
                     {"converted_blocks": n, "source": str(args.model), "versions": versions()})
    print(f"converted {n} blocks -> {out}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune a model to a target speed-up, save it and optionally write a JSON report."""
    from yoloprune.io import load_model, save_model, write_json
    from yoloprune.prune import PruneConfig, prune_model

    cfg = PruneConfig(
        speed_up=args.speed_up,
        method=args.method,
        global_pruning=args.global_pruning,
        iterative_steps=args.iterative_steps,
        round_to=args.round_to,
        max_layer_ratio=args.max_layer_ratio,
        imgsz=args.imgsz,
    )
    model = load_model(args.model)
    report = prune_model(model, cfg, progress=not args.quiet).to_dict()
    out = args.output or _default_out(args.model, "pruned")
    report.update(source=str(args.model), output=str(out))
    save_model(model, out, report)
    if args.report:
        write_json(report, args.report)
    print(f"pruned {args.model}: {report['base_macs'] / 1e9:.2f} -> {report['pruned_macs'] / 1e9:.2f} GMACs "
          f"({report['speed_up']:.3f}x, {report['base_params'] / 1e6:.2f}M -> {report['pruned_params'] / 1e6:.2f}M "
          f"params) in {report['seconds']:.1f}s -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every verb."""
    from yoloprune.importance import METHODS

    p = argparse.ArgumentParser(prog="yoloprune", description="Structured pruning for Ultralytics YOLO models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="verb", required=True)

    c = sub.add_parser("convert", help="swap C2f/C3k2/C2PSA/Attention for split-free equivalents")
    c.add_argument("model", help="YOLO .pt checkpoint or model yaml (e.g. yolo11n.yaml)")
    c.add_argument("-o", "--output", help="output .pt (default: <model>-converted.pt)")
    c.set_defaults(func=cmd_convert)

    r = sub.add_parser("prune", help="prune to a target MACs speed-up")
    r.add_argument("model", nargs="?", help="YOLO .pt checkpoint or model yaml (e.g. yolo11n.yaml)")
    r.add_argument("--model_path", dest="model_path", help=argparse.SUPPRESS)  # the seed tool's name
    r.add_argument("--speed-up", "--speed_up", type=float, default=2.0, help="target base/pruned MACs (default 2.0)")
    r.add_argument("--method", "--prune_method", default="lamp", choices=sorted(METHODS),
                   help="channel importance (default lamp)")
    r.add_argument("--global-pruning", "--global_pruning", action=argparse.BooleanOptionalAction, default=True,
                   help="rank channels across layers (default) or prune each layer alike")
    r.add_argument("--iterative-steps", "--iterative_steps", type=int, default=40, help="pruning schedule steps")
    r.add_argument("--round-to", "--round_to", type=int, default=8, help="keep channel counts multiples of N")
    r.add_argument("--max-layer-ratio", type=float, default=0.75, help="most any layer may lose (default 0.75)")
    r.add_argument("--imgsz", type=int, default=640, help="image size at which MACs are counted")
    r.add_argument("-o", "--output", help="output .pt (default: <model>-pruned.pt)")
    r.add_argument("--report", help="write a JSON report here")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_prune)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "model_path", None):
        args.model = args.model or args.model_path
    if hasattr(args, "model") and not args.model:
        parser.error("a MODEL (.pt or model yaml) is required")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except YoloPruneError as e:
        if args.debug:
            raise
        print(f"yoloprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("yoloprune: interrupted; outputs already written are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
