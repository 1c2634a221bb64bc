"""The CLI verbs, their seed-tool aliases, reports and one-line errors."""

from __future__ import annotations

import json
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
        (["prune", "yolov8n.yaml", "--iterative-steps", "-3"], "iterative_steps must be a positive integer"),
        (["prune", "yolov8n.yaml", "--imgsz", "650"], "use 640"),
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
