"""Fine-tuning keeps the pruned architecture, saves fp32, resumes, and survives Ultralytics' DDP relaunch."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import yoloprune  # noqa: F401  (offline switches before ultralytics is imported)
from yoloprune.data import make_dataset
from yoloprune.errors import YoloPruneError
from yoloprune.finetune import can_resume, finetune
from yoloprune.io import load_model, save_model
from yoloprune.macs import MacCounter
from yoloprune.prune import PruneConfig, prune_model
from yoloprune.resume import BEST_FP32, RESUME_STATE, EpochShuffle, epoch_seed
from yoloprune.threads import cpu_threads
from yoloprune.train import PrunedDetectionTrainer, _is_integration, match_dataset

IMGSZ = 64
ENV = {**os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "2"}  # a fresh process that never imported yoloprune


def shapes(model: nn.Module) -> dict[str, list[int]]:
    """Return {state_dict key: shape} of every weight and BN buffer (pruning changes these, training must not)."""
    return {k: list(v.shape) for k, v in model.state_dict().items() if v.dim() > 0}


def macs(model: nn.Module) -> int:
    return MacCounter(model, IMGSZ)()


def unpruned() -> nn.Module:
    """Return yolov8n with the dataset's 6 classes at its yaml widths: what a rebuild from yaml gives."""
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel("yolov8n.yaml", nc=6, verbose=False)


def load_ckpt_model(path: Path) -> nn.Module:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt["model"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", n_train=8, n_val=4, imgsz=IMGSZ)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    """yolov8n with the dataset's 6 classes, pruned to 1.5x fewer MACs at 64 px (a coarse 8-step schedule) and saved."""
    model = unpruned()
    prune_model(model, PruneConfig(speed_up=1.5, imgsz=IMGSZ, iterative_steps=8), progress=False)
    return save_model(model, tmp_path_factory.mktemp("pruned") / "pruned.pt")


THREADS_SEEN: list[int] = []  # torch's thread count at each training batch of the `trained` run (threads=1)
STEPS: list[int] = []  # the `trained` run's optimiser steps, read from its AdamW state at the end
REGULARIZED: list[tuple[type, int, int]] = []  # per regularizer call: model type, params with and without a gradient


def regularizer(model: nn.Module) -> None:
    """Record what the trainer hands a sparsity regularizer: the model, between backward and the step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    with_grad = sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trainable)
    REGULARIZED.append((type(model), with_grad, len(trainable)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, pruned, dataset):
    record = {"on_train_batch_end": [lambda trainer: THREADS_SEEN.append(torch.get_num_threads())],
              "on_train_end": [lambda trainer: STEPS.append(max(int(s["step"]) for s in
                                                                trainer.optimizer.state.values()))]}
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's count, which the run must give back
    try:
        result = finetune(pruned, dataset, epochs=1, imgsz=IMGSZ, batch=4, threads=1, callbacks=record,
                          regularizer=regularizer, out_dir=tmp_path_factory.mktemp("runs") / "ft")
        THREADS_SEEN.append(torch.get_num_threads())
    finally:
        torch.set_num_threads(before)
    return result


def test_training_runs_on_the_threads_asked_for_and_restores_the_count(trained):
    *during, after = THREADS_SEEN
    assert during and set(during) == {1}  # every batch of the run trained on one thread
    assert after == 2  # the caller's count came back
    assert cpu_threads(None) == len(os.sched_getaffinity(0)) and cpu_threads(3) == 3  # None: every core


def test_regularizer_sees_the_unwrapped_model_between_backward_and_step(trained):
    from ultralytics.nn.tasks import DetectionModel

    assert len(REGULARIZED) == STEPS[0] >= 1  # once per optimiser step
    for kind, with_grad, trainable in REGULARIZED:
        assert kind is DetectionModel  # unwrapped: the model itself, not a DDP wrapper
        assert with_grad >= 0.9 * trainable  # after backward: (nearly) every trainable weight has a gradient


def test_training_keeps_the_pruned_architecture(trained, pruned):
    before, after = load_model(pruned), load_ckpt_model(trained.best)
    assert shapes(after) == shapes(before)
    assert macs(after) == macs(before)
    assert macs(unpruned()) / macs(after) == pytest.approx(1.5, rel=0.03)  # the yaml's full widths did not come back


def test_training_changes_weights_and_saves_fp32(trained, pruned):
    before, after = load_model(pruned).state_dict(), load_ckpt_model(trained.best).state_dict()
    changed = [k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, after[k].to(v.dtype))]
    weights = [k for k, v in before.items() if k.endswith(".weight") and "dfl" not in k]
    assert len(set(changed) & set(weights)) >= 0.9 * len(weights)  # the optimiser touched nearly every layer
    assert {v.dtype for v in after.values() if v.is_floating_point()} == {torch.float32}
    # Not fp16 rounded: some trained weights carry more mantissa bits than fp16 keeps.
    w = torch.cat([v.flatten() for k, v in after.items() if k in changed and v.is_floating_point()])
    assert not torch.equal(w, w.half().float())
    assert not (trained.best.parent / BEST_FP32).exists()
    assert trained.epochs == 1 and set(trained.metrics) >= {"metrics/mAP50(B)", "metrics/mAP50-95(B)"}
    assert 0 <= trained.map50_95 <= trained.map50 <= 1
    assert trained.results_csv.is_file() and len(trained.curve) == 1 and 0 <= trained.curve[0] <= 1  # one epoch


def test_best_reloads_with_yolo_in_a_fresh_process(trained, pruned):
    code = (
        "import json, sys\n"
        "from ultralytics import YOLO\n"
        "m = YOLO(sys.argv[1]).model\n"
        "print(json.dumps({'shapes': {k: list(v.shape) for k, v in m.state_dict().items() if v.dim()},"
        " 'dtypes': sorted({str(p.dtype) for p in m.parameters()}), 'nc': m.nc}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(trained.best)], env=ENV, capture_output=True, text=True,
                         timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["shapes"] == shapes(load_model(pruned))
    assert got["dtypes"] == ["torch.float32"] and got["nc"] == 6


class Interrupted(Exception):
    """Stands in for a killed run."""


def test_resume_continues_an_interrupted_run(tmp_path, pruned, dataset):
    out = tmp_path / "run"

    def stop_after_first_epoch(trainer):
        if trainer.epoch == 0:
            raise Interrupted

    with pytest.raises(Interrupted):  # nbs=batch: one optimiser step per batch, which an exact resume needs
        finetune(pruned, dataset, epochs=2, imgsz=IMGSZ, batch=4, nbs=4, out_dir=out,
                 callbacks={"on_model_save": [stop_after_first_epoch]})
    last = torch.load(out / "weights" / "last.pt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 0 and last["optimizer"] is not None
    assert (out / "weights" / BEST_FP32).exists()  # the fp32 best survives the interruption
    # a re-run (a DVC stage run again) may pick it up only with the same model bytes, data and settings
    same = {"epochs": 2, "imgsz": IMGSZ, "batch": 4, "nbs": 4}
    assert can_resume(out, pruned, dataset, **same)
    assert not can_resume(out, pruned, dataset, **{**same, "epochs": 3})
    model = load_model(pruned)
    assert can_resume(out, save_model(model, tmp_path / "again.pt"), dataset, **same)  # same weights, new file
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert not can_resume(out, save_model(model, tmp_path / "other.pt"), dataset, **same)

    starts = []
    result = finetune(pruned, dataset, epochs=2, imgsz=IMGSZ, batch=4, out_dir=out, resume=True,
                      callbacks={"on_train_start": [lambda t: starts.append(t.start_epoch)]})
    assert starts == [1]  # resumed at the second epoch, not from scratch
    with open(out / "results.csv", newline="") as f:
        assert [int(float(r["epoch"])) for r in csv.DictReader(f)] == [1, 2]
    assert result.epochs == 2 and not can_resume(out, pruned, dataset, **same)  # finished: nothing to resume
    model = load_ckpt_model(result.best)
    assert shapes(model) == shapes(load_model(pruned))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not (out / "weights" / RESUME_STATE).exists()  # a finished run keeps no resume state
    with pytest.raises(YoloPruneError, match="already finished"):
        finetune(pruned, dataset, epochs=2, imgsz=IMGSZ, batch=4, nbs=4, out_dir=out, resume=True)

    # Exact: the interrupted and resumed run ends where a run never interrupted ends, weights and metrics alike.
    whole = finetune(pruned, dataset, epochs=2, imgsz=IMGSZ, batch=4, nbs=4, out_dir=tmp_path / "whole")
    got, want = load_ckpt_model(result.best).state_dict(), load_ckpt_model(whole.best).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert epoch_rows(out) == epoch_rows(tmp_path / "whole") and result.metrics == whole.metrics


def epoch_rows(run: Path) -> list[dict[str, str]]:
    """Return results.csv's rows without the wall-clock column."""
    with open(run / "results.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(f)]


def test_resume_without_fp32_state_falls_back_to_ultralytics(tmp_path, pruned, dataset, caplog):
    out = tmp_path / "run"

    def stop(trainer):
        raise Interrupted

    with pytest.raises(Interrupted):
        finetune(pruned, dataset, epochs=2, imgsz=IMGSZ, batch=4, out_dir=out, callbacks={"on_model_save": [stop]})
    weights = out / "weights"
    assert (weights / RESUME_STATE).exists() and not list(weights.glob(".*.tmp"))  # atomic: no temporary left
    (weights / RESUME_STATE).write_bytes(b"truncated")  # unreadable: Ultralytics' fp16 resume, with a warning
    with caplog.at_level("WARNING", logger="yoloprune"):
        result = finetune(pruned, dataset, epochs=2, imgsz=IMGSZ, batch=4, out_dir=out, resume=True)
    assert "no fp32 state of epoch 0" in caplog.text and result.epochs == 2
    (weights / "last.pt").write_bytes(b"\x80\x02truncated")
    with pytest.raises(YoloPruneError, match="unreadable checkpoint"):
        finetune(pruned, dataset, epochs=2, imgsz=IMGSZ, batch=4, out_dir=out, resume=True)
    assert not can_resume(out, pruned, dataset, epochs=2, imgsz=IMGSZ, batch=4)


def test_epoch_shuffle_depends_on_seed_and_epoch_only():
    a, b = EpochShuffle(50, seed=0), EpochShuffle(50, seed=0)
    first = list(a)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    a.set_epoch(1)
    second = list(a)
    assert sorted(second) == list(range(50)) and second != first
    b.set_epoch(1)
    assert list(b) == second  # another sampler (a resumed process) at the same epoch: the same order
    assert list(EpochShuffle(50, seed=1)) != first
    assert epoch_seed(0, 3) == epoch_seed(0, 3) != epoch_seed(0, 4)


def test_ddp_script_rebuilds_the_pruned_model(tmp_path, pruned, dataset):
    pytest.importorskip("cloudpickle", reason="Ultralytics' DDP launcher pickles its trainer with cloudpickle")
    from ultralytics.utils.dist import ddp_cleanup, generate_ddp_file
    from ultralytics.utils.patches import torch_load

    trainer = PrunedDetectionTrainer(overrides={
        "model": str(pruned), "data": str(dataset), "epochs": 1, "imgsz": IMGSZ, "batch": 4, "device": "cpu",
        "project": str(tmp_path), "name": "ddp", "exist_ok": True, "plots": False, "workers": 0,
    })
    assert not any(_is_integration(f) for fns in trainer.callbacks.values() for f in fns)
    file = generate_ddp_file(trainer)
    try:
        script = Path(file).read_text()
        state = torch_load(Path(file).with_suffix(".pt"), map_location="cpu")
        assert state["trainer"] is PrunedDetectionTrainer  # pickled by reference: yoloprune.train, importable
        assert state["model"] == str(pruned)  # a path, loaded afresh in the worker; not an in-memory module
        launch = 'trainer = state["trainer"](cfg=cfg, overrides=state["args"], _callbacks=state["callbacks"])'
        assert launch in script and "trainer.train()" in script
        # Run the worker script as a DDP worker would, but build the model instead of training.
        probe = (
            "trainer.setup_model()\n"
            "    import json\n"
            "    print('SHAPES', json.dumps({k: list(v.shape) for k, v in trainer.model.state_dict().items()"
            " if v.dim()}))"
        )
        worker = tmp_path / "worker.py"
        worker.write_text(script.replace("trainer.train()", probe))
        out = subprocess.run([sys.executable, str(worker)], env=ENV, capture_output=True, text=True, timeout=120,
                             check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("SHAPES "))
        rebuilt = json.loads(line[len("SHAPES "):])
    finally:
        ddp_cleanup(trainer, file)
    assert rebuilt == shapes(load_model(pruned))
    assert rebuilt != shapes(unpruned())


def test_match_dataset_resizes_only_the_class_outputs():
    model = load_model("yolov8n.yaml")  # 80 classes
    before = shapes(model)
    match_dataset(model, {"nc": 6})
    after = shapes(model)
    head = model.model[-1]
    resized = {k for k in before if before[k] != after[k]}
    assert resized == {f"model.22.cv3.{i}.2.{p}" for i in range(3) for p in ("weight", "bias")}
    assert all(after[f"model.22.cv3.{i}.2.weight"][0] == 6 for i in range(3))
    assert head.nc == 6 and head.no == 6 + 16 * 4
    model.eval()
    with torch.no_grad():
        y = model(torch.rand(1, 3, IMGSZ, IMGSZ))
    assert (y[0] if isinstance(y, (list, tuple)) else y).shape[1] == 4 + 6


def test_finetune_input_errors(tmp_path, pruned, dataset):
    with pytest.raises(YoloPruneError, match="not a model yaml"):
        finetune("yolov8n.yaml", dataset, epochs=1)
    with pytest.raises(YoloPruneError, match="pretrained"):
        finetune(pruned, dataset, epochs=1, pretrained=False)
    with pytest.raises(YoloPruneError, match="lr00"):
        finetune(pruned, dataset, epochs=1, lr00=0.1)
    with pytest.raises(YoloPruneError, match="epochs"):
        finetune(pruned, dataset, epochs=0)
    with pytest.raises(YoloPruneError, match="threads must be an integer >= 1"):
        finetune(pruned, dataset, epochs=1, threads=0)
    with pytest.raises(YoloPruneError, match="no such file"):
        finetune(pruned, tmp_path / "missing.yaml", epochs=1)
    with pytest.raises(YoloPruneError, match="no checkpoint to resume"):
        finetune(pruned, dataset, epochs=1, out_dir=tmp_path / "fresh", resume=True)
    with pytest.raises(YoloPruneError, match="unknown callback event"):
        finetune(pruned, dataset, epochs=1, callbacks={"on_epoch_end": [print]})
