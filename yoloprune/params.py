"""``params.yaml``: read once, checked at the edge.

The top-level knobs (``speed_up``, ``method``, ``model``, ``data``, ``imgsz``) and the
section names are checked here; each section's keys and types are its config
dataclass's fields (``yoloprune.config``), checked by ``Config.from_params`` where a
stage builds it. A typo (``speedup``) or a wrong type (``epochs: "5"``) is a one-line
error naming the key and the fix, never a silently used default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from yoloprune.config import BaselineConfig, DatasetConfig, FinetuneConfig, check_top_level
from yoloprune.errors import YoloPruneError

# Section name -> the config that owns it, where that config is light enough to import here. The prune, export and
# benchmark sections are checked by their stages (PruneConfig.from_params, ...): importing those modules here would
# make every stage depend on them.
CHECKED = {"dataset": DatasetConfig, "baseline": BaselineConfig, "finetune": FinetuneConfig}
SECTIONS = (*CHECKED, "prune", "export", "benchmark", "sparsity")

# params `data` value that selects the generated dataset: the dataset stage's output folder, so that dvc.yaml can
# declare `${data}` as a dependency whatever the user passes (their data.yaml or dataset folder is then tracked).
SYNTHETIC = "data/synthetic"


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Return the contents of ``params.yaml``, its top level and the sections named in ``CHECKED`` validated."""
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise YoloPruneError(f"{path}: no such file; run the stages from the repository root") from None
    except yaml.YAMLError as e:
        raise YoloPruneError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(params, dict):
        raise YoloPruneError(f"{path}: the file must be a mapping of keys to values")
    check_top_level(params, SECTIONS, str(path))
    for config in CHECKED.values():
        config.from_params(params, source=str(path))
    return params


def data_yaml(params: dict[str, Any]) -> Path:
    """Return the data.yaml the pipeline trains and validates on: ``data`` itself, or the data.yaml in that folder."""
    path = Path(params["data"])
    return path if path.suffix in {".yaml", ".yml"} else path / "data.yaml"
