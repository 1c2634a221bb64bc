"""Stage sparsity: train the converted model with a sparsity penalty before pruning, or pass it on (epochs: 0)."""

from yoloprune.errors import exit_on_error

exit_on_error()  # first: an entry point (Ultralytics offline before anything imports it, one-line errors)

import shutil
from pathlib import Path

from yoloprune.io import atomic_path, load_model, save_model, write_json
from yoloprune.params import data_yaml, load_params
from yoloprune.sparsity import SparsityConfig, sparsity_train

CONVERTED, OUT, RUN = Path("models/converted.pt"), Path("models/sparse.pt"), Path("runs/sparsity")

params = load_params()
cfg = SparsityConfig.from_params(params)
if cfg.epochs == 0:  # off: the converted model as it is, byte for byte (seconds, no training)
    with atomic_path(OUT) as tmp:
        shutil.copyfile(CONVERTED, tmp)
    write_json({"sparsity_epochs": 0}, "metrics/sparsity.json")
else:
    f = params["finetune"]  # the fine-tune's batch, threads and recipe: both train an already trained network
    result = sparsity_train(CONVERTED, data_yaml(params), cfg, RUN, imgsz=params["imgsz"], batch=f["batch"],
                            device=str(f["device"]), workers=f["workers"], threads=f["threads"], **f["args"])
    save_model(load_model(result.best), OUT, {"sparsity": {"epochs": result.epochs, "reg": cfg.reg,
                                                           "kind": cfg.kind}})
    write_json({"sparsity_epochs": result.epochs, "sparsity_map50_95": result.map50_95}, "metrics/sparsity.json")
