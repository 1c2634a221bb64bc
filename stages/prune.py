"""Stage prune: prune the converted model to the target speed-up; measure its mAP before fine-tuning."""

from yoloprune.errors import exit_on_error

exit_on_error()  # first: an entry point (Ultralytics offline before anything imports it, one-line errors)

from pathlib import Path

import torch

from yoloprune.benchmark import BenchmarkConfig, accuracy
from yoloprune.calibration import batches_loss, calibration_batches
from yoloprune.importance import get_method
from yoloprune.io import load_model, save_model, write_json
from yoloprune.params import data_yaml, load_params
from yoloprune.prune import PruneConfig, layers_table, prune_model

OUT = Path("models/pruned.pt")

params = load_params()
cfg = PruneConfig.from_params(params)
model = load_model("models/sparse.pt")  # the converted model, after sparsity training when sparsity.epochs > 0
# real training batches: gradient methods (taylor) read the model's own loss on them, never a random-image proxy;
# compensation fits how each removed channel is folded into the kept ones on the unpruned network's activations
gradients = get_method(cfg.method).needs_gradients
batches = calibration_batches(model, data_yaml(params), cfg.imgsz, cfg.calib_batches, seed=cfg.seed) \
    if gradients or cfg.compensate else []
report = prune_model(model, cfg, loss_fn=batches_loss(batches) if gradients else None,
                     images=[b["img"] for b in batches] if cfg.compensate else None).to_dict()
save_model(model, OUT, report)
acc = accuracy(OUT, BenchmarkConfig(imgsz=params["imgsz"], data=str(data_yaml(params))), torch.device("cpu"))
# Tracked metrics hold what only this stage measures (MACs and params: metrics/benchmark.json); the whole report, its
# timing included, goes to logs/ (a cached output: it follows each experiment without being a `dvc exp show` column).
# Not here: target (a param), the achieved speed-up in the target's unit (MACs: benchmark.json's macs_speed_up, measured
# on the final model; latency: the prediction below), MACs (benchmark.json); all of them are in logs/prune.json.
write_json({"pruned_map50_95": acc.get("map50_95"),
            "predicted_latency_speed_up": report["predicted_latency_speed_up"]}, "metrics/prune.json")
Path("metrics/prune_layers.csv").write_text(layers_table(report, "csv"))  # where the channels were cut: dvc plots
write_json({**report, **{f"pruned_{k}": v for k, v in acc.items()}}, "logs/prune.json")
