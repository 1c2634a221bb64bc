"""The synthetic dataset: deterministic bytes, valid YOLO labels, varied content; and data.yaml checks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

import yoloprune  # noqa: F401  (offline switches before ultralytics is imported)
from yoloprune import data as data_mod
from yoloprune.data import NAMES, check_data_yaml, make_dataset
from yoloprune.errors import YoloPruneError


def digests(root: Path, pattern: str = "[il]*/*/*") -> dict[str, str]:
    """Return {relative path: sha256} of the dataset's images and labels."""
    files = (p for p in sorted(root.glob(pattern)) if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def read_labels(root: Path, split: str) -> dict[str, np.ndarray]:
    """Return {image stem: (n, 5) array of class x y w h}."""
    out = {}
    for f in sorted((root / "labels" / split).glob("*.txt")):
        rows = [[float(v) for v in line.split()] for line in f.read_text().splitlines()]
        out[f.stem] = np.array(rows, dtype=float).reshape(-1, 5)
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A 24 + 8 image dataset at the default 160 px."""
    return make_dataset(tmp_path_factory.mktemp("synth") / "ds", n_train=24, n_val=8, imgsz=160, seed=0)


def test_same_seed_same_bytes(tmp_path):
    a = make_dataset(tmp_path / "a", n_train=5, n_val=2, imgsz=96, seed=3).parent
    b = make_dataset(tmp_path / "b", n_train=5, n_val=2, imgsz=96, seed=3).parent
    c = make_dataset(tmp_path / "c", n_train=5, n_val=2, imgsz=96, seed=4).parent
    assert len(digests(a)) == 2 * 7
    assert digests(a) == digests(b)
    assert all(digests(a)[k] != digests(c)[k] for k in digests(a) if k.startswith("images"))
    yaml_before = (a / "data.yaml").read_bytes()
    make_dataset(a, n_train=5, n_val=2, imgsz=96, seed=3)  # regenerating in place: same bytes, data.yaml included
    assert (a / "data.yaml").read_bytes() == yaml_before and digests(a) == digests(b)


def test_dataset_folder_can_move(tmp_path):
    """DVC restores data/synthetic from its cache into other workspaces (exp --temp, queues, CI)."""
    import shutil

    from ultralytics.data.utils import check_det_dataset

    yml = make_dataset(tmp_path / "a", n_train=2, n_val=2, imgsz=64)
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = tmp_path / "b" / "data.yaml"
    assert Path(check_data_yaml(moved)["path"]) == moved.parent
    assert Path(check_det_dataset(str(moved))["val"]) == moved.parent / "images" / "val"
    assert not yml.exists()


def test_images_do_not_depend_on_split_size(tmp_path):
    small = digests(make_dataset(tmp_path / "s", n_train=3, n_val=2, imgsz=64).parent)
    large = digests(make_dataset(tmp_path / "l", n_train=6, n_val=4, imgsz=64).parent)
    assert small.items() <= large.items()


def test_yaml_and_files(dataset):
    root = dataset.parent
    assert dataset.read_text().splitlines()[0].startswith(data_mod.MARKER)
    cfg = yaml.safe_load(dataset.read_text())
    assert list(cfg) == ["train", "val", "names"]  # no `path`: the splits sit beside the yaml, wherever it moves
    assert cfg["names"] == dict(enumerate(NAMES))
    assert Path(check_data_yaml(dataset)["path"]) == root
    for split, n in (("train", 24), ("val", 8)):
        images = sorted(p.stem for p in (root / "images" / split).glob("*.png"))
        labels = sorted(p.stem for p in (root / "labels" / split).glob("*.txt"))
        assert len(images) == n and images == labels
    from PIL import Image

    with Image.open(next((root / "images" / "train").glob("*.png"))) as im:
        assert im.size == (160, 160) and im.mode == "RGB"
    assert not list(root.parent.glob(".*partial*")) and not list(root.parent.glob(".*old*"))


def test_labels_are_valid_yolo_boxes(dataset):
    labels = read_labels(dataset.parent, "train") | read_labels(dataset.parent, "val")
    boxes = np.concatenate(list(labels.values()))
    assert len(boxes) > 60
    cls, xy, wh = boxes[:, 0], boxes[:, 1:3], boxes[:, 3:5]
    assert np.all(cls == cls.round()) and cls.min() >= 0 and cls.max() < len(NAMES)
    assert np.all(wh > 0) and np.all(wh <= 1)
    assert np.all(xy - wh / 2 >= -1e-6) and np.all(xy + wh / 2 <= 1 + 1e-6)  # inside the image


def test_content_is_varied(dataset):
    labels = read_labels(dataset.parent, "train")
    boxes = np.concatenate(list(labels.values()))
    side_px = boxes[:, 3:5].max(axis=1) * 160
    assert len(set(boxes[:, 0].astype(int))) == len(NAMES)  # every class appears
    assert (side_px < 16).sum() >= 10  # many small objects
    assert (side_px > 48).sum() >= 5  # and large ones
    assert max(len(b) for b in labels.values()) >= 5  # crowded images
    overlaps = sum(_overlapping_pairs(b) for b in labels.values())
    assert overlaps >= 3  # objects occlude each other


def test_background_is_cluttered(dataset):
    from PIL import Image

    # Outside every labelled box the image is not flat: gradients, colour noise and strokes.
    for f in sorted((dataset.parent / "images" / "train").glob("*.png"))[:6]:
        im = np.asarray(Image.open(f), dtype=float)
        gray = im.mean(axis=2)
        assert gray.std() > 10
        assert np.abs(np.diff(gray, axis=1)).mean() > 2  # pixel noise and edges


def _overlapping_pairs(b: np.ndarray) -> int:
    n = 0
    for i in range(len(b)):
        for j in range(i + 1, len(b)):
            dx = min(b[i, 1] + b[i, 3] / 2, b[j, 1] + b[j, 3] / 2) - max(b[i, 1] - b[i, 3] / 2, b[j, 1] - b[j, 3] / 2)
            dy = min(b[i, 2] + b[i, 4] / 2, b[j, 2] + b[j, 4] / 2) - max(b[i, 2] - b[i, 4] / 2, b[j, 2] - b[j, 4] / 2)
            n += dx > 0 and dy > 0
    return n


def test_interrupted_run_leaves_old_dataset(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    make_dataset(root, n_train=2, n_val=1, imgsz=64)
    before = digests(root, "**/*")
    calls = []

    def failing(rng, imgsz):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(rng, imgsz)

    real = data_mod.draw_image
    monkeypatch.setattr(data_mod, "draw_image", failing)
    with pytest.raises(KeyboardInterrupt):
        make_dataset(root, n_train=5, n_val=2, imgsz=64)
    assert digests(root, "**/*") == before  # the previous dataset, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no partial folder left behind
    with pytest.raises(KeyboardInterrupt):
        make_dataset(tmp_path / "new", n_train=5, n_val=2, imgsz=64)
    assert not (tmp_path / "new").exists()


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(YoloPruneError, match="did not write"):
        make_dataset(tmp_path, n_train=1, n_val=1, imgsz=64)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    with pytest.raises(YoloPruneError, match="n_train"):
        make_dataset(tmp_path / "x", n_train=0)


def test_check_data_yaml_accepts_generated(dataset):
    cfg = check_data_yaml(dataset)
    assert cfg["nc"] == len(NAMES) and cfg["names"][0] == "circle"
    assert cfg["train"] == str(dataset.parent / "images" / "train") and Path(cfg["val"]).is_dir()


def _broken(tmp_path: Path, case: str) -> Path:
    """Return a data.yaml broken in the way ``case`` names, over a copy of a small valid dataset."""
    root = tmp_path / "ds"
    yml = make_dataset(root, n_train=2, n_val=1, imgsz=64)
    cfg = yaml.safe_load(yml.read_text())
    if case == "missing":
        return tmp_path / "nope.yaml"
    if case == "malformed":
        yml.write_text("path: [unclosed\ntrain: images/train\n")
    elif case == "not a mapping":
        yml.write_text("- just\n- a list\n")
    elif case == "no names":
        yml.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "names"}))
    elif case == "no train key":
        yml.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "train"}))
    elif case == "no val folder":
        yml.write_text(yaml.safe_dump({**cfg, "val": "images/validation"}))
    elif case == "no images":
        for p in (root / "images" / "val").iterdir():
            p.unlink()
    elif case == "empty labels":
        for p in (root / "labels" / "train").iterdir():
            p.write_text("")
    elif case == "bad path":
        yml.write_text(yaml.safe_dump({**cfg, "path": "no/such/dataset"}))
    return yml


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing", "no such file"),
        ("malformed", "not valid YAML"),
        ("not a mapping", "not a mapping"),
        ("no names", "no 'names:' key"),
        ("no train key", "no 'train:' key"),
        ("no val folder", "does not exist"),
        ("no images", "val has no images"),
        ("empty labels", "every train label file is missing or empty"),
        ("bad path", "is not a folder"),
    ],
)
def test_check_data_yaml_errors(tmp_path, case, words):
    yml = _broken(tmp_path, case)
    with pytest.raises(YoloPruneError) as e:
        check_data_yaml(yml)
    msg = str(e.value)
    assert words in msg and "\n" not in msg
    assert ";" in msg  # problem; fix
