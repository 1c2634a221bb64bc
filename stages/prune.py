"""Stage prune: prune the converted model to the target speed-up; measure its mAP before fine-tuning."""

from pathlib import Path

import torch

from yoloprune.benchmark import BenchmarkConfig, accuracy
from yoloprune.errors import exit_on_error
from yoloprune.io import load_model, save_model, write_json
from yoloprune.params import data_yaml, load_params
from yoloprune.prune import PruneConfig, prune_model

OUT = Path("models/pruned.pt")

exit_on_error()
params = load_params()
p = params["prune"]
cfg = PruneConfig(speed_up=params["speed_up"], method=params["method"], global_pruning=p["global_pruning"],
                  iterative_steps=p["iterative_steps"], round_to=p["round_to"], max_layer_ratio=p["max_layer_ratio"],
                  imgsz=params["imgsz"])
model = load_model("models/converted.pt")
report = prune_model(model, cfg).to_dict()
save_model(model, OUT, report)
acc = accuracy(OUT, BenchmarkConfig(imgsz=params["imgsz"], data=str(data_yaml(params))), torch.device("cpu"))
metrics = {k: report[k] for k in ("target_speed_up", "speed_up", "base_macs", "pruned_macs", "base_params",
                                   "pruned_params", "steps", "seconds", "counted_branch")}
metrics.update({f"pruned_{k}": v for k, v in acc.items()})
write_json(metrics, "metrics/prune.json")
