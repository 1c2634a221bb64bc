"""``params.yaml``: read once, checked against a schema at the edge.

A typo (``speedup``) or a wrong type (``epochs: "5"``) is a one-line error naming
the key and the fix, never a silently used default.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from yoloprune.errors import YoloPruneError

# key -> accepted types; a nested dict is a section. float keys also take ints.
SCHEMA: dict[str, Any] = {
    "speed_up": (int, float),
    "method": (str,),
    "model": (str,),
    "data": (str,),
    "imgsz": (int,),
    "dataset": {"n_train": (int,), "n_val": (int,), "seed": (int,)},
    "baseline": {"epochs": (int,), "batch": (int,), "workers": (int,), "threads": (int, type(None)), "args": (dict,)},
    "prune": {"global_pruning": (bool,), "iterative_steps": (int,), "round_to": (int,),
              "max_layer_ratio": (int, float)},
    "finetune": {"epochs": (int,), "batch": (int,), "workers": (int,), "threads": (int, type(None)),
                 "device": (str, int), "args": (dict,)},
    "export": {"opset": (int, type(None))},
    "benchmark": {"iters": (int,), "warmup": (int,), "threads": (int,)},
}

SYNTHETIC = "synthetic"  # params `data` value that selects the generated dataset


def _check(node: dict, schema: dict, where: str, file: str) -> None:
    if not isinstance(node, dict):
        raise YoloPruneError(f"{file}: {where or 'the file'} must be a mapping of keys to values")
    for key, value in node.items():
        name = f"{where}.{key}" if where else key
        if key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(schema)}"
            raise YoloPruneError(f"{file}: unknown key '{name}' ({hint})")
        expected = schema[key]
        if isinstance(expected, dict):
            _check(value, expected, name, file)
        elif isinstance(value, bool) and bool not in expected or not isinstance(value, expected):
            kinds = " or ".join("null" if t is type(None) else t.__name__ for t in expected)
            raise YoloPruneError(f"{file}: '{name}' must be {kinds}, got {value!r}")
    missing = [k for k in schema if k not in node]
    if missing:
        raise YoloPruneError(f"{file}: missing key(s) {', '.join(f'{where}.{k}' if where else k for k in missing)}")


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Return the validated contents of ``params.yaml``."""
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise YoloPruneError(f"{path}: no such file; run the stages from the repository root") from None
    except yaml.YAMLError as e:
        raise YoloPruneError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    _check(params, SCHEMA, "", str(path))
    return params


def data_yaml(params: dict[str, Any]) -> Path:
    """Return the data.yaml the pipeline trains and validates on."""
    return Path("data/synthetic/data.yaml") if params["data"] == SYNTHETIC else Path(params["data"])
