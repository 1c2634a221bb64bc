"""The trainer seam (yoloprune/train.py): what it changes in Ultralytics' training of a trained model."""

import pytest
from ultralytics.cfg import get_cfg

from yoloprune.io import load_model
from yoloprune.train import settle_e2e_loss


def _with_hyp(name: str, epochs: int = 10):
    model = load_model(name, nc=2)
    model.args = get_cfg(overrides={"epochs": epochs})  # what the trainer's set_model_attributes gives the loss
    return model


def test_e2e_loss_starts_a_finetune_at_its_final_branch_weights():
    model = _with_hyp("yolo26n.yaml")
    fresh = model.init_criterion()
    assert (fresh.o2m, fresh.o2o) == pytest.approx((0.8, 0.2))  # what a rebuilt criterion would restart from
    settle_e2e_loss(model)
    assert (model.criterion.o2m, model.criterion.o2o) == pytest.approx((0.1, 0.9))
    model.criterion.update()  # the trainer's end-of-epoch call keeps them there
    assert (model.criterion.o2m, model.criterion.o2o) == pytest.approx((0.1, 0.9))


def test_settling_leaves_a_single_branch_loss_alone():
    model = _with_hyp("yolov8n.yaml")
    settle_e2e_loss(model)
    assert not hasattr(model.criterion, "o2m")
    assert type(model.criterion).__name__ == "v8DetectionLoss"
