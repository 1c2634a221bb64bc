"""Export a base or pruned YOLO checkpoint through the Ultralytics exporter, then check ONNX parity.

Going through ``YOLO(pt).export`` keeps the options (``imgsz``, ``opset``,
``dynamic``, ``half``, ``simplify``, ``nms``) and the metadata an ONNX file carries
exactly as Ultralytics users know them, so ``YOLO("pruned.onnx")`` predicts and
validates like any other export. The exporter fuses Conv+BN inside yoloprune's
blocks (they hold ordinary Ultralytics ``Conv`` modules) and traces them like any
other module; the written file holds only standard ONNX operators and runs without
yoloprune.

YOLO26 heads carry two branches. Ultralytics 8.4 exports the one-to-many branch
(raw boxes and scores, NMS afterwards) unless ``nms=False`` asks for the NMS-free
one-to-one branch; the report's ``branch`` names the one in the file.

The parity check runs the written ONNX file in ONNX Runtime and the unfused PyTorch
checkpoint on the same random images and compares every output; NMS-free top-k rows
are checked against the predictions they were picked from, since near-equal scores
may come out in either order.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from yoloprune.config import Config
from yoloprune.errors import YoloPruneError, check_imgsz
from yoloprune.io import scratch_dir
from yoloprune.runtime import flat_tensors, ort_session, seeded_images
from yoloprune.threads import torch_threads_kept

LOGGER = logging.getLogger("yoloprune")

# Import name -> pip requirement, as Ultralytics' exporter asks for them.
PIP = {
    "onnx": "onnx>=1.12.0,<2.0.0",
    "onnxruntime": "onnxruntime",
    "onnxslim": "onnxslim>=0.1.82",
    "openvino": "openvino>=2024.0.0",
}


@dataclass(frozen=True)
class Format:
    """An export format: the packages it needs (import names) and whether its parity can be checked here."""

    requires: tuple[str, ...] = ()
    checkable: bool = False


# Adding a format Ultralytics supports is one line: its import requirements.
FORMATS = {
    "onnx": Format(requires=("onnx",), checkable=True),
    "torchscript": Format(),
    "openvino": Format(requires=("openvino",)),
}

TOLERANCE = {False: 1e-4, True: 2e-2}  # max error relative to output scale, by half; fp16 keeps ~3 digits


@dataclass(frozen=True)
class ExportConfig(Config):
    """Validated export settings, named as Ultralytics' ``export`` arguments."""

    SECTION = "export"
    INHERITS = ("imgsz",)

    format: str = "onnx"  # see FORMATS
    imgsz: int = 640  # square input size, a multiple of the stride 32
    batch: int = 1  # input batch size (the maximum one with dynamic=True)
    opset: int | None = None  # ONNX opset; None = the newest this torch exports well (Ultralytics' choice)
    dynamic: bool = False  # dynamic batch and image size axes
    half: bool = False  # FP16 weights (ONNX keeps FP32 inputs and outputs)
    simplify: bool = True  # slim the ONNX graph with onnxslim
    nms: bool | None = None  # None: raw outputs, NMS afterwards; False: YOLO26's NMS-free branch; True: NMS in graph
    check: bool = True  # run the ONNX Runtime parity check (ONNX only)
    tolerance: float | None = None  # max error relative to output scale; None = 1e-4 (fp32) or 2e-2 (fp16)

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise YoloPruneError(msg)

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.format not in FORMATS:
            bad(f"format {self.format!r} is not supported; use one of {', '.join(FORMATS)}")
        check_imgsz(self.imgsz)
        if not is_int(self.batch) or self.batch <= 0:
            bad(f"batch must be a positive integer, got {self.batch!r}")
        if self.opset is not None and (not is_int(self.opset) or self.opset < 11):
            bad(f"opset must be an integer >= 11 or None (newest supported), got {self.opset!r}")
        if self.nms not in (None, False, True):
            bad(f"nms must be None (raw outputs), False (NMS-free head) or True (NMS in the graph), got {self.nms!r}")
        if self.tolerance is not None and not (isinstance(self.tolerance, (int, float)) and self.tolerance > 0):
            bad(f"tolerance must be a positive number (max error relative to output scale), got {self.tolerance!r}")
        if self.check and self.nms is True and self.format == "onnx":
            bad("the parity check cannot compare outputs after in-graph NMS (they depend on thresholds); "
                "export with nms=None, or pass check=False")

    @property
    def max_error(self) -> float:
        """Return the parity tolerance in force: the given one or the default for the precision."""
        return float(self.tolerance) if self.tolerance is not None else TOLERANCE[self.half]


@dataclass
class ExportReport:
    """What an export wrote and how closely it matches the PyTorch model."""

    path: str
    format: str
    imgsz: int
    batch: int
    opset: int | None  # ONNX only
    half: bool
    dynamic: bool
    branch: str  # head branch in the file: "single", "one2many" or "one2one" (YOLO26)
    max_abs_error: float | None  # parity vs PyTorch; None when not checked
    max_rel_error: float | None  # max abs error / max |PyTorch output|, worst output
    tolerance: float | None
    seconds: float
    size_mb: float

    def to_dict(self) -> dict:
        """Return the report as a JSON-ready dict."""
        return asdict(self)


def missing_packages(fmt: str, simplify: bool = False) -> list[str]:
    """Return the pip requirements of format ``fmt`` whose packages are not importable here."""
    needed = list(FORMATS[fmt].requires)
    if fmt == "onnx" and simplify:
        needed += ["onnxslim", "onnxruntime"]  # the exporter requires both to slim
    return [PIP.get(name, name) for name in needed if importlib.util.find_spec(name) is None]


def export_model(
    model_path: str | Path, cfg: ExportConfig | None = None, out: str | Path | None = None
) -> ExportReport:
    """Export the checkpoint ``model_path`` as ``cfg`` says; return the report.

    The file lands at ``out`` (into it, if ``out`` is an existing folder and the
    format writes a file), or beside the checkpoint under Ultralytics' name
    (``model.onnx``, ``model.torchscript``, ``model_openvino_model/``). It appears
    only once complete and, for ONNX, only once its parity check passed.
    """
    cfg = cfg or ExportConfig()
    t0 = time.perf_counter()
    source = Path(model_path)
    if source.suffix != ".pt" or not source.is_file():
        why = "" if source.is_file() else " (a directory)" if source.is_dir() else " (no such file)"
        raise YoloPruneError(f"{model_path}: not a .pt checkpoint file{why}; export a model saved by yoloprune "
                             "or Ultralytics")
    missing = missing_packages(cfg.format, cfg.simplify)
    if missing:  # checked here: Ultralytics would try to pip-install them, which fails offline
        raise YoloPruneError(f"{cfg.format} export needs {', '.join(m.split('>')[0] for m in missing)}, which is not "
                             f"installed; run: pip install {' '.join(repr(m) if '>' in m else m for m in missing)}")
    if cfg.format == "onnx" and cfg.check and importlib.util.find_spec("onnxruntime") is None:
        raise YoloPruneError("the ONNX parity check needs onnxruntime; run: pip install onnxruntime, "
                             "or pass check=False")
    from ultralytics import YOLO

    from yoloprune.io import load_model

    reference = load_model(source)  # checks the file is a supported YOLO model before Ultralytics unpickles it
    with torch_threads_kept():
        return _export(YOLO(str(source)), source, reference, cfg, out, t0)


def _export(yolo, source: Path, reference: nn.Module, cfg: ExportConfig, out: str | Path | None, t0: float
            ) -> ExportReport:
    head_state: dict = {}
    yolo.add_callback("on_export_start", lambda exporter: head_state.update(_export_state(exporter)))
    into = out is not None and Path(out).is_dir() and cfg.format != "openvino"  # openvino writes a folder itself
    dest_dir = Path(out) if into else Path(out).parent if out is not None else source.parent
    dest_dir.mkdir(parents=True, exist_ok=True)
    work = scratch_dir(dest_dir, f"{source.stem}.export")  # same filesystem: os.replace
    try:
        yolo.model.pt_path = str(work / source.name)  # the exporter names its output after pt_path
        kwargs = {"format": cfg.format, "imgsz": cfg.imgsz, "batch": cfg.batch, "dynamic": cfg.dynamic,
                  "quantize": 16 if cfg.half else None, "device": "cpu"}
        if cfg.format == "onnx":
            kwargs.update(opset=cfg.opset, simplify=cfg.simplify, nms=cfg.nms)
        elif cfg.nms is not None:
            kwargs["nms"] = cfg.nms
        try:
            written = Path(yolo.export(**kwargs))
        except Exception as e:  # the exporter raises AssertionError/ValueError/RuntimeError for bad combinations
            raise YoloPruneError(f"Ultralytics {cfg.format} export of {source} failed: {type(e).__name__}: {e}") from e
        head = head_state.get("head", {})
        end2end = bool(head.get("end2end", False))
        branch = "one2one" if end2end else ("one2many" if head.get("two_branches") else "single")

        max_abs = max_rel = tol = None
        opset = None
        if cfg.format == "onnx":
            import onnx

            proto = onnx.load(str(written), load_external_data=False)
            opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
            if cfg.check:
                tol = cfg.max_error
                max_abs, max_rel = onnx_parity(reference, written, cfg.imgsz, cfg.batch, head)
                if not max_rel <= tol:  # also catches NaN
                    raise YoloPruneError(
                        f"ONNX parity check failed for {source}: max error {max_rel:.3g} of the output scale "
                        f"(abs {max_abs:.3g}) exceeds the tolerance {tol:g}; the export does not compute what the "
                        "PyTorch model computes; try another opset or simplify=False, and report it"
                    )
        dest = Path(out) if out is not None and not into else dest_dir / written.name
        _replace(written, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()) if dest.is_dir() else dest.stat().st_size
    report = ExportReport(
        path=str(dest),
        format=cfg.format,
        imgsz=cfg.imgsz,
        batch=cfg.batch,
        opset=opset,
        half=cfg.half,
        dynamic=cfg.dynamic,
        branch=branch,
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        tolerance=tol,
        seconds=time.perf_counter() - t0,
        size_mb=size / 2**20,
    )
    LOGGER.info("exported %s (%s branch)%s", dest, branch,
                f", parity {max_rel:.2e} of output scale" if max_rel is not None else "")
    return report


# Head attributes the exporter sets for export (exporter.py, "Update model"); copied onto the reference model.
EXPORT_ATTRS = ("export", "format", "dynamic", "max_det", "agnostic_nms", "xyxy")


def _export_state(exporter) -> dict:
    head = exporter.model.model[-1]
    state = {a: getattr(head, a) for a in EXPORT_ATTRS if hasattr(head, a)}
    # After fuse() only the exported branch is left; record which, and whether there were two.
    state["end2end"] = bool(exporter.metadata.get("end2end", False))
    state["two_branches"] = hasattr(head, "one2one_cv2")
    return {"head": state}


def onnx_parity(
    model: nn.Module, onnx_path: Path, imgsz: int, batch: int, head_state: dict, *, seed: int = 0
) -> tuple[float, float]:
    """Return the (max abs, max relative-to-scale) difference of ONNX Runtime and ``model`` on random images.

    ``model`` is the unfused PyTorch model; ``head_state`` holds the head settings the
    exporter used (see ``_export_state``), applied to ``model`` in place.
    """
    model.eval()
    _set_export_mode(model, head_state)
    end2end = head_state.get("end2end", False)
    head = model.model[-1]
    feats: list = []
    hook = head.register_forward_pre_hook(lambda _m, args: feats.append(args[0]))
    x = seeded_images(batch, imgsz, seed)
    try:
        with torch.inference_mode():
            ref = [t.float().numpy() for t in flat_tensors(model(x))]
            if end2end:  # the one-to-one predictions the top-k rows are picked from: (B, anchors, 4 + nc + extra)
                table = head._inference(head.forward_head(feats[0], **head.one2one)).permute(0, 2, 1).double().numpy()
    finally:
        hook.remove()
    session = ort_session(onnx_path, max(1, torch.get_num_threads()))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    if len(got) != len(ref) or any(g.shape != r.shape for g, r in zip(got, ref, strict=True)):
        raise YoloPruneError(
            f"ONNX parity check failed for {onnx_path}: ONNX outputs {[g.shape for g in got]} do not match "
            f"PyTorch outputs {[r.shape for r in ref]}; report it with the command that exported the model"
        )
    max_abs = max_rel = 0.0
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        if end2end and i == 0:  # top-k rows: near-equal scores may come out in either order
            err = _topk_rows_error(g.astype(np.float64), table, head.nc)
        else:
            err = float(np.abs(g.astype(np.float64) - r).max())
        scale = float(np.abs(r).max())
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / scale if scale > 0 else err)
    return max_abs, max_rel


def _topk_rows_error(got: np.ndarray, table: np.ndarray, nc: int) -> float:
    """Return the max abs error of NMS-free top-k rows against the predictions they were picked from.

    ``got`` holds rows ``[x1, y1, x2, y2, score, class, extra...]`` per image; ``table``
    the one-to-one predictions ``[x1, y1, x2, y2, class scores..., extra...]`` per anchor.
    Scores a rounding error apart may come out in either order, or swap in and out at
    the k-th place, so rows are not compared by position: each row must equal some
    anchor's box, class score and extras, and the rows' scores, sorted, must be the k
    highest scores of the table.
    """
    worst = 0.0
    for rows, t in zip(got, table, strict=True):  # per image
        boxes, scores, extra = t[:, :4], t[:, 4 : 4 + nc], t[:, 4 + nc :]
        for row in rows:
            c = int(row[5])
            if c != row[5] or not 0 <= c < nc:
                return float("inf")
            dist = np.maximum(np.abs(boxes - row[:4]).max(axis=1), np.abs(scores[:, c] - row[4]))
            if extra.shape[1]:
                dist = np.maximum(dist, np.abs(extra - row[6:]).max(axis=1))
            worst = max(worst, float(dist.min()))
        top = np.sort(scores, axis=None)[-len(rows) :]
        worst = max(worst, float(np.abs(np.sort(rows[:, 4]) - top).max()))
    return worst


def _set_export_mode(model: nn.Module, head_state: dict) -> None:
    from ultralytics.nn.modules import Classify, Detect

    head = model.model[-1]
    if isinstance(head, Detect):
        for a in EXPORT_ATTRS:
            if a in head_state:
                setattr(head, a, head_state[a])
        if hasattr(head, "one2one_cv2"):
            head.end2end = head_state.get("end2end", False)
    elif isinstance(head, Classify):
        head.export = True


def _replace(src: Path, dest: Path) -> None:
    """Move ``src`` (file or folder) onto ``dest``, replacing what is there."""
    if dest.is_dir() and not dest.is_symlink():
        old = src.parent / f".old-{dest.name}"  # a folder cannot be replaced in one step: move the old one aside
        os.replace(dest, old)
        os.replace(src, dest)
    else:
        os.replace(src, dest)
