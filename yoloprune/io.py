"""Load and save Ultralytics models: one checked entry point in, atomic files out.

Loading a ``.pt`` file unpickles it, which runs code from the file: only load
checkpoints you trust. ``load_model`` is the single place yoloprune does so; it
refuses URLs and anything that is not a regular file before unpickling.
"""

from __future__ import annotations

import copy
import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yoloprune.errors import YoloPruneError

SUPPORTED = "YOLOv8, YOLOv10, YOLO11, YOLO12 and YOLO26 (detect, segment, pose, obb, classify)"
SUPPORTED_HEADS = {"Detect", "v10Detect", "Segment", "Segment26", "Pose", "Pose26", "OBB", "OBB26", "Classify"}


def _check_supported(model: nn.Module, source: str) -> nn.Module:
    layers = getattr(model, "model", None)
    head = type(layers[-1]).__name__ if isinstance(layers, nn.Sequential) and len(layers) else type(model).__name__
    if head not in SUPPORTED_HEADS:
        raise YoloPruneError(f"{source}: a {type(model).__name__} with a {head} head is not supported; "
                             f"yoloprune prunes {SUPPORTED}")
    return model


def load_model(source: str | Path, nc: int | None = None) -> nn.Module:
    """Return the Ultralytics model in a ``.pt`` checkpoint, or built from a model yaml (random weights, seeded).

    ``nc`` builds a yaml model for that many classes (as training from a yaml on a
    dataset does); it is ignored for checkpoints, whose class count is trained in.
    """
    text = str(source)
    if "://" in text:
        raise YoloPruneError(f"{text}: URLs are not loaded (a checkpoint runs code when unpickled); download it, "
                             "check it, and pass the local file")
    path = Path(text)
    if path.suffix in {".yaml", ".yml"} and not path.exists():
        return _from_yaml(text, nc)
    if not path.exists():
        raise YoloPruneError(f"{text}: no such file; pass a YOLO .pt checkpoint or a model yaml such as yolo11n.yaml")
    if not path.is_file():
        raise YoloPruneError(f"{text}: is a directory, not a file; pass a YOLO .pt checkpoint")
    if path.suffix in {".yaml", ".yml"}:
        return _from_yaml(text, nc)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as e:  # pickle names a class this environment does not have
        raise YoloPruneError(f"{text}: its model uses a module that cannot be imported here ({e}); "
                             "install the package that defines it (or put it on PYTHONPATH), or re-save the model "
                             "with standard Ultralytics modules") from e
    except Exception as e:  # pickle, zip and EOF errors all mean the same to the user
        raise YoloPruneError(f"{text}: not a readable PyTorch checkpoint ({type(e).__name__}); "
                             "pass a .pt file saved by Ultralytics or yoloprune") from e
    model = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, nn.Module):
        kind = "a plain state_dict" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise YoloPruneError(f"{text}: holds {kind}, not an Ultralytics model; save the whole model "
                             "(YOLO(...).save or a trainer's best.pt)")
    if not hasattr(model, "yaml") or not isinstance(getattr(model, "model", None), nn.Sequential):
        raise YoloPruneError(f"{text}: holds a {type(model).__name__}, not an Ultralytics YOLO model; "
                             f"yoloprune prunes {SUPPORTED}")
    model = _check_supported(model, text).float()
    if isinstance(ckpt.get("train_args"), dict):
        model.args = ckpt["train_args"]  # as Ultralytics' own loader does
    return model


def _check_yaml_syntax(path: Path) -> None:
    """Raise a one-line ``YoloPruneError`` naming the line and column if the yaml file at ``path`` does not parse."""
    import yaml

    try:
        yaml.safe_load(path.read_text(encoding="utf-8", errors="replace"))
    except yaml.YAMLError as e:
        parts = []
        for text, mark in ((getattr(e, "context", None), getattr(e, "context_mark", None)),
                           (getattr(e, "problem", None) or str(e), getattr(e, "problem_mark", None))):
            if text:
                at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                parts.append(" ".join(text.split()) + at)
        raise YoloPruneError(f"{path}: not valid YAML: {': '.join(parts)}; fix it there (an unclosed bracket or quote, "
                             "a tab indent), or start from an Ultralytics model yaml such as yolo11n.yaml") from None


def _from_yaml(name: str, nc: int | None = None) -> nn.Module:
    from ultralytics import YOLO

    if Path(name).is_file():  # Ultralytics' own message is five lines and a link; ours names the spot in one
        _check_yaml_syntax(Path(name))
    try:
        with torch.random.fork_rng():  # seeded: the same yaml gives the same random weights, run after run
            torch.manual_seed(0)
            yolo = YOLO(name, verbose=False)
            model = yolo.model
            if nc is not None and nc != model.yaml.get("nc"):  # rebuilt, so the head's widths follow nc as in training
                torch.manual_seed(0)
                model = yolo.task_map[yolo.task]["model"](model.yaml, nc=nc, verbose=False)
    except NotImplementedError as e:  # a yaml of another family (RT-DETR, ...) that YOLO() cannot build
        raise YoloPruneError(f"{name}: this model family is not supported; yoloprune prunes {SUPPORTED}") from e
    except (FileNotFoundError, KeyError, ValueError, TypeError) as e:
        detail = " ".join(str(e).split())  # one line, whatever the wrapped library wrote
        raise YoloPruneError(f"{name}: not a known Ultralytics model yaml ({detail}); try yolov8n.yaml, yolo11n.yaml "
                             "or yolo26n.yaml") from e
    return _check_supported(model, name)


TEMP_SUFFIX = ".tmp"  # temporary files are ".<name>.<pid>.<random>.tmp" beside the file they become


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it into place, else delete it.

    A reader (or a killed run) never sees a half-written file: the previous one stays
    until the new one is complete. Ctrl-C, and SIGTERM under an entry point (which makes it
    raise ``SystemExit(143)``: ``yoloprune.errors.run_main``), delete the temporary file on
    the way out. SIGKILL or a power cut leave it behind; the next write of ``path`` deletes
    it once the process that wrote it is gone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def scratch_dir(parent: str | Path, name: str) -> Path:
    """Create and return an empty hidden folder ``parent/.NAME.PID.RANDOM.tmp`` for work that is renamed into place.

    The caller deletes it (or renames it away) when done. Folders of the same ``name``
    left by a killed process (SIGKILL: no cleanup ran) are deleted first, as
    ``atomic_path`` does for files.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(parent / name)
    return Path(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=parent))


def _remove_stale_temps(path: Path) -> None:
    """Delete the temporary files and folders of ``path`` whose writer was killed (SIGKILL) and no longer runs."""
    if os.name != "posix":  # os.kill(pid, 0) probes a process only on POSIX
        return
    prefix = f".{path.name}."
    for tmp in path.parent.glob(glob.escape(prefix) + "*" + TEMP_SUFFIX):
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and int(pid) > 0 and not _running(int(pid)):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _write(tmp: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``tmp`` and flush it to disk, so the rename that follows never exposes an empty file."""
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: str | Path, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` through ``atomic_path``; return the path, or raise a one-line error."""
    try:
        with atomic_path(path) as tmp:
            _write(tmp, data)
    except OSError as e:
        full = e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        fix = "free some disk space or write elsewhere" if full else "choose a writable output path (-o)"
        raise YoloPruneError(f"{path}: cannot write ({e.strerror or e}); {fix}") from e
    return Path(path)


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write ``data`` as indented JSON, atomically; return the path."""
    return write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", path)


def write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    return _write_atomic(path, text.encode())


def save_model(model: nn.Module, path: str | Path, record: dict[str, Any] | None = None) -> Path:
    """Save ``model`` as an ordinary Ultralytics checkpoint in fp32, atomically; return the path.

    ``YOLO(path)`` loads it in a process that never imported yoloprune (pickle imports
    ``yoloprune.modules`` by itself). ``record`` is stored under the ``yoloprune`` key.
    The file holds a frozen fp32 copy, as Ultralytics saves; the caller's model is left as it was.
    """
    import ultralytics

    model = copy.deepcopy(model).float()
    for p in model.parameters():
        p.requires_grad_(False)
    args = getattr(model, "args", {})
    ckpt = {
        "date": datetime.now(timezone.utc).isoformat(),
        "version": ultralytics.__version__,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "epoch": -1,
        "best_fitness": None,
        "model": model,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": dict(args) if isinstance(args, dict) else vars(args),
        "train_metrics": None,
        "train_results": None,
        "yoloprune": record or {},
    }
    buffer = BytesIO()  # serialised first, so a full disk is an OSError of one write, not a torch zip error
    torch.save(ckpt, buffer)
    return _write_atomic(path, buffer.getbuffer())
