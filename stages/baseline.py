"""Stage baseline: train a YOLO from its model yaml, or take the user's checkpoint as it is (fp32)."""

from yoloprune.errors import exit_on_error

exit_on_error()  # first: an entry point (Ultralytics offline before anything imports it, one-line errors)

import tempfile
from pathlib import Path

import torch

from yoloprune.config import BaselineConfig
from yoloprune.curves import results_text, tail_gain
from yoloprune.data import check_data_yaml
from yoloprune.finetune import can_resume, finetune
from yoloprune.io import load_model, save_model, write_json, write_text
from yoloprune.params import data_yaml, load_params

OUT, RUN, CURVES = Path("models/baseline.pt"), Path("runs/baseline"), Path("metrics/baseline_curves.csv")

params = load_params()
model, data = params["model"], data_yaml(params)
if model.endswith(".pt"):
    save_model(load_model(model), OUT, {"source": model})
    write_json({"baseline_epochs": 0, "map50_95_tail_gain": None}, "metrics/baseline.json")  # a trained one's columns
    write_text(results_text([]), CURVES)  # no training, no curve: a header only (the stage declares the file)
else:
    b = BaselineConfig.from_params(params)
    settings = b.settings(params["imgsz"], model)  # the generation's recipe (optimizer, lr0), then baseline.args
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)  # the same initial weights on every run, so an interrupted run is resumed, not redone
        nc = check_data_yaml(data)["nc"]  # built for the data's classes, as Ultralytics trains from a yaml
        init = save_model(load_model(model, nc=nc), Path(tmp) / "init.pt", {"source": model})
        result = finetune(init, data, workers=b.workers, threads=b.threads, out_dir=RUN, from_scratch=True,
                          resume=can_resume(RUN, init, data, **settings), **settings)
    save_model(load_model(result.best), OUT, {"source": model, "epochs": result.epochs})
    # Its mAP is the benchmark stage's to measure (metrics/benchmark.json); here what only the training knows: mean
    # mAP50-95 of the last TAIL_WINDOW epochs minus the TAIL_WINDOW before (~0 once it flattened).
    write_json({"baseline_epochs": result.epochs, "map50_95_tail_gain": tail_gain(result.curve)},
               "metrics/baseline.json")
    write_text(results_text(result.rows), CURVES)  # one row an epoch, kept for `dvc plots`
