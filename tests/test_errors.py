"""The error corpus of issue 5: each bad input is one line naming the problem and its fix, exit code 2.

One test per numbered case of the issue, run through ``yoloprune.cli.main`` in-process
(or a DVC stage in a subprocess) so what is checked is what a user sees: the exit code,
the key words of the message, a single ``yoloprune: error:`` line and no traceback.
Where another test already checks a variant through the CLI, a comment names it
instead of repeating it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
import types
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
import yaml
from test_data import _broken  # a small dataset broken in a named way
from torch import nn

import yoloprune.io
from yoloprune.cli import main
from yoloprune.data import make_dataset
from yoloprune.io import load_model, save_model
from yoloprune.macs import MacCounter

REPO = Path(__file__).resolve().parents[1]
IMGSZ = 64


def one_line_error(capsys, *words: str) -> str:
    """Return the error line after checking stderr ends in exactly one ``yoloprune: error:`` line holding ``words``."""
    out = capsys.readouterr()
    errors = [line for line in out.err.splitlines() if line.startswith("yoloprune: error:")]
    assert len(errors) == 1 and out.err.rstrip().endswith(errors[0]), out.err[-2000:]
    assert "Traceback" not in out.err + out.out
    for word in words:
        assert word in errors[0]
    return errors[0]


def cli_error(capsys, argv: list[str], *words: str) -> str:
    """Run the CLI; return its error line after checking exit code 2 and the one-line contract."""
    assert main([str(a) for a in argv]) == 2
    return one_line_error(capsys, *words)


def usage_error(capsys, argv: list[str], *words: str) -> str:
    """Run the CLI on arguments argparse itself rejects: exit code 2, usage and one ``error:`` line."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.rstrip().splitlines()[-1].startswith("yoloprune ")
    for word in words:
        assert word in err
    return err


def macs(path: Path) -> int:
    return MacCounter(load_model(path), IMGSZ)()


@pytest.fixture(scope="module")
def base_pt(tmp_path_factory) -> Path:
    """yolov8n (80 classes) from its yaml with seeded weights, saved as a checkpoint."""
    torch.manual_seed(0)
    return save_model(load_model("yolov8n.yaml"), tmp_path_factory.mktemp("base") / "base.pt")


@pytest.fixture(scope="module")
def pruned_pt(base_pt, tmp_path_factory) -> Path:
    """``base_pt`` pruned by the CLI to 1.5x fewer MACs at 64 px (coarse 8-step schedule)."""
    out = tmp_path_factory.mktemp("pruned") / "pruned.pt"
    assert main(["prune", str(base_pt), "--speed-up", "1.5", "--imgsz", str(IMGSZ), "--iterative-steps", "8", "-q",
                 "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A valid 6-class synthetic dataset: 4 train and 2 val images at 64 px."""
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", n_train=4, n_val=2, imgsz=IMGSZ)


def run_stage(stage: str, params: dict, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``stages/<stage>.py`` as DVC does (``python stages/x.py``), in ``cwd`` holding ``params`` as params.yaml."""
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    environ = {k: v for k, v in os.environ.items() if k != "YOLOPRUNE_DEBUG"} | env
    return subprocess.run([sys.executable, str(REPO / "stages" / f"{stage}.py")], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=300, check=False)


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


# 1. A model path that does not exist, or is a directory. (`prune missing.pt`: tests/test_cli.py,
# test_errors_are_one_line_with_exit_code_2.)
@pytest.mark.parametrize(
    ("verb", "what", "words"),
    [
        ("prune", "directory", "is a directory"),
        ("fps", "missing", "no such file"),
        ("finetune", "missing", "no such file"),
        ("export", "missing", "no such file"),
    ],
)
def test_case01_missing_model_or_a_directory(tmp_path, dataset, capsys, verb, what, words):
    model = tmp_path / "model.pt"
    if what == "directory":
        model.mkdir()
    extra = {"fps": ["--imgs", IMGSZ, IMGSZ], "finetune": ["--data", dataset], "export": [], "prune": []}[verb]
    cli_error(capsys, [verb, model, *extra], str(model), words)


# 2. A file that is not a checkpoint: text, random bytes, a truncated .pt.
@pytest.mark.parametrize("kind", ["text", "random-bytes", "truncated"])
def test_case02_not_a_checkpoint(tmp_path, base_pt, capsys, kind):
    bad = tmp_path / "bad.pt"
    if kind == "text":
        bad.write_text("model: yolov8n\n")
    elif kind == "random-bytes":
        bad.write_bytes(os.urandom(4096))
    else:
        data = base_pt.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    cli_error(capsys, ["prune", bad], "not a readable PyTorch checkpoint", "pass a .pt file saved by Ultralytics")


# 3. A checkpoint with no YOLO model in it: a plain state_dict, a pickled module, some other network.
@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("state_dict", "holds a plain state_dict, not an Ultralytics model"),
        ("bare-module", "holds a Sequential, not an Ultralytics model"),
        ("other-network", "holds a Sequential, not an Ultralytics YOLO model"),
    ],
)
def test_case03_checkpoint_without_a_yolo_model(tmp_path, base_pt, capsys, kind, words):
    path = tmp_path / "other.pt"
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    content = {"state_dict": load_model(base_pt).state_dict(), "bare-module": net, "other-network": {"model": net}}
    torch.save(content[kind], path)
    cli_error(capsys, ["prune", path], words)


# 4. An Ultralytics model of a family yoloprune does not prune: the message lists the supported ones.
@pytest.mark.parametrize(("model", "words"), [("rtdetr-l.yaml", "this model family is not supported"),
                                             ("yolov8n-world.yaml", "a WorldDetect head is not supported")])
def test_case04_unsupported_family_lists_the_supported_ones(capsys, model, words):
    line = cli_error(capsys, ["prune", model], words)
    assert re.search(r"yoloprune prunes YOLOv8, .*YOLO26 \(detect, segment, pose", line), line


class SplitBlock(nn.Module):
    """A user's block that splits channels, which no yoloprune converter knows."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv = nn.Conv2d(c, 2 * c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv(x).chunk(2, 1)
        return a + b


def with_block(model: nn.Module, block: nn.Module) -> nn.Module:
    """Return ``model`` with ``block`` run after its layer 1, keeping Ultralytics' layer bookkeeping."""
    layer = nn.Sequential(model.model[1], block)
    for attr in ("f", "i", "type", "np"):
        setattr(layer, attr, getattr(model.model[1], attr))
    model.model[1] = layer
    return model


# 5. A model with a custom module that would break pruning, or that this environment cannot import: named.
@pytest.mark.parametrize("kind", ["splits-channels", "not-importable"])
def test_case05_unknown_custom_module_is_named(tmp_path, base_pt, monkeypatch, capsys, kind):
    model = load_model(base_pt)
    c = model.model[1].conv.out_channels
    path = tmp_path / "custom.pt"
    if kind == "splits-channels":
        save_model(with_block(model, SplitBlock(c)), path)
        cli_error(capsys, ["prune", path, "--imgsz", IMGSZ], "SplitBlock", "split channels",
                  "Register a converter in yoloprune/convert.py")
        return
    fancy = types.ModuleType("fancy_blocks")  # a user's package, present where the model was saved only
    fancy.Fancy = type("Fancy", (nn.Identity,), {"__module__": "fancy_blocks"})
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "fancy_blocks", fancy)
        save_model(with_block(model, fancy.Fancy()), path)
    cli_error(capsys, ["prune", path], "No module named 'fancy_blocks'", "install the package that defines it")


# 6. speed_up <= 1, not a number, unreachable (the best reachable is reported), or overshot by a coarse step.
# (`--speed-up 0.5`: tests/test_cli.py, test_errors_are_one_line_with_exit_code_2.)
def test_case06_bad_or_unreachable_speed_up(pruned_pt, tmp_path, capsys):
    cli_error(capsys, ["prune", pruned_pt, "--speed-up", "1"], "speed_up must be a number > 1", "got 1.0")
    usage_error(capsys, ["prune", pruned_pt, "--speed-up", "fast"], "argument --speed-up", "invalid float value: 'fast'")
    out = tmp_path / "never.pt"
    line = cli_error(capsys, ["prune", pruned_pt, "--speed-up", "50", "--imgsz", IMGSZ, "--iterative-steps", "2",
                              "--max-layer-ratio", "0.2", "-q", "-o", out],
                     "speed_up 50 is not reachable with max_layer_ratio=0.2", "lower the target or raise max_layer_ratio")
    best = float(re.search(r"the best reachable is (\d+\.\d+)x", line).group(1))
    assert 1 < best < 50
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written
    # On this narrow model one group of 8 channels is more than 2% of the MACs and a coarse schedule jumps past
    # 1.3x: the crossing group is pruned only in part, so the target is met, not refused.
    report = tmp_path / "r.json"
    assert main([str(a) for a in ("prune", pruned_pt, "--speed-up", "1.3", "--imgsz", IMGSZ, "--iterative-steps",
                                  "8", "-q", "-o", out, "--report", report)]) == 0
    assert abs(json.loads(report.read_text())["speed_up"] / 1.3 - 1) <= 0.02 and out.is_file()


# 7. Unknown method, iterative_steps <= 0, round_to <= 0. Through the CLI: tests/test_cli.py
# (test_unknown_method_lists_known_ones; test_errors_are_one_line_with_exit_code_2 for --round-to 0 and
# --iterative-steps -3). Here the route the CLI's choices do not guard: params.yaml -> the prune stage.
def test_case07_unknown_method_in_params_stops_the_prune_stage_with_one_line(tmp_path):
    params = repo_params() | {"method": "magic"}
    run = run_stage("prune", params, tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip() == ("yoloprune: error: unknown method 'magic': choose one of lamp, l1, l2, random, "
                                  "taylor, bn_scale")
    assert not (tmp_path / "models").exists()


# 8. imgsz not a positive multiple of the stride: the nearest valid size is named.
# (`prune --imgsz 650`: tests/test_cli.py; training adjusts imgsz with a warning, as Ultralytics does.)
@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["export", "{base}", "--imgsz", "100"], "got 100; use 96"),
        (["fps", "{base}", "--imgs", "100", "100"], "got 100; use 96"),
        (["benchmark", "{base}", "{base}", "--imgsz", "0"], "got 0; use 32"),
        (["prune", "{base}", "--imgsz", "-64"], "got -64; use 32"),
    ],
    ids=["export", "fps", "benchmark", "prune-negative"],
)
def test_case08_imgsz_not_a_multiple_of_the_stride(base_pt, capsys, argv, words):
    argv = [str(base_pt) if a == "{base}" else a for a in argv]
    cli_error(capsys, argv, "imgsz must be a positive multiple of the model stride 32", words)


# 9. A data yaml that is missing, malformed, names missing folders or has only empty label files
# (every variant of yoloprune.data.check_data_yaml: tests/test_data.py; here the CLI's view of the four).
@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("missing", "no such file"),
        ("malformed", "not valid YAML at line"),
        ("no val folder", "val folder"),
        ("empty labels", "every train label file is missing or empty"),
    ],
)
def test_case09_bad_data_yaml(base_pt, tmp_path, capsys, case, words):
    data = _broken(tmp_path, case)
    cli_error(capsys, ["finetune", base_pt, "--data", data, "--imgsz", IMGSZ, "--project", tmp_path / "runs"], words)
    assert not (tmp_path / "runs").exists()  # refused before Ultralytics started a run


class Stop(Exception):
    """Ends a fine-tuning run once its model is built."""


# 9 (continued). A class count that does not match the checkpoint is not an error: fine-tuning a model on data
# with other classes is ordinary transfer learning, and Ultralytics adapts a yaml's nc the same way. The class
# outputs are replaced (untrained), and the user is warned that they are.
def test_case09_class_count_mismatch_replaces_the_class_outputs_with_a_warning(base_pt, dataset, tmp_path, caplog):
    from yoloprune.export import torch_threads_kept
    from yoloprune.finetune import finetune

    heads = []

    def stop(trainer):
        heads.append(trainer.model.model[-1])
        raise Stop

    with torch_threads_kept(), caplog.at_level(logging.WARNING, logger="yoloprune"), pytest.raises(Stop):
        finetune(base_pt, dataset, epochs=1, imgsz=IMGSZ, batch=2, out_dir=tmp_path / "ft",
                 callbacks={"on_pretrain_routine_end": [stop]})
    assert "the model has 80 classes but the data has 6: its class outputs are replaced" in caplog.text
    head = heads[0]
    assert head.nc == 6 and [seq[-1].out_channels for seq in head.cv3] == [6, 6, 6]
    assert head.cv2[0][0].conv.weight.shape == load_model(base_pt).model[-1].cv2[0][0].conv.weight.shape


# 10. params.yaml with an unknown key or a wrong type: every variant of load_params in tests/test_params.py
# (test_bad_params_are_named: `speedup`, `prune.roundto`, `epochs: "5"`, ...). Here the DVC stage's view:
# the typo stops the stage with one line and exit code 2, and YOLOPRUNE_DEBUG=1 shows the traceback.
def test_case10_params_typo_stops_a_stage_with_one_line(tmp_path):
    params = repo_params()
    params["speedup"] = params.pop("speed_up")
    run = run_stage("dataset", params, tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip() == "yoloprune: error: params.yaml: unknown key 'speedup' (did you mean 'speed_up'?)"
    assert not (tmp_path / "data").exists()
    debug = run_stage("dataset", params, tmp_path, YOLOPRUNE_DEBUG="1")
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "YoloPruneError" in debug.stderr


# 11. Export where the format's optional package is missing; fps on a device that does not exist.
# (`fps --device 0` is also in tests/test_cli.py, test_fps_errors, without the one-line check.)
@pytest.mark.parametrize("kind", ["openvino", "onnx", "fps-device-0"])
def test_case11_missing_package_or_device(base_pt, tmp_path, monkeypatch, capsys, kind):
    if kind == "openvino":
        if find_spec("openvino") is not None:
            pytest.skip("openvino is installed here")
        cli_error(capsys, ["export", base_pt, "--format", "openvino", "--imgsz", IMGSZ],
                  "openvino export needs openvino, which is not installed", "run: pip install 'openvino>=2024.0.0'")
    elif kind == "onnx":
        monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx fails, find_spec("onnx") is None: as uninstalled
        cli_error(capsys, ["export", base_pt, "--imgsz", IMGSZ, "-o", tmp_path / "m.onnx"],
                  "onnx export needs onnx, which is not installed", "run: pip install 'onnx>=1.12.0,<2.0.0'")
        assert list(tmp_path.iterdir()) == []
    else:
        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA device")
        cli_error(capsys, ["fps", base_pt, "--device", "0", "--imgs", IMGSZ, IMGSZ],
                  "device '0' does not exist", "sees no CUDA GPU", "use device='cpu'")


def full_disk(tmp: Path, data: bytes | memoryview) -> None:
    """Stand-in for yoloprune.io's file write on a full disk: half the bytes land, then ENOSPC."""
    with open(tmp, "wb") as f:
        f.write(bytes(data[: len(data) // 2]))
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))


# 12. An output that cannot be written: its folder is a file (unwritable even for root), a full disk. The previous
# file stays as it was and no temporary file is left. (load_model/save_model level: tests/test_io.py.)
@pytest.mark.parametrize("kind", ["folder-is-a-file", "disk-full-checkpoint", "disk-full-json"])
def test_case12_unwritable_output_keeps_the_previous_file(base_pt, tmp_path, monkeypatch, capsys, kind):
    folder = tmp_path / "out"
    folder.mkdir()
    previous = folder / ("report.json" if kind == "disk-full-json" else "model.pt")
    previous.write_bytes(b"the previous version\n")
    if kind == "folder-is-a-file":  # an output folder that is a regular file: unwritable for root too (CI)
        blocker = folder / "not-a-folder"
        blocker.write_bytes(b"")
        cli_error(capsys, ["convert", "yolov8n.yaml", "-o", blocker / "model.pt"], "cannot write (File exists)",
                  "choose a writable output path")
        blocker.unlink()
    elif kind == "disk-full-checkpoint":
        monkeypatch.setattr(yoloprune.io, "_write", full_disk)
        cli_error(capsys, ["convert", "yolov8n.yaml", "-o", previous], "cannot write (No space left on device)",
                  "free some disk space")
    else:
        monkeypatch.setattr(yoloprune.io, "_write", full_disk)
        cli_error(capsys, ["fps", base_pt, "--imgs", IMGSZ, IMGSZ, "--batch", "1", "--testtime", "1", "--warmup", "0",
                           "--report", previous], "cannot write (No space left on device)")
    assert previous.read_bytes() == b"the previous version\n"
    assert [p.name for p in folder.iterdir()] == [previous.name]  # no temporary file left


# 13. Pruning an already pruned model again works, and compounds: 1.5x of 1.5x is 2.25x of the base.
# (The library route, at 320 px with the default schedule: tests/test_prune.py, test_pruned_model_prunes_again.)
def test_case13_pruned_model_prunes_again(base_pt, pruned_pt, tmp_path, capsys):
    out, rep = tmp_path / "again.pt", tmp_path / "again.json"
    assert main(["prune", str(pruned_pt), "--speed-up", "1.5", "--imgsz", str(IMGSZ), "--iterative-steps", "8", "-q",
                 "-o", str(out), "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    assert report["speed_up"] == pytest.approx(1.5, rel=0.02) and report["source"] == str(pruned_pt)
    assert macs(pruned_pt) / macs(out) == pytest.approx(report["speed_up"], rel=1e-6)
    assert macs(base_pt) / macs(out) == pytest.approx(2.25, rel=0.04)
    model = load_model(out).eval()
    with torch.no_grad():
        y = model(torch.rand(1, 3, IMGSZ, IMGSZ))
    assert (y[0] if isinstance(y, (list, tuple)) else y).shape[1] == 4 + 80
    assert "Traceback" not in capsys.readouterr().err
