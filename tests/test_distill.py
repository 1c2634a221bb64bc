"""Distillation from the unpruned model: zero on itself, adapters only where widths differ and never saved, every task."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import onnx
import pytest
import torch
from conftest import live_model
from onnx import numpy_helper
from torch import nn

import yoloprune  # noqa: F401  (offline switches before ultralytics is imported)
from yoloprune.config import DistillConfig, FinetuneConfig
from yoloprune.data import make_dataset
from yoloprune.distill import Distiller, binary_kl, head_widths, softmax_kl
from yoloprune.errors import YoloPruneError
from yoloprune.export import ExportConfig, export_model
from yoloprune.finetune import can_resume, finetune
from yoloprune.io import load_model, save_model
from yoloprune.prune import deployed_branch

IMGSZ = 64
BUILDER = Path(__file__).resolve().parents[1] / "tools" / "fixtures" / "build_checkpoints.py"


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(seed))


def term(student: nn.Module, teacher: nn.Module, method: str, task: str = "detect") -> float:
    """Return the distillation term of one eval-mode pass of both models on the same images."""
    student.eval()
    d = Distiller(student, teacher, DistillConfig(method=method, temperature=2.0), task)
    d.watch(student)
    x = images()
    with torch.no_grad():
        return float(d.term(student(x), x))


def perturbed(model: nn.Module) -> nn.Module:
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return other


@pytest.mark.parametrize(("name", "method"), [("yolov8n.yaml", "output"), ("yolov8n.yaml", "cwd"),
                                             ("yolo26n.yaml", "both")])
def test_term_is_zero_on_the_same_network_and_positive_otherwise(name, method):
    model = live_model(name)
    assert term(model, copy.deepcopy(model), method) == 0.0  # exactly: KL of a distribution with itself
    assert term(perturbed(model), model, method) > 1e-4


def test_output_term_reads_the_branch_inference_uses():
    model = live_model("yolo26n.yaml")
    model.model[-1].end2end = True  # as trained YOLO26 checkpoints are: inference runs the one-to-one branch
    assert deployed_branch(model)[0] == "one2one"
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # change only the branch inference skips
        for p in teacher.model[-1].cv3.parameters():
            p.add_(1.0)
    assert term(model, teacher, "output") == 0.0
    assert term(model, teacher, "cwd") == 0.0  # the head's inputs are the same too


def test_classification_distils_logits():
    model = live_model("yolov8n-cls.yaml")
    assert term(model, copy.deepcopy(model), "both", task="classify") == 0.0
    assert term(perturbed(model), model, "output", task="classify") > 1e-4


def test_kl_terms_scale_with_temperature_squared_and_vanish_on_equal_inputs():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.equal(binary_kl(t, t, 3.0), torch.zeros_like(t))
    assert torch.all(binary_kl(s, t, 1.0) >= 0)
    # At a high temperature the softened KL is ~ (s - t)^2 / (8 T^2) per sigmoid (its second-order term): times T^2
    # it tends to a constant, so the T^2 factor keeps the gradient's scale as the temperature changes.
    high = float(binary_kl(s, t, 100.0).sum())
    assert high == pytest.approx(float(((s - t) ** 2 / 8).sum()), rel=0.02)
    assert float(softmax_kl(t, t, 2.0, 1).abs().max()) == 0.0


def test_adapters_exist_only_where_widths_differ():
    small, wide = live_model("yolov8n.yaml"), live_model("yolov8s.yaml")
    assert Distiller(small, copy.deepcopy(small), DistillConfig(method="cwd"), "detect").adapters is None
    d = Distiller(small, wide, DistillConfig(method="cwd"), "detect")
    widths = [(s[0], t[0]) for s, t in zip(head_widths(small), head_widths(wide), strict=True)]
    assert widths == [(64, 128), (128, 256), (256, 512)]
    assert [(a.in_channels, a.out_channels) for a in d.adapters] == widths
    assert Distiller(small, wide, DistillConfig(method="output"), "detect").adapters is None  # no features compared
    assert term(small, wide, "cwd") > 0  # through the adapters


def test_config_errors():
    with pytest.raises(YoloPruneError, match="did you mean 'cwd'"):
        DistillConfig(method="cdw")
    with pytest.raises(YoloPruneError, match="temperature must be a finite number > 0"):
        DistillConfig(temperature=0.0)
    with pytest.raises(YoloPruneError, match="unknown key 'finetune.distill.wieght'"):
        FinetuneConfig.from_section({"distill": {"wieght": 2}})
    assert FinetuneConfig.from_section({"distill": {"method": "both", "weight": 2}}).distill.terms == ("output", "cwd")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", n_train=8, n_val=4, imgsz=IMGSZ)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """Return a yolov8n student and a wider yolov8s teacher (6 classes): head inputs of different widths."""
    root = tmp_path_factory.mktemp("ckpt")
    return (save_model(load_model("yolov8n.yaml", nc=6), root / "student.pt"),
            save_model(load_model("yolov8s.yaml", nc=6), root / "teacher.pt"))


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, checkpoints, dataset):
    student, teacher = checkpoints
    return finetune(student, dataset, epochs=1, imgsz=IMGSZ, batch=4, threads=1, teacher=teacher,
                    distill={"method": "both", "weight": 1.0, "temperature": 2.0},
                    out_dir=tmp_path_factory.mktemp("runs") / "ft")


def test_distilled_run_records_its_loss_and_the_teachers_seconds(distilled):
    assert distilled.distill.method == "both" and distilled.epochs == 1
    row = distilled.rows[0]
    assert float(row["train/distill_loss"]) > 0
    assert len(distilled.teacher_seconds) == 1 and distilled.teacher_seconds[0] > 0
    assert 0 <= distilled.map50_95 <= 1


def test_adapters_never_reach_the_checkpoint_or_the_onnx_file(distilled, checkpoints, tmp_path):
    student, _ = checkpoints
    before, after = load_model(student).state_dict(), load_model(distilled.best).state_dict()
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    ckpt = torch.load(distilled.best, map_location="cpu", weights_only=False)
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and (m.in_channels, m.out_channels) in
                   {(64, 128), (128, 256), (256, 512)} for m in ckpt["model"].modules())
    assert ckpt["model"].criterion is None
    tuned = export_model(distilled.best, ExportConfig(imgsz=IMGSZ), out=tmp_path / "tuned.onnx")
    in_onnx = sum(numpy_helper.to_array(t).size for t in onnx.load(str(tuned.path)).graph.initializer)
    fused = sum(p.numel() for p in load_model(distilled.best).fuse(verbose=False).parameters())
    adapters = 64 * 128 + 128 * 256 + 256 * 512  # what the three 1x1 adapters would add
    assert abs(in_onnx - fused) < adapters / 10  # the fused student's tensors (and a few anchor constants) alone


def test_distillation_needs_a_fitting_teacher(tmp_path, checkpoints, dataset):
    student, teacher = checkpoints
    with pytest.raises(YoloPruneError, match="needs a teacher"):
        finetune(student, dataset, epochs=1, distill={"method": "cwd"})
    with pytest.raises(YoloPruneError, match="no such .pt checkpoint"):
        finetune(student, dataset, epochs=1, teacher=tmp_path / "missing.pt", distill={"method": "cwd"})
    with pytest.raises(YoloPruneError, match="distill_model"):
        finetune(student, dataset, epochs=1, distill_model=str(teacher))
    cls = save_model(load_model("yolov8n-cls.yaml", nc=6), tmp_path / "cls.pt")
    with pytest.raises(YoloPruneError, match="a classify model cannot teach a detect model"):
        finetune(student, dataset, epochs=1, teacher=cls, distill={"method": "cwd"})
    assert not can_resume(tmp_path / "none", student, dataset, teacher=teacher, distill={"method": "cwd"})


# --- every task (integration tier) ---------------------------------------------------------------------------------

def _fixtures():
    spec = importlib.util.spec_from_file_location("build_checkpoints", BUILDER)
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


TASKS = {"detect": "yolov8n.yaml", "segment": "yolov8n-seg.yaml", "pose": "yolov8n-pose.yaml",
         "obb": "yolo11n-obb.yaml", "classify": "yolo26n-cls.yaml"}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_distillation_trains_every_task(tmp_path, task):
    from ultralytics.nn.tasks import PoseModel

    fixtures = _fixtures()
    data = fixtures.write_dataset(tmp_path / "data", task, ("a", "b"))
    if task == "pose":
        teacher = PoseModel(TASKS[task], nc=2, data_kpt_shape=fixtures.KPT_SHAPE, verbose=False)
    else:
        teacher = load_model(TASKS[task], nc=2)
    student = perturbed(teacher)
    teacher_pt = save_model(teacher, tmp_path / "teacher.pt")
    student_pt = save_model(student, tmp_path / "student.pt")
    result = finetune(student_pt, data, epochs=1, imgsz=IMGSZ, batch=4, threads=1, teacher=teacher_pt,
                      distill={"method": "both", "temperature": 2.0}, out_dir=tmp_path / "ft")
    assert float(result.rows[0]["train/distill_loss"]) > 0
    assert result.teacher_seconds[0] > 0
    assert load_model(result.best).state_dict().keys() == student.state_dict().keys()


class Interrupted(Exception):
    """Stands in for a killed run."""


@pytest.mark.slow
def test_distilled_run_resumes_exactly_adapters_included(tmp_path, checkpoints, dataset):
    student, teacher = checkpoints
    distill = {"method": "both", "temperature": 2.0}
    settings = {"epochs": 2, "imgsz": IMGSZ, "batch": 4, "nbs": 4}

    def stop_after_first_epoch(trainer):
        if trainer.epoch == 0:
            raise Interrupted

    with pytest.raises(Interrupted):
        finetune(student, dataset, threads=1, teacher=teacher, distill=distill, out_dir=tmp_path / "run",
                 callbacks={"on_model_save": [stop_after_first_epoch]}, **settings)
    state = torch.load(tmp_path / "run" / "weights" / "resume_fp32.pt", map_location="cpu", weights_only=False)
    assert [v.shape[:2] for k, v in state["adapters"].items() if k.endswith("weight")] == [(128, 64), (256, 128),
                                                                                          (512, 256)]
    assert can_resume(tmp_path / "run", student, dataset, teacher=teacher, distill=distill, **settings)
    assert not can_resume(tmp_path / "run", student, dataset, **settings)  # without distillation: another run
    assert not can_resume(tmp_path / "run", student, dataset, teacher=teacher, distill={**distill, "weight": 2.0},
                          **settings)
    result = finetune(student, dataset, threads=1, teacher=teacher, distill=distill, out_dir=tmp_path / "run",
                      resume=True, **settings)
    whole = finetune(student, dataset, threads=1, teacher=teacher, distill=distill, out_dir=tmp_path / "whole",
                     **settings)
    got, want = load_model(result.best).state_dict(), load_model(whole.best).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)

    def rows(r):
        return [{k: v for k, v in row.items() if k not in {"time", "teacher_s"}} for row in r.rows]
    assert rows(result) == rows(whole) and result.metrics == whole.metrics


def test_cli_passes_the_distillation_flags(checkpoints, dataset, capsys):
    from yoloprune.cli import main

    student, _ = checkpoints
    assert main(["finetune", str(student), "--data", str(dataset), "--distill", "cwd"]) != 0
    assert "distill method cwd needs a teacher" in capsys.readouterr().err
    assert main(["finetune", str(student), "--data", str(dataset), "--teacher", str(student), "--distill", "cwd",
                 "--distill-temperature", "0"]) != 0
    assert "distill temperature must be a finite number > 0" in capsys.readouterr().err
