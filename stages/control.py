"""Stage control: the unpruned baseline fine-tuned as the pruned model is, its equal-training-budget reference.

The pruned model had the baseline's training plus the fine-tune. A baseline stopped while
still improving (60 epochs on the synthetic data gain +0.03 mAP50-95 in their last 10; the
default 140, +0.01) gains from those epochs too, so retention against the baseline alone
credits pruning with what training more did. With sparsity training on (``sparsity.epochs``), the
pruned model trained that many epochs more before pruning, and so does the control.
``finetune.control: false`` skips the fine-tune: the baseline itself is then the control.
"""

from yoloprune.errors import exit_on_error

exit_on_error()  # first: an entry point (Ultralytics offline before anything imports it, one-line errors)

from pathlib import Path

from yoloprune.config import FinetuneConfig
from yoloprune.errors import YoloPruneError
from yoloprune.finetune import can_resume, finetune
from yoloprune.io import load_model, save_model
from yoloprune.params import data_yaml, load_params

BASELINE, RUN, OUT = Path("models/baseline.pt"), Path("runs/control"), Path("models/control.pt")


def sparsity_epochs(params: dict) -> int:
    """Return ``sparsity.epochs`` (the stage that trains them checks the rest of its section; this one runs first)."""
    epochs = (params.get("sparsity") or {}).get("epochs", 0)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise YoloPruneError(f"sparsity.epochs must be an integer >= 0 (0 skips sparsity training), got {epochs!r}")
    return epochs


params = load_params()
f, data = FinetuneConfig.from_params(params), data_yaml(params)
if f.control:
    # the pruned model's training after the baseline: sparsity epochs, then the fine-tune; no teacher (it is itself)
    settings = f.settings(params["imgsz"])
    settings["epochs"] += sparsity_epochs(params)
    result = finetune(BASELINE, data, device=str(f.device), workers=f.workers, threads=f.threads, out_dir=RUN,
                      resume=can_resume(RUN, BASELINE, data, **settings), **settings)
    save_model(load_model(result.best), OUT, {"epochs": result.epochs, "control": True})
else:
    save_model(load_model(BASELINE), OUT, {"epochs": 0, "control": False})
