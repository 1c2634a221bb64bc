"""params.yaml and the CLI build the same frozen configs, checked at the edge: typos and wrong types are one line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from yoloprune.benchmark import BenchmarkConfig
from yoloprune.cli import build_parser
from yoloprune.config import BaselineConfig, Config, DatasetConfig, FinetuneConfig
from yoloprune.errors import YoloPruneError
from yoloprune.export import ExportConfig
from yoloprune.params import SECTIONS, data_yaml, load_params
from yoloprune.prune import PruneConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = (DatasetConfig, BaselineConfig, FinetuneConfig, PruneConfig, ExportConfig, BenchmarkConfig)


def write(tmp_path, change) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    change(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_repository_params_build_every_config():
    params = load_params(REPO / "params.yaml")
    assert {"speed_up", "method", "model", "data", "imgsz"} <= params.keys()
    assert set(params) - {"speed_up", "method", "model", "data", "imgsz"} <= set(SECTIONS)
    assert data_yaml(params) == Path("data/synthetic/data.yaml")
    for config in CONFIGS:  # every key of every section is a field of its config, with the field's type
        config.from_params(params, **({"data": None} if config is BenchmarkConfig else {}))
    prune = PruneConfig.from_params(params)
    assert (prune.speed_up, prune.method, prune.imgsz) == (params["speed_up"], params["method"], params["imgsz"])
    assert prune.round_to == params["prune"]["round_to"] and isinstance(prune.speed_up, float)
    finetune = FinetuneConfig.from_params(params)
    assert finetune.args == params["finetune"]["args"] and finetune.device == params["finetune"]["device"]
    assert ExportConfig.from_params(params).imgsz == params["imgsz"]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda p: p.update(speedup=3), "unknown key 'speedup' (did you mean 'speed_up'?)"),
        (lambda p: p.update(prun={}), "unknown key 'prun' (did you mean 'prune'?)"),
        (lambda p: p["finetune"].update(epochs="5"), "params.yaml: finetune.epochs must be an int, got '5'"),
        (lambda p: p["finetune"].update(epoch=5), "unknown key 'finetune.epoch' (did you mean 'epochs'?)"),
        (lambda p: p["baseline"].update(threads=1.5), "baseline.threads must be an int or null, got 1.5"),
        (lambda p: p["dataset"].update(seed=True), "dataset.seed must be an int, got True"),
        (lambda p: p.update(speed_up="fast"), "speed_up must be a number, got 'fast'"),
        (lambda p: p.pop("method"), "missing key(s) method"),
        (lambda p: p.update(finetune=[1]), "finetune must be a mapping"),
        (lambda p: p["baseline"].update(recipe="yolo27"), "baseline recipe 'yolo27' is not known (did you mean"),
    ],
)
def test_bad_params_are_named(tmp_path, change, words):
    with pytest.raises(YoloPruneError) as e:
        load_params(write(tmp_path, change))
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ({"roundto": 8}, "params.yaml: unknown key 'prune.roundto' (did you mean 'round_to'?)"),
        ({"round_to": "x"}, "params.yaml: prune.round_to must be an int, got 'x'"),
        ({"global_pruning": "yes"}, "prune.global_pruning must be true or false, got 'yes'"),
        ({"round_to": True}, "prune.round_to must be an int, got True"),
        ({"speed_up": 3}, "'prune.speed_up' is a top-level key"),
    ],
)
def test_section_keys_and_types_are_the_dataclass_fields(section, words):
    params = {"speed_up": 2.0, "method": "lamp", "imgsz": 160, "prune": section}
    with pytest.raises(YoloPruneError) as e:
        PruneConfig.from_params(params)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_cli_and_params_give_equal_configs():
    params = load_params(REPO / "params.yaml")
    p = params["prune"]
    args = build_parser().parse_args([
        "prune", "yolov8n.yaml", "--speed-up", str(params["speed_up"]), "--method", params["method"],
        "--imgsz", str(params["imgsz"]), "--iterative-steps", str(p["iterative_steps"]), "--round-to",
        str(p["round_to"]), "--max-layer-ratio", str(p["max_layer_ratio"]),
        "--global-pruning" if p["global_pruning"] else "--no-global-pruning", "--target", p["target"],
        "--compensate" if p["compensate"] else "--no-compensate",
    ])
    assert PruneConfig.from_args(args) == PruneConfig.from_params(params)
    opset = params["export"]["opset"]
    args = build_parser().parse_args(["export", "m.pt", "--imgsz", str(params["imgsz"])]
                                     + (["--opset", str(opset)] if opset else []))
    assert ExportConfig.from_args(args) == ExportConfig.from_params(params)
    # a flag left unset keeps the dataclass default; a wrong type names the flag
    assert PruneConfig.from_args({"imgsz": 320}) == PruneConfig(imgsz=320)
    with pytest.raises(YoloPruneError, match=r"^command line: --round-to must be an int, got '8'$"):
        PruneConfig.from_args({"round_to": "8"})
    # an option of the same name that means something else to the verb is left out; a fixed None is the default
    assert ExportConfig.from_args({"batch": 4, "imgsz": None}, exclude=("batch",), opset=None) == ExportConfig()


@dataclass(frozen=True)
class Inner(Config):
    method: Literal["kd", "none"] = "none"
    weight: float = 1.0


@dataclass(frozen=True)
class Outer(Config):
    SECTION = "outer"

    inner: Inner = field(default_factory=Inner)
    extra: dict = field(default_factory=dict)


def test_nested_sections_and_literals():
    built = Outer.from_params({"outer": {"inner": {"method": "kd", "weight": 2}, "extra": {"a": 1}}})
    assert built == Outer(Inner("kd", 2.0), {"a": 1}) and isinstance(built.inner.weight, float)
    assert Outer.from_params({}) == Outer()  # a missing section is the defaults
    with pytest.raises(YoloPruneError, match=r"unknown key 'outer.inner.wieght' \(did you mean 'weight'\?\)"):
        Outer.from_params({"outer": {"inner": {"wieght": 2}}})
    with pytest.raises(YoloPruneError, match=r"outer.inner.method must be one of 'kd', 'none', got 'kl'"):
        Outer.from_params({"outer": {"inner": {"method": "kl"}}})


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(YoloPruneError, match="no such file"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("speed_up: [2\n")
    with pytest.raises(YoloPruneError, match="not valid YAML"):
        load_params(bad)


def test_baseline_recipe_follows_the_generation_and_args_override_it():
    params = load_params(REPO / "params.yaml")
    b = BaselineConfig.from_params(params)
    assert b.recipe == "auto"
    v8, v26 = b.settings(160, "configs/yolov8n.yaml"), b.settings(160, "configs/yolo26n.yaml")
    assert (v8["optimizer"], v8["lr0"]) == ("AdamW", 0.004) and v8["nbs"] == params["baseline"]["args"]["nbs"]
    assert (v26["optimizer"], v26["lr0"], v26["warmup_bias_lr"]) == ("AdamW", 0.001, 0.0)
    assert b.settings(160, "configs/yolo12n.yaml")["lr0"] == 0.004  # no recipe of its own: yolov8's
    params["baseline"].update(recipe="none", args={"lr0": 0.02})
    assert BaselineConfig.from_params(params).settings(160, "yolo26n.yaml") == {"epochs": params["baseline"]["epochs"],
                                                                               "imgsz": 160, "batch": 8, "lr0": 0.02}
    params["baseline"].update(recipe="yolo26", args={"lr0": 0.002})
    assert BaselineConfig.from_params(params).settings(160, "yolov8n.yaml")["lr0"] == 0.002  # args win
