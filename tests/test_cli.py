"""The CLI verbs, their seed-tool aliases, reports and one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from thop import profile

from yoloprune.cli import main
from yoloprune.io import load_model

REPORT_KEYS = {"base_macs", "pruned_macs", "speed_up", "base_params", "pruned_params", "method", "steps", "seconds"}


def test_prune_yaml_writes_checkpoint_and_report(tmp_path):
    out, rep = tmp_path / "p.pt", tmp_path / "r.json"
    assert main(["prune", "yolov8n.yaml", "--speed-up", "2", "--imgsz", "320", "-o", str(out),
                 "--report", str(rep), "-q"]) == 0
    report = json.loads(rep.read_text())
    assert REPORT_KEYS <= report.keys()
    assert report["speed_up"] == pytest.approx(2.0, rel=0.02)
    assert report["compensated"] == 0  # no --data, no images to fit on
    # an independent MACs count of the written file agrees with the report
    x = torch.zeros(1, 3, 320, 320)
    base, _ = profile(load_model("yolov8n.yaml").eval(), inputs=(x,), verbose=False)
    pruned, _ = profile(load_model(out).eval(), inputs=(x,), verbose=False)
    assert base / pruned == pytest.approx(report["speed_up"], rel=0.02)


def test_seed_tool_flag_names(tmp_path):
    out = tmp_path / "p.pt"
    assert main(["prune", "--model_path", "yolov8n.yaml", "--speed_up", "1.5", "--prune_method", "l1",
                 "--iterative_steps", "20", "--global_pruning", "--imgsz", "320", "-o", str(out), "-q"]) == 0
    assert torch.load(out, weights_only=False)["yoloprune"]["method"] == "l1"


def test_convert_verb(tmp_path, capsys):
    out = tmp_path / "c.pt"
    assert main(["convert", "yolo11n.yaml", "-o", str(out)]) == 0
    assert "converted 10 blocks" in capsys.readouterr().out
    assert type(load_model(out).model[2]).__name__ == "C3k2V2"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["prune", "missing.pt"], "missing.pt: no such file"),
        (["prune", "yolov8n.yaml", "--speed-up", "0.5"], "speed_up must be a number > 1"),
        (["prune", "yolov8n.yaml", "--round-to", "0"], "round_to must be a positive integer"),
        (["prune", "yolov8n.yaml", "--iterative-steps", "-3"], "iterative_steps must be an integer >= 2"),
        (["prune", "yolov8n.yaml", "--iterative-steps", "1"], "one step prunes nothing"),
        (["prune", "yolov8n.yaml", "--imgsz", "650"], "use 640"),
        (["prune", "yolov8n.yaml", "--compensate"], "compensate needs real training images"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and err.startswith("yoloprune: error:") and "\n" not in err and "Traceback" not in err


def test_unknown_method_lists_known_ones(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", "yolov8n.yaml", "--method", "magic"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'magic'" in err and "lamp" in err and "taylor" in err


def test_debug_shows_the_traceback():
    from yoloprune.errors import YoloPruneError

    with pytest.raises(YoloPruneError):
        main(["--debug", "prune", "missing.pt"])


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "yoloprune", "prune", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--speed-up" in out.stdout and "--method" in out.stdout


# --- finetune / export / fps / benchmark verbs, and prune --data (the seed tool's prune-then-fine-tune) ---
IMGSZ = 64


@pytest.fixture(scope="module")
def six_class(tmp_path_factory):
    """A base yolov8n with 6 classes (the synthetic dataset's), saved; and a tiny dataset for it."""
    from ultralytics.nn.tasks import DetectionModel

    from yoloprune.data import make_dataset
    from yoloprune.io import save_model

    root = tmp_path_factory.mktemp("cli")
    base = save_model(DetectionModel("yolov8n.yaml", nc=6, verbose=False), root / "base.pt")
    data = make_dataset(root / "ds", n_train=8, n_val=4, imgsz=IMGSZ)
    return base, data


@pytest.fixture(scope="module")
def pruned_pair(six_class, tmp_path_factory):
    base, _ = six_class
    out = tmp_path_factory.mktemp("pair") / "pruned.pt"
    assert main(["prune", str(base), "--speed-up", "2", "--imgsz", "160", "--iterative-steps", "10", "-q",
                 "-o", str(out)]) == 0
    return base, out


def test_prune_with_data_fine_tunes_the_pruned_network(six_class, tmp_path, capsys):
    base, data = six_class
    out, rep = tmp_path / "tuned.pt", tmp_path / "r.json"
    assert main(["prune", str(base), "--speed-up", "1.5", "--imgsz", str(IMGSZ), "--iterative-steps", "8", "-q",
                 "--data", str(data), "--epochs", "1", "--batch", "4", "--project", str(tmp_path / "runs"),
                 "-o", str(out), "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    assert report["finetune"]["epochs"] == 1 and report["finetune"]["map50_95"] is not None
    assert report["compensated"] > 0  # --data gives compensation its images: on by default
    pruned_only = load_model(tmp_path / "runs" / "tuned" / "pruned.pt")
    tuned = load_model(out)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(tuned) == shapes(pruned_only) != shapes(load_model(base))  # trained, still pruned
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), pruned_only.state_dict().values()))
    assert "fine-tuned 1 epochs" in capsys.readouterr().out


def test_finetune_verb_and_resume_refusal(pruned_pair, six_class, tmp_path, capsys):
    _, pruned = pruned_pair
    _, data = six_class
    out = tmp_path / "ft.pt"
    args = ["finetune", str(pruned), "--data", str(data), "--epochs", "1", "--imgsz", str(IMGSZ), "--batch", "4",
            "--project", str(tmp_path / "runs"), "-o", str(out)]
    assert main(args) == 0
    record = torch.load(out, weights_only=False)
    assert record["yoloprune"]["epochs"] == 1 and next(record["model"].parameters()).dtype == torch.float32
    assert main([*args, "--resume"]) == 2  # that run finished: nothing to resume
    assert "already finished" in capsys.readouterr().err


def test_export_verb_writes_onnx_with_parity(pruned_pair, tmp_path, capsys):
    _, pruned = pruned_pair
    out, rep = tmp_path / "m.onnx", tmp_path / "e.json"
    assert main(["export", str(pruned), "--imgsz", str(IMGSZ), "-o", str(out), "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    assert out.is_file() and report["path"] == str(out) and report["format"] == "onnx"
    assert report["max_rel_error"] <= report["tolerance"] == 1e-4
    assert "parity" in capsys.readouterr().out


def test_fps_verb_seed_flags_and_report(pruned_pair, tmp_path, capsys):
    _, pruned = pruned_pair
    rep = tmp_path / "fps.json"
    assert main(["fps", str(pruned), "--batch", "2", "--imgs", str(IMGSZ), str(IMGSZ), "--testtime", "3",
                 "--warmup", "1", "--threads", "1", "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    assert (report["batch"], report["imgsz"], report["iters"], report["warmup"], report["threads"]) == (2, IMGSZ, 3, 1, 1)
    assert report["runtime"] == "torch" and report["fps"] == pytest.approx(2000 / report["latency_median_ms"])
    assert "FPS" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--imgs", "640", "480"], "use --imgs 640 640"),
        (["--device", "0"], "does not exist"),
        (["--half"], "needs a CUDA device"),
    ],
)
def test_fps_errors(pruned_pair, argv, words, capsys):
    if "--device" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _, pruned = pruned_pair
    assert main(["fps", str(pruned), "--testtime", "1", "--warmup", "0", "--batch", "1", *argv]) == 2
    assert words in capsys.readouterr().err


def test_benchmark_verb_compares_base_and_pruned(pruned_pair, six_class, tmp_path, capsys):
    base, pruned = pruned_pair
    _, data = six_class
    rep = tmp_path / "b.json"
    assert main(["benchmark", str(base), str(pruned), "--imgsz", "160", "--iters", "3", "--warmup", "1",
                 "--threads", "1", "--runtime", "onnx", "torch", "--data", str(data), "--report", str(rep)]) == 0
    result = json.loads(rep.read_text())
    assert set(result["compare"]) == {"onnx", "torch"}
    for runtime, cmp in result["compare"].items():
        assert cmp["runtime"] == runtime and cmp["macs_speed_up"] == pytest.approx(2.0, rel=0.02)
        assert cmp["latency_speed_up"] > 0 and "map50_95" in cmp["metrics"]
    assert result["base"]["torch"]["map50_95"] == result["base"]["onnx"]["map50_95"]  # measured once
    out = capsys.readouterr().out
    assert re.search(r"^\| GMACs +\|", out, re.MULTILINE) and "x faster" in out  # the markdown table, columns padded
