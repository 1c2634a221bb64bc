"""Stage dataset: generate the synthetic detection dataset (or note that the user's own data is used)."""

from yoloprune.errors import exit_on_error

exit_on_error()  # first: an entry point (Ultralytics offline before anything imports it, one-line errors)

from pathlib import Path

from yoloprune.config import DatasetConfig
from yoloprune.data import make_dataset
from yoloprune.params import SYNTHETIC, load_params

OUT = Path("data/synthetic")

params = load_params()
if params["data"] == SYNTHETIC:
    d = DatasetConfig.from_params(params)
    (OUT / "UNUSED").unlink(missing_ok=True)  # left by an earlier run on the user's data; the folder is ours
    make_dataset(OUT, n_train=d.n_train, n_val=d.n_val, imgsz=params["imgsz"], seed=d.seed)
else:  # the user's data.yaml is used as it is; this stage costs nothing
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "UNUSED").write_text(f"params.yaml data: {params['data']}\n")
