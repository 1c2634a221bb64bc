"""One configuration layer: frozen dataclasses that build themselves from a ``params.yaml`` section or the CLI.

A config class is a frozen dataclass with the ``Config`` mixin, the name of its
``params.yaml`` section (``SECTION``) and the top-level keys it shares (``INHERITS``,
e.g. ``imgsz``). Its fields are the schema: adding a knob is adding a field (and the
line in ``params.yaml``). Every key is checked against the field names (an unknown one
gets a did-you-mean hint) and the field types (``int``, ``float``, ``bool``, ``str``,
``X | None``, ``dict``, ``Literal``, or a nested ``Config`` for a sub-mapping), so a typo
is a one-line error at the edge, never a silently used default. The dataclass's
``__post_init__`` then checks the values' meaning (ranges, registry names).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, ClassVar, Literal, TypeVar

from yoloprune.errors import YoloPruneError

PARAMS = "params.yaml"  # the source named in errors about a section
TOP_LEVEL: dict[str, tuple[type, ...]] = {  # params.yaml's top-level knobs, shared by several stages
    "speed_up": (float,),
    "method": (str,),
    "model": (str,),
    "data": (str,),
    "imgsz": (int,),
}

C = TypeVar("C", bound="Config")


class Config:
    """Mixin for frozen dataclasses: build from a ``params.yaml`` section or parsed CLI arguments, type-checked."""

    SECTION: ClassVar[str] = ""  # params.yaml section (a subclass sets it unannotated: not a dataclass field)
    INHERITS: ClassVar[tuple[str, ...]] = ()  # top-level params.yaml keys that fill the fields of the same name

    @classmethod
    def from_section(cls: type[C], section: Mapping[str, Any] | None, where: str = "", source: str = PARAMS,
                     **fixed: Any) -> C:
        """Return the config of one ``params.yaml`` mapping; ``fixed`` fields are set by the caller, not the file.

        ``where`` is the section's dotted name in error messages (``prune``, ``finetune.distill``).
        """
        where = where or cls.SECTION
        if section is None:
            section = {}
        if not isinstance(section, Mapping):
            raise YoloPruneError(f"{source}: {where or 'the file'} must be a mapping of keys to values, "
                                 f"got {section!r}")
        accepted = [n for n in _field_names(cls) if n not in cls.INHERITS and n not in fixed]
        for key in section:
            if key not in accepted:
                name = f"{where}.{key}" if where else str(key)
                if key in cls.INHERITS:
                    raise YoloPruneError(f"{source}: '{name}' is a top-level key; set '{key}' once, at the top")
                raise YoloPruneError(f"{source}: unknown key '{name}' ({_hint(str(key), accepted)})")
        return cls._build({**section, **fixed}, where, source)

    @classmethod
    def from_params(cls: type[C], params: Mapping[str, Any], source: str = PARAMS, **fixed: Any) -> C:
        """Return the config of the whole ``params.yaml`` (as ``load_params`` returns it): its section + shared keys.

        A missing section means the defaults (``load_params`` has already refused a misspelt one).
        """
        inherited = {k: params[k] for k in cls.INHERITS if k in params and k not in fixed}
        section = params.get(cls.SECTION) if cls.SECTION else {}
        return cls.from_section(section, source=source, **inherited, **fixed)

    @classmethod
    def from_args(cls: type[C], args: argparse.Namespace | Mapping[str, Any], exclude: Collection[str] = (),
                  **fixed: Any) -> C:
        """Return the config of parsed CLI arguments: each field from the option of the same ``dest``.

        Options left at ``None`` keep the field's default, so a flag's default lives in one
        place, the dataclass. ``fixed`` sets fields whose option is named otherwise (``None``:
        the default); ``exclude`` names options of the same name that mean something else
        to this verb (``yoloprune prune --threads`` is the fine-tune's).
        """
        given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
        values = {n: given[n] for n in _field_names(cls) if n in given and n not in exclude and n not in fixed}
        values.update(fixed)
        return cls._build({k: v for k, v in values.items() if v is not None}, "", "command line", flag=True)

    @classmethod
    def _build(cls: type[C], values: Mapping[str, Any], where: str, source: str, flag: bool = False) -> C:
        hints = typing.get_type_hints(cls)
        checked = {}
        for key, value in values.items():
            if flag:
                name = "--" + key.replace("_", "-")
            else:
                name = f"{where}.{key}" if where else key
            checked[key] = _typed(value, hints[key], name, source)
        return cls(**checked)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _hint(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known) or 'none'}"


def _typed(value: Any, hint: Any, name: str, source: str) -> Any:
    """Return ``value`` if it has type ``hint`` (a nested mapping built into its ``Config``), else raise naming it."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if isinstance(option, type) and issubclass(option, Config) and isinstance(value, Mapping):
            return option.from_section(value, where=name.lstrip("-"), source=source)
        if _matches(value, option):
            return float(value) if option is float and not isinstance(value, float) else value
    kinds = " or ".join(_describe(o) for o in options)
    raise YoloPruneError(f"{source}: {name} must be {kinds}, got {value!r}")


def _matches(value: Any, option: Any) -> bool:
    if option is Any:
        return True
    if option is type(None):
        return value is None
    if typing.get_origin(option) is Literal:
        return value in typing.get_args(option)
    base = typing.get_origin(option) or option
    if base is dict or base is Mapping:
        return isinstance(value, Mapping)
    if isinstance(value, bool):  # YAML's true is an int to Python; a flag is never a count
        return base is bool
    if base is float:
        return isinstance(value, (int, float))
    return isinstance(base, type) and isinstance(value, base)


def _describe(option: Any) -> str:
    if option is type(None):
        return "null"
    if typing.get_origin(option) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(option))
    base = typing.get_origin(option) or option
    names = {int: "an int", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
    return names.get(base, f"a {getattr(base, '__name__', base)}")


def check_top_level(params: Mapping[str, Any], sections: tuple[str, ...], source: str = PARAMS) -> None:
    """Raise unless ``params`` holds exactly the top-level knobs (typed) and mappings for known ``sections``."""
    known = [*TOP_LEVEL, *sections]
    for key, value in params.items():
        if key not in known:
            raise YoloPruneError(f"{source}: unknown key '{key}' ({_hint(str(key), known)})")
        if key in TOP_LEVEL:
            _typed(value, TOP_LEVEL[key][0], key, source)
    missing = [k for k in TOP_LEVEL if k not in params]
    if missing:
        raise YoloPruneError(f"{source}: missing key(s) {', '.join(missing)}; add them at the top of the file")


# Sections no library module owns: the synthetic dataset, and the training runs (the trainer takes keywords).
@dataclass(frozen=True)
class DatasetConfig(Config):
    """The synthetic dataset's size and seed."""

    SECTION = "dataset"

    n_train: int = 192  # training images
    n_val: int = 32  # validation images
    seed: int = 0  # generator seed: same seed, same bytes


@dataclass(frozen=True)
class TrainConfig(Config):
    """How the baseline is trained from its model yaml."""

    SECTION = "baseline"

    epochs: int = 60
    batch: int = 8  # images per batch
    workers: int = 0  # dataloader processes (0: in the training process)
    threads: int | None = None  # torch CPU threads; None: every core
    args: dict[str, Any] = field(default_factory=dict)  # more Ultralytics train settings, checked by the trainer

    def settings(self, imgsz: int) -> dict[str, Any]:
        """Return the Ultralytics training settings a run's fingerprint is made of: epochs, imgsz, batch, args."""
        return {"epochs": self.epochs, "imgsz": imgsz, "batch": self.batch, **self.args}


# Per-generation recipes for a baseline trained from its yaml: the optimiser settings each generation converges with
# on a short from-scratch run (``baseline.recipe: auto`` picks one by the yaml's name; ``baseline.args`` override it).
# Measured on the synthetic set at 160 px, 60 epochs, one seed, the two runs side by side: yolo26n reached 0.285
# mAP50-95 with AdamW lr0 0.001 and 0.177 with the 0.004 tuned on yolov8n. Ultralytics' own choice for a short run
# (optimizer: auto, under 10k iterations) is AdamW at 0.002 * 5 / (4 + classes), 0.001-0.0014 here, for every
# generation; yolov8n and yolo11n train well at the higher rate.
RECIPES: dict[str, dict[str, Any]] = {
    "yolov8": {"optimizer": "AdamW", "lr0": 0.004},  # higher than Ultralytics' auto choice, for a short run
    "yolo11": {"optimizer": "AdamW", "lr0": 0.004},
    "yolo26": {"optimizer": "AdamW", "lr0": 0.001, "warmup_bias_lr": 0.0},  # Ultralytics' auto rate for short runs
}
DEFAULT_RECIPE = "yolov8"  # other generations (YOLOv10, YOLO12, your own yaml) start from this one


def generation(model: str) -> str | None:
    """Return the recipe generation of a model yaml or checkpoint name (``yolo26n.yaml`` -> ``yolo26``), else None."""
    stem = PurePath(str(model)).name.lower()
    return next((g for g in RECIPES if stem.startswith(g)), None)


# Distillation methods and the loss terms each adds (yoloprune.distill computes the terms).
DISTILL_METHODS: dict[str, tuple[str, ...]] = {"none": (), "output": ("output",), "cwd": ("cwd",),
                                               "both": ("output", "cwd")}


@dataclass(frozen=True)
class DistillConfig(Config):
    """Distillation from the unpruned model while fine-tuning (``finetune.distill``; see ``yoloprune.distill``)."""

    method: str = "none"  # none | output (class scores, box bins) | cwd (neck features) | both
    weight: float = 1.0  # multiplies the distillation term added to the detection loss
    temperature: float = 1.0  # softens scores, box bins and CWD's spatial maps; terms are scaled by its square

    def __post_init__(self) -> None:
        if self.method not in DISTILL_METHODS:
            raise YoloPruneError(f"unknown distillation method {self.method!r} "
                                 f"({_hint(str(self.method), list(DISTILL_METHODS))}); use one of "
                                 f"{', '.join(DISTILL_METHODS)}")
        if not self.weight >= 0 or self.weight == float("inf"):
            raise YoloPruneError(f"distill weight must be a finite number >= 0, got {self.weight!r}")
        if not self.temperature > 0 or self.temperature == float("inf"):
            raise YoloPruneError(f"distill temperature must be a finite number > 0, got {self.temperature!r}")

    @property
    def terms(self) -> tuple[str, ...]:
        """Return the loss terms this method adds (none: no term)."""
        return DISTILL_METHODS[self.method]


@dataclass(frozen=True)
class BaselineConfig(TrainConfig):
    """How the baseline is trained from its model yaml: ``TrainConfig`` and the generation's recipe."""

    SECTION = "baseline"

    recipe: str = "auto"  # auto: by the model's generation (RECIPES); a generation's name; none: Ultralytics' defaults

    def __post_init__(self) -> None:
        known = ["auto", "none", *RECIPES]
        if self.recipe not in known:
            raise YoloPruneError(f"baseline recipe {self.recipe!r} is not known ({_hint(str(self.recipe), known)}); "
                                 f"use one of {', '.join(known)}")

    def recipe_for(self, model: str) -> dict[str, Any]:
        """Return the recipe's Ultralytics settings for ``model`` (empty for ``none``)."""
        if self.recipe == "none":
            return {}
        name = generation(model) if self.recipe == "auto" else self.recipe
        return dict(RECIPES[name or DEFAULT_RECIPE])

    def settings(self, imgsz: int, model: str = "") -> dict[str, Any]:
        """Return the training settings: epochs, imgsz, batch, then the recipe for ``model``, then ``args``."""
        return {"epochs": self.epochs, "imgsz": imgsz, "batch": self.batch, **self.recipe_for(model), **self.args}


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """How the pruned network is fine-tuned."""

    SECTION = "finetune"

    epochs: int = 10
    device: str | int = "cpu"  # cpu, 0, or 0,1,... (Ultralytics DDP)
    distill: DistillConfig = field(default_factory=DistillConfig)  # from the unpruned model; method none: off
    # also fine-tune the unpruned baseline alike (stage control): retention against an equal training budget, so a
    # baseline stopped while still improving does not make pruning look free; false: the baseline is the control
    control: bool = True
