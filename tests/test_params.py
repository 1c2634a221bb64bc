"""params.yaml is checked at the edge: typos and wrong types are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from yoloprune.errors import YoloPruneError
from yoloprune.params import SCHEMA, data_yaml, load_params

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, change) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    change(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_repository_params_are_valid_and_top_level_knobs_exist():
    params = load_params(REPO / "params.yaml")
    assert {"speed_up", "method", "model", "data", "imgsz"} <= params.keys()
    assert params.keys() == SCHEMA.keys()
    assert data_yaml(params) == Path("data/synthetic/data.yaml")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda p: p.update(speedup=3), "unknown key 'speedup' (did you mean 'speed_up'?)"),
        (lambda p: p["prune"].update(roundto=8), "unknown key 'prune.roundto' (did you mean 'round_to'?)"),
        (lambda p: p["finetune"].update(epochs="5"), "'finetune.epochs' must be int, got '5'"),
        (lambda p: p.update(speed_up="fast"), "'speed_up' must be int or float"),
        (lambda p: p["prune"].update(global_pruning="yes"), "'prune.global_pruning' must be bool"),
        (lambda p: p["prune"].update(round_to=True), "'prune.round_to' must be int, got True"),
        (lambda p: p.pop("method"), "missing key(s) method"),
    ],
)
def test_bad_params_are_named(tmp_path, change, words):
    with pytest.raises(YoloPruneError) as e:
        load_params(write(tmp_path, change))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(YoloPruneError, match="no such file"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("speed_up: [2\n")
    with pytest.raises(YoloPruneError, match="not valid YAML"):
        load_params(bad)
