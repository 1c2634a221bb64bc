"""Export: ONNX files match the PyTorch model, run without yoloprune, and appear only when complete."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import live_model

from yoloprune.errors import YoloPruneError
from yoloprune.export import ExportConfig, _topk_rows_error, export_model
from yoloprune.io import load_model, save_model
from yoloprune.prune import PruneConfig, prune_model

IMGSZ = 128
PARITY_MODELS = ("yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml", "yolov8n-seg.yaml")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Return ``get(name, pruned)``: the path of a saved base or 2x-pruned (imgsz 128) model, built once per module."""
    root = tmp_path_factory.mktemp("ckpt")
    cache: dict[tuple[str, bool], Path] = {}

    def get(name: str, pruned: bool) -> Path:
        if (name, pruned) not in cache:
            model = live_model(name)
            if pruned:
                prune_model(model, PruneConfig(speed_up=2.0, imgsz=IMGSZ, iterative_steps=10), progress=False)
            folder = root / f"{Path(name).stem}-{'pruned' if pruned else 'base'}"
            cache[name, pruned] = save_model(model, folder / "model.pt")
        return cache[name, pruned]

    return get


def ort_outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


@pytest.mark.parametrize("pruned", [False, True], ids=["base", "pruned"])
@pytest.mark.parametrize("name", PARITY_MODELS)
def test_onnx_export_matches_pytorch_within_tolerance(checkpoints, name, pruned):
    pt = checkpoints(name, pruned)
    report = export_model(pt, ExportConfig(imgsz=IMGSZ))
    assert report.path == str(pt.with_suffix(".onnx")) and Path(report.path).is_file()
    assert report.max_rel_error is not None and report.max_rel_error <= report.tolerance == 1e-4
    assert 0 <= report.max_abs_error < 0.05  # boxes are in pixels (up to 128)
    assert report.branch == ("one2many" if "26" in name else "single")  # Ultralytics 8.4 default: nms=None
    assert (report.imgsz, report.batch, report.format) == (IMGSZ, 1, "onnx")
    proto = onnx.load(report.path)
    assert report.opset == next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 11
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["imgsz"] == f"[{IMGSZ}, {IMGSZ}]" and meta["task"] == ("segment" if "seg" in name else "detect")
    assert [o.name for o in proto.graph.output] == (["output0", "output1"] if "seg" in name else ["output0"])
    assert json.dumps(report.to_dict())  # JSON-ready


def test_pruned_onnx_is_smaller_than_base(checkpoints):
    base = export_model(checkpoints("yolov8n.yaml", False), ExportConfig(imgsz=IMGSZ))
    pruned = export_model(checkpoints("yolov8n.yaml", True), ExportConfig(imgsz=IMGSZ))
    assert pruned.size_mb < 0.8 * base.size_mb


@pytest.mark.parametrize("pruned", [False, True], ids=["base", "pruned"])
def test_yolo26_nms_free_branch_exports_with_parity(checkpoints, tmp_path, pruned):
    report = export_model(checkpoints("yolo26n.yaml", pruned), ExportConfig(imgsz=IMGSZ, nms=False),
                          out=tmp_path / "e2e.onnx")
    assert report.branch == "one2one"
    assert report.max_rel_error <= 1e-4
    proto = onnx.load(report.path)
    assert {p.key: p.value for p in proto.metadata_props}["end2end"] == "True"
    (out,) = ort_outputs(tmp_path / "e2e.onnx", np.zeros((1, 3, IMGSZ, IMGSZ), np.float32))
    assert out.shape == (1, 300, 6)  # top-300 [x1, y1, x2, y2, score, class], no NMS needed


def test_nms_free_rows_are_checked_against_the_predictions_not_by_position():
    # one image, 3 anchors, 2 classes: [x1, y1, x2, y2, score0, score1]
    table = np.array([[[0, 0, 10, 10, 0.9, 0.1], [5, 5, 20, 20, 0.5, 0.5000001], [1, 1, 2, 2, 0.2, 0.3]]])
    rows = np.array([[[0, 0, 10, 10, 0.9, 0], [5, 5, 20, 20, 0.5000001, 1], [5, 5, 20, 20, 0.5, 0]]])
    assert _topk_rows_error(rows, table, nc=2) == 0
    assert _topk_rows_error(rows[:, [0, 2, 1]], table, nc=2) == 0  # a rounding error apart: either order is right
    off = rows.copy()
    off[0, 2, 2] += 5  # a box 5 px off is an error whatever the order
    assert _topk_rows_error(off, table, nc=2) == 5
    skipped = rows.copy()
    skipped[0, 2] = [1, 1, 2, 2, 0.3, 1]  # a real prediction, but not among the top 3
    assert math.isclose(_topk_rows_error(skipped, table, nc=2), 0.2)


def test_onnx_runs_in_a_process_that_cannot_import_yoloprune(checkpoints, tmp_path):
    report = export_model(checkpoints("yolo11n.yaml", True), ExportConfig(imgsz=IMGSZ), out=tmp_path / "m.onnx")
    x = np.random.default_rng(0).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    expected = ort_outputs(Path(report.path), x)[0]
    # -I -S: no cwd, no PYTHONPATH, no site (so no editable-install hook); only onnxruntime's folder is added.
    site = str(Path(ort.__file__).resolve().parents[1])
    script = (
        "import sys, json\n"
        f"sys.path.append({site!r})\n"
        "try:\n    import yoloprune\n    found = True\nexcept ImportError:\n    found = False\n"
        "import numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession('m.onnx', providers=['CPUExecutionProvider'])\n"
        "y = s.run(None, {'images': np.load('x.npy')})[0]\n"
        "np.save('y.npy', y)\n"
        "print(json.dumps({'yoloprune_importable': found, 'shape': list(y.shape)}))\n"
    )
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script], check=False, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"yoloprune_importable": False, "shape": list(expected.shape)}
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=0, atol=1e-5)


def test_failed_parity_leaves_the_previous_file_and_no_temporaries(checkpoints, tmp_path):
    dest = tmp_path / "model.onnx"
    dest.write_text("previous")
    with pytest.raises(YoloPruneError, match=r"parity check failed.*exceeds the tolerance 1e-12"):
        export_model(checkpoints("yolov8n.yaml", False), ExportConfig(imgsz=IMGSZ, tolerance=1e-12), out=dest)
    assert dest.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_half_export_is_fp16_and_within_its_tolerance(checkpoints, tmp_path):
    report = export_model(checkpoints("yolov8n.yaml", True), ExportConfig(imgsz=IMGSZ, half=True),
                          out=tmp_path / "half.onnx")
    assert report.half and report.tolerance == 2e-2 and report.max_rel_error <= 2e-2
    proto = onnx.load(report.path)
    dtypes = {i.data_type for i in proto.graph.initializer if len(i.dims) == 4}  # conv weights
    assert dtypes == {onnx.TensorProto.FLOAT16}
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # FP32 in, as Ultralytics keeps


def test_dynamic_export_runs_at_other_sizes(checkpoints, tmp_path):
    report = export_model(checkpoints("yolov8n.yaml", True), ExportConfig(imgsz=IMGSZ, dynamic=True),
                          out=tmp_path / "dyn.onnx")
    assert report.max_rel_error <= 1e-4
    model = load_model(checkpoints("yolov8n.yaml", True)).eval()
    model.model[-1].export = True
    x = torch.rand(2, 3, 160, 96, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = model(x).numpy()
    (got,) = ort_outputs(tmp_path / "dyn.onnx", x.numpy())
    assert got.shape == ref.shape == (2, 84, 315)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_torchscript_passes_through_to_ultralytics(checkpoints, tmp_path):
    report = export_model(checkpoints("yolov8n.yaml", True), ExportConfig(format="torchscript", imgsz=IMGSZ),
                          out=tmp_path / "m.torchscript")
    assert report.format == "torchscript" and report.max_rel_error is None and report.opset is None
    scripted = torch.jit.load(report.path)
    model = load_model(checkpoints("yolov8n.yaml", True)).eval()
    model.model[-1].export = True
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ref, got = model(x), scripted(x)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.skipif(find_spec("openvino") is not None, reason="openvino is installed")
def test_missing_openvino_names_the_package_and_pip_line_without_installing(checkpoints, tmp_path):
    pt = checkpoints("yolov8n.yaml", False)
    before = sorted(pt.parent.iterdir())
    with pytest.raises(YoloPruneError, match=r"openvino export needs openvino.*pip install 'openvino>=2024\.0\.0'"):
        export_model(pt, ExportConfig(format="openvino", imgsz=IMGSZ))
    assert sorted(pt.parent.iterdir()) == before  # nothing written
    assert find_spec("openvino") is None  # and nothing installed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "tflite2"}, "format 'tflite2' is not supported; use one of onnx, torchscript, openvino"),
        ({"imgsz": 100}, "multiple of the model stride 32.*use 96"),
        ({"opset": 7}, "opset must be an integer >= 11"),
        ({"nms": True}, "cannot compare outputs after in-graph NMS"),
        ({"tolerance": 0}, "tolerance must be a positive number"),
        ({"batch": 0}, "batch must be a positive integer"),
    ],
)
def test_invalid_settings_fail_at_the_edge(kwargs, message):
    with pytest.raises(YoloPruneError, match=message):
        ExportConfig(**kwargs)


def test_export_of_a_missing_or_non_checkpoint_file_is_refused(tmp_path):
    with pytest.raises(YoloPruneError, match=r"not a \.pt checkpoint file"):
        export_model(tmp_path / "missing.pt")
    with pytest.raises(YoloPruneError, match=r"not a \.pt checkpoint file"):
        export_model("yolov8n.yaml")


def test_a_checkpoint_that_is_not_a_yolo_model_is_refused_before_ultralytics_loads_it(tmp_path):
    torch.save({"model": {"weight": torch.zeros(1)}}, tmp_path / "weights.pt")
    with pytest.raises(YoloPruneError, match="not an Ultralytics model"):
        export_model(tmp_path / "weights.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pt"]


def test_out_folder_receives_the_file_under_its_ultralytics_name(checkpoints, tmp_path):
    report = export_model(checkpoints("yolov8n.yaml", False), ExportConfig(imgsz=IMGSZ, check=False), out=tmp_path)
    assert report.path == str(tmp_path / "model.onnx") and report.max_rel_error is None and report.tolerance is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_export_leaves_the_torch_thread_count_as_it_was(checkpoints, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)  # Ultralytics' select_device("cpu") would reset it to cpu_count - 1
    try:
        export_model(checkpoints("yolov8n.yaml", False), ExportConfig(imgsz=IMGSZ, check=False), out=tmp_path)
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)
