"""A run killed while it writes an output leaves the previous output intact and no half-written file.

A child process overwrites a checkpoint (``save_model``) or a metrics JSON
(``write_json``) as an entry point does (a DVC stage, with ``exit_on_error``: SIGTERM
raises ``SystemExit(143)``, so cleanup runs) and is killed halfway through the bytes.
Its file write is replaced, in the child only, by one that writes half the data,
signals readiness through a file and waits, so the kill always lands mid-write.
(Fine-tune resume after an interruption: tests/test_finetune.py,
test_resume_continues_an_interrupted_run.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from yoloprune.data import make_dataset
from yoloprune.io import save_model, scratch_dir, write_json

CHILD = textwrap.dedent("""
    import sys
    import time
    from pathlib import Path

    from torch import nn

    import yoloprune.io
    from yoloprune.errors import exit_on_error

    kind, target, ready = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

    def slow_write(tmp, data):
        with open(tmp, "wb") as f:
            f.write(bytes(data[: len(data) // 2]))
            f.flush()
            ready.touch()
            time.sleep(300)  # killed here

    yoloprune.io._write = slow_write
    exit_on_error()
    if kind == "checkpoint":
        yoloprune.io.save_model(nn.Sequential(nn.Conv2d(3, 16, 3)), target, {"version": 2})
    else:
        yoloprune.io.write_json({"version": 2}, target)
""")


def write_previous(kind: str, path: Path) -> bytes:
    """Write version 1 of the output; return its bytes."""
    if kind == "checkpoint":
        save_model(nn.Sequential(nn.Conv2d(3, 8, 3)), path, {"version": 1})
    else:
        write_json({"version": 1}, path)
    return path.read_bytes()


def kill_mid_write(kind: str, path: Path, sig: signal.Signals, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """Start the child writing version 2 over ``path``, send ``sig`` once half of it is on disk; return it and stderr."""
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", CHILD, kind, str(path), str(ready)], stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"the child never started writing: {child.communicate()[1][-2000:]}")
        time.sleep(0.05)
    child.send_signal(sig)
    _, err = child.communicate(timeout=60)
    return child, err


@pytest.mark.parametrize("kind", ["checkpoint", "json"])
def test_sigterm_mid_write_keeps_the_previous_file_and_cleans_up(tmp_path, kind):
    path = tmp_path / "out" / ("model.pt" if kind == "checkpoint" else "metrics.json")
    before = write_previous(kind, path)
    child, err = kill_mid_write(kind, path, signal.SIGTERM, tmp_path)
    assert child.returncode == 128 + signal.SIGTERM  # SIGTERM became SystemExit(143): cleanup ran on the way out
    assert "Traceback" not in err
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the half-written temporary file is gone


@pytest.mark.parametrize("kind", ["checkpoint", "json"])
def test_sigkill_mid_write_keeps_the_previous_file_and_the_next_write_removes_the_junk(tmp_path, kind):
    path = tmp_path / "out" / ("model.pt" if kind == "checkpoint" else "metrics.json")
    before = write_previous(kind, path)
    child, _ = kill_mid_write(kind, path, signal.SIGKILL, tmp_path)
    assert child.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    if kind == "checkpoint":
        assert torch.load(path, weights_only=False)["yoloprune"] == {"version": 1}
    # Nothing runs on SIGKILL: the half-written file stays, hidden and named after the output and the dead writer.
    junk = [p.name for p in path.parent.iterdir() if p != path]
    assert len(junk) == 1 and re.fullmatch(rf"\.{re.escape(path.name)}\.{child.pid}\.\w+\.tmp", junk[0])
    write_previous(kind, path)  # the next write of that output (a re-run) deletes it
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    path = tmp_path / "metrics.json"
    live = tmp_path / f".{path.name}.{os.getpid()}.abcd1234.tmp"  # this process is alive: maybe still writing
    live.write_text("{")
    write_json({"version": 1}, path)
    assert live.exists() and path.read_text().strip().startswith("{")


def test_scratch_folders_of_killed_runs_are_removed_by_the_next_run(tmp_path):
    """SIGKILL skips every cleanup: the dataset's and the exporter's scratch folders go at the next run instead."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its PID names folders no running process owns
    stale = tmp_path / f".ds.partial.{dead.pid}.abc.tmp"
    (stale / "images").mkdir(parents=True)
    mine = tmp_path / f".ds.partial.{os.getpid()}.abc.tmp"  # a live writer's folder stays
    mine.mkdir()
    other = tmp_path / f".other.partial.{dead.pid}.abc.tmp"  # another output's: not this one's to judge
    other.mkdir()
    data = make_dataset(tmp_path / "ds", n_train=2, n_val=1, imgsz=64)
    assert data.is_file()
    assert not stale.exists() and mine.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ds", mine.name, other.name])  # no scratch left


def test_scratch_dir_is_empty_hidden_and_named_by_pid(tmp_path):
    work = scratch_dir(tmp_path / "new", "model.export")
    assert work.is_dir() and not any(work.iterdir()) and work.parent == tmp_path / "new"
    assert work.name.startswith(f".model.export.{os.getpid()}.") and work.name.endswith(".tmp")
