"""Loading refuses what is not a YOLO checkpoint; saved pruned models load in stock Ultralytics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import live_model
from torch import nn

from yoloprune.errors import YoloPruneError
from yoloprune.io import load_model, save_model, write_json
from yoloprune.prune import PruneConfig, prune_model


@pytest.fixture(scope="module")
def pruned_pt(tmp_path_factory):
    model = live_model("yolo11n.yaml")
    torch.manual_seed(123)
    expected = torch.rand(3)  # what the caller's global RNG gives next, unless prune_model reseeded it
    torch.manual_seed(123)
    report = prune_model(model, PruneConfig(speed_up=2.0, imgsz=320, iterative_steps=10), progress=False)
    rng_kept = torch.equal(torch.rand(3), expected)
    path = tmp_path_factory.mktemp("pruned") / "pruned.pt"
    save_model(model, path, report.to_dict())
    return path, model, rng_kept


def test_saved_checkpoint_is_fp32_and_carries_the_record(pruned_pt):
    path, model, _ = pruned_pt
    ckpt = torch.load(path, weights_only=False)
    assert all(p.dtype == torch.float32 for p in ckpt["model"].parameters())
    assert ckpt["yoloprune"]["speed_up"] == pytest.approx(2.0, rel=0.02)
    assert {"base_macs", "pruned_macs", "method", "versions"} <= ckpt["yoloprune"].keys()
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left nothing behind


def test_stock_ultralytics_loads_predicts_in_fresh_process(pruned_pt):
    path, model, _ = pruned_pt
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    code = textwrap.dedent(f"""
        import sys, numpy as np
        from torch import nn
        from ultralytics import YOLO
        assert "yoloprune" not in sys.modules
        yolo = YOLO({str(path)!r})
        widths = [m.out_channels for m in yolo.model.modules() if isinstance(m, nn.Conv2d)]
        assert widths == {widths!r}, "pruned shapes lost"
        res = yolo.predict(np.zeros((96, 96, 3), dtype=np.uint8), imgsz=96, verbose=False)
        assert res[0].boxes is not None
        print("OK", type(yolo.model.model[2]).__module__)
    """)
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OK yoloprune.modules" in out.stdout


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: p, "no such file"),
        (lambda p: (p.mkdir(), p)[1], "is a directory"),
        (lambda p: (p.write_text("hello"), p)[1], "not a readable PyTorch checkpoint"),
        (lambda p: (p.write_bytes(os.urandom(4096)), p)[1], "not a readable PyTorch checkpoint"),
        (lambda p: (torch.save({"conv.weight": torch.zeros(3)}, p), p)[1], "plain state_dict"),
        (lambda p: (torch.save({"model": nn.Linear(2, 2)}, p), p)[1], "not an Ultralytics YOLO model"),
    ],
    ids=["missing", "directory", "text", "random-bytes", "state-dict", "other-network"],
)
def test_bad_model_files_give_one_line_errors(tmp_path, make, words):
    with pytest.raises(YoloPruneError, match=words) as e:
        load_model(make(tmp_path / "model.pt"))
    assert "\n" not in str(e.value)


def test_truncated_checkpoint(tmp_path, pruned_pt):
    data = pruned_pt[0].read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(YoloPruneError, match="not a readable PyTorch checkpoint"):
        load_model(bad)


def test_urls_are_refused():
    with pytest.raises(YoloPruneError, match="URLs are not loaded"):
        load_model("https://example.com/yolov8n.pt")


def test_unknown_yaml_and_unsupported_family():
    with pytest.raises(YoloPruneError, match="not a known Ultralytics model yaml"):
        load_model("yolo99z.yaml")
    with pytest.raises(YoloPruneError, match="not supported; yoloprune prunes YOLOv8, .*YOLO26"):
        load_model("rtdetr-l.yaml")


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"  # a folder that is a regular file: no user, root included, can write under it
    blocker.write_text("")
    with pytest.raises(YoloPruneError, match=r"a-file/x.pt: cannot write \(.+\); choose a writable output path"):
        save_model(nn.Sequential(nn.Conv2d(3, 8, 3)), blocker / "x.pt")
    assert blocker.read_text() == ""


def test_library_calls_leave_the_process_as_it_was(tmp_path, pruned_pt):
    """save_model saves a frozen fp32 copy, atomic writes leave the signal handlers alone, prune_model the RNG."""
    assert pruned_pt[2]  # prune_model seeds torch with cfg.seed inside, and gives the caller's RNG state back
    model = nn.Sequential(nn.Conv2d(3, 8, 3)).double()
    handler = signal.getsignal(signal.SIGTERM)
    save_model(model, tmp_path / "m.pt")
    assert all(p.dtype == torch.float64 and p.requires_grad for p in model.parameters())  # the caller's, untouched
    saved = torch.load(tmp_path / "m.pt", weights_only=False)["model"]
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in saved.parameters())
    assert signal.getsignal(signal.SIGTERM) is handler


def test_failed_write_keeps_previous_file(tmp_path):
    path = write_json({"v": 1}, tmp_path / "m.json")

    class Boom(dict):
        def items(self):
            raise RuntimeError("disk full")

    with pytest.raises(Exception):
        write_json(Boom(v=2), path)
    assert path.read_text().strip().startswith("{") and '"v": 1' in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
