"""A synthetic YOLO detection dataset drawn from numpy and PIL alone, and a checker for users' data yamls.

``make_dataset`` draws six classes of shapes at many sizes (down to 8 pixels),
in random colours, partly occluding each other, on cluttered backgrounds (gradients,
low-frequency colour noise, pixel noise and unlabelled strokes and arcs). It is
deterministic: every image has its own random stream seeded by (seed, split, index),
so the same arguments give byte-identical files, and the first images of a split do
not change when ``n_train`` or ``n_val`` grows.

``check_data_yaml`` turns the ways a data yaml goes wrong into one-line
``YoloPruneError`` messages before Ultralytics would fail with a traceback, or
worse, try to download a dataset.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw

from yoloprune.errors import YoloPruneError
from yoloprune.io import scratch_dir

LOGGER = logging.getLogger("yoloprune")

NAMES = ("circle", "square", "triangle", "ring", "cross", "star")
MARKER = "# yoloprune synthetic dataset"  # first line of a data.yaml that make_dataset may overwrite
SUPERSAMPLE = 2  # shapes are drawn at 2x and averaged down: soft edges, sub-pixel sizes
MIN_VISIBLE = 0.6  # an object may be hidden by later ones, but at most 40% of it
EMPTY_SHARE = 0.05  # share of images with no objects at all (background-only, empty label file)
IMG_SUFFIXES = {".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm", ".heic"}


def make_dataset(root: str | Path, n_train: int = 96, n_val: int = 32, imgsz: int = 160, seed: int = 0) -> Path:
    """Return the path of ``root/data.yaml`` after drawing a synthetic detection dataset under ``root``.

    Images are PNGs in ``root/images/{train,val}``, labels YOLO text files in
    ``root/labels/{train,val}``. The dataset is built in a hidden sibling folder and
    renamed into place, with ``data.yaml`` written last: an interrupted run leaves
    the previous dataset (or none), never a data.yaml over half a dataset.
    """
    for name, value, low in (("n_train", n_train, 1), ("n_val", n_val, 1), ("imgsz", imgsz, 32)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise YoloPruneError(f"{name} must be an integer >= {low}, got {value!r}")
    root = Path(root).resolve()
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = scratch_dir(root.parent, f"{root.name}.partial")
    try:
        for split_id, (split, n) in enumerate((("train", n_train), ("val", n_val))):
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
            for i in range(n):
                rng = np.random.default_rng([seed, split_id, i])
                image, labels = draw_image(rng, imgsz)
                stem = f"{split}_{i:05d}"
                Image.fromarray(image).save(tmp / "images" / split / f"{stem}.png", optimize=False)
                (tmp / "labels" / split / f"{stem}.txt").write_text(
                    "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in labels)
                )
        # No `path`: Ultralytics and check_data_yaml then resolve the splits beside the yaml, so the folder may move
        # (DVC restores it from its cache into other workspaces: `dvc exp run --temp`, queued runs, CI).
        data = {"train": "images/train", "val": "images/val", "names": dict(enumerate(NAMES))}
        header = f"{MARKER}: make_dataset(n_train={n_train}, n_val={n_val}, imgsz={imgsz}, seed={seed})\n"
        (tmp / "data.yaml").write_text(header + yaml.safe_dump(data, sort_keys=False))
        _swap_into_place(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / "data.yaml"


def _check_replaceable(root: Path) -> None:
    if not root.exists():
        return
    if not root.is_dir():
        raise YoloPruneError(f"{root}: is a file; choose a new or empty folder for the synthetic dataset")
    yml = root / "data.yaml"
    ours = yml.is_file() and yml.read_text(errors="replace").startswith(MARKER)
    if any(root.iterdir()) and not ours:
        raise YoloPruneError(f"{root}: exists and holds files make_dataset did not write; choose a new or empty "
                             "folder (an existing synthetic dataset is replaced)")


def _swap_into_place(tmp: Path, root: Path) -> None:
    # Two renames: the old dataset stays whole until the new one is complete, then goes.
    old = None
    if root.exists():
        old = scratch_dir(root.parent, f"{root.name}.old")
        old.rmdir()
        os.replace(root, old)
    os.replace(tmp, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def draw_image(rng: np.random.Generator, imgsz: int) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    """Return one ``imgsz`` x ``imgsz`` RGB uint8 image and its labels ``(class, x, y, w, h)``, normalised."""
    s = imgsz * SUPERSAMPLE
    canvas = _background(rng, s)
    for _ in range(rng.integers(3, 9)):  # clutter under the objects
        _stroke(rng, canvas, s, max_width=3 * SUPERSAMPLE)

    n_objects = 0 if rng.random() < EMPTY_SHARE else int(rng.integers(1, 9))
    owner = np.full((imgsz, imgsz), -1, dtype=np.int16)  # which object each output pixel shows
    areas: list[int] = []
    boxes: list[tuple[int, float, float, float, float]] = []
    for _ in range(n_objects):
        placed = _place(rng, imgsz, owner, areas)
        if placed is None:
            continue
        cls, (x0, y0), alpha_hi, alpha = placed
        region = (slice(y0 * SUPERSAMPLE, y0 * SUPERSAMPLE + alpha_hi.shape[0]),
                  slice(x0 * SUPERSAMPLE, x0 * SUPERSAMPLE + alpha_hi.shape[1]))
        under = canvas[region][alpha_hi > 0.5].mean(axis=0)
        a = alpha_hi[..., None]
        canvas[region] = canvas[region] * (1 - a) + _contrasting_colour(rng, under) * a
        visible = alpha > 0.5
        owner[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]][visible] = len(areas)
        areas.append(int(visible.sum()))
        bx0, by0, bx1, by1 = _bbox(visible)
        bx0, bx1, by0, by1 = bx0 + x0, bx1 + x0, by0 + y0, by1 + y0
        boxes.append((cls, (bx0 + bx1) / 2 / imgsz, (by0 + by1) / 2 / imgsz, (bx1 - bx0) / imgsz, (by1 - by0) / imgsz))

    for _ in range(rng.integers(0, 4)):  # a few thin strokes over the objects: clutter that also occludes
        _stroke(rng, canvas, s, max_width=SUPERSAMPLE)
    image = canvas.reshape(imgsz, SUPERSAMPLE, imgsz, SUPERSAMPLE, 3).mean(axis=(1, 3))
    image += rng.normal(0, rng.uniform(2, 14), image.shape)  # sensor noise
    return np.clip(image, 0, 255).round().astype(np.uint8), boxes


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    """Return a float32 (s, s, 3) background: a two-colour gradient or low-frequency colour noise."""
    if rng.random() < 0.5:
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:s, 0:s] / s
        t = np.clip((xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle) + 0.5, 0, 1)[..., None]
        return (c0 * (1 - t) + c1 * t).astype(np.float32)
    k = int(rng.integers(2, 7))
    grid = rng.uniform(0, 255, (k, k, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((s, s), Image.BICUBIC), dtype=np.float32).copy()


def _stroke(rng: np.random.Generator, canvas: np.ndarray, s: int, max_width: int) -> None:
    """Draw one unlabelled line, polyline or open arc in a random colour onto ``canvas``."""
    mask = Image.new("L", (s, s))
    draw = ImageDraw.Draw(mask)
    width = int(rng.integers(1, max_width + 1))
    kind = rng.integers(3)
    if kind == 0:
        draw.line([tuple(p) for p in rng.uniform(0, s, (2, 2))], fill=255, width=width)
    elif kind == 1:
        draw.line([tuple(p) for p in rng.uniform(0, s, (int(rng.integers(3, 6)), 2))], fill=255, width=width)
    else:  # an arc well short of a full circle, so it is never a ring
        cx, cy = rng.uniform(0, s, 2)
        r = rng.uniform(0.05, 0.3) * s
        start = rng.uniform(0, 360)
        draw.arc((cx - r, cy - r, cx + r, cy + r), start, start + rng.uniform(40, 220), fill=255, width=width)
    _blend(canvas, np.asarray(mask, dtype=np.float32) / 255, rng.uniform(0, 255, 3), mask.getbbox())


def _blend(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray, box: tuple[int, int, int, int] | None) -> None:
    """Paint ``colour`` over ``canvas`` with opacity ``alpha``, touching only ``box`` (x0, y0, x1, y1)."""
    if box is None:
        return
    x0, y0, x1, y1 = box
    a = alpha[y0:y1, x0:x1, None]
    canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1 - a) + colour * a


def _place(
    rng: np.random.Generator, imgsz: int, owner: np.ndarray, areas: list[int], tries: int = 20
) -> tuple[int, tuple[int, int], np.ndarray, np.ndarray] | None:
    """Return a shape that hides no earlier object too much, or None after ``tries`` misses.

    The shape comes as (class, (x0, y0) of its patch in output pixels, supersampled
    alpha patch, output-size alpha patch).
    """
    s = imgsz * SUPERSAMPLE
    lo, hi = max(8.0, 0.06 * imgsz), 0.45 * imgsz  # object size in output pixels: log-uniform, many small ones
    shown = np.bincount(owner[owner >= 0], minlength=len(areas))  # pixels each earlier object shows now
    for _ in range(tries):
        cls = int(rng.integers(len(NAMES)))
        size = math.exp(rng.uniform(math.log(lo), math.log(hi))) * SUPERSAMPLE
        margin = size / 2 + SUPERSAMPLE
        cx, cy = rng.uniform(margin, s - margin, 2)
        mask = Image.new("L", (s, s))
        _SHAPES[NAMES[cls]](ImageDraw.Draw(mask), cx, cy, size / 2, rng.uniform(0, 2 * math.pi))
        box = mask.getbbox()
        if box is None:
            continue
        x0, y0 = box[0] // SUPERSAMPLE, box[1] // SUPERSAMPLE
        x1, y1 = -(-box[2] // SUPERSAMPLE), -(-box[3] // SUPERSAMPLE)
        alpha_hi = np.asarray(mask.crop((x0 * SUPERSAMPLE, y0 * SUPERSAMPLE, x1 * SUPERSAMPLE, y1 * SUPERSAMPLE)),
                              dtype=np.float32) / 255
        alpha = alpha_hi.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
        covered = alpha > 0.5
        if not covered.any():
            continue
        under = owner[y0:y1, x0:x1][covered]
        hidden = np.bincount(under[under >= 0], minlength=len(areas))  # pixels of each earlier object it covers
        if all(shown[j] - hidden[j] >= MIN_VISIBLE * areas[j] for j in range(len(areas))):
            return cls, (x0, y0), alpha_hi, alpha
    return None


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Return the (x0, y0, x1, y1) box of a boolean mask's true pixels, or None if it has none."""
    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else None


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray, tries: int = 10) -> np.ndarray:
    """Return a random colour that differs clearly from the colour ``under`` it (the last try if none does)."""
    for _ in range(tries):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - under) > 80:
            break
    return colour


def _polygon(draw: ImageDraw.ImageDraw, cx: float, cy: float, radii: list[float], angles: list[float], rot: float):
    pts = [(cx + r * math.cos(a + rot), cy + r * math.sin(a + rot)) for r, a in zip(radii, angles, strict=True)]
    draw.polygon(pts, fill=255)


def _circle(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, rot: float) -> None:
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)


def _square(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, rot: float) -> None:
    _polygon(draw, cx, cy, [r] * 4, [math.pi / 4 + k * math.pi / 2 for k in range(4)], rot)


def _triangle(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, rot: float) -> None:
    _polygon(draw, cx, cy, [r] * 3, [k * 2 * math.pi / 3 for k in range(3)], rot)


def _ring(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, rot: float) -> None:
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=max(SUPERSAMPLE, round(0.35 * r)))


def _cross(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, rot: float) -> None:
    t = 0.33 * r  # half the bar thickness
    corners = [(t, r), (t, t), (r, t), (r, -t), (t, -t), (t, -r), (-t, -r), (-t, -t), (-r, -t), (-r, t), (-t, t),
               (-t, r)]
    _polygon(draw, cx, cy, [math.hypot(x, y) for x, y in corners], [math.atan2(y, x) for x, y in corners], rot)


def _star(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, rot: float) -> None:
    _polygon(draw, cx, cy, [r if k % 2 == 0 else 0.42 * r for k in range(10)], [k * math.pi / 5 for k in range(10)],
             rot)


_SHAPES = {"circle": _circle, "square": _square, "triangle": _triangle, "ring": _ring, "cross": _cross, "star": _star}


def check_data_yaml(path: str | Path) -> dict[str, Any]:
    """Return the parsed data yaml of a YOLO detection dataset, with ``train``/``val`` resolved, after checking it.

    Raises ``YoloPruneError`` naming the problem and its fix for: a missing file,
    malformed yaml, missing ``names``, missing ``train``/``val`` keys or folders,
    splits without images, and label files that are missing or empty for a whole split.
    The dataset root is resolved as Ultralytics does: ``path`` if absolute, else
    relative to the current directory if that exists, else to Ultralytics'
    ``datasets_dir``; without ``path``, the yaml's own folder.
    """
    file = Path(path)
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "no such file"
        raise YoloPruneError(f"{file}: {what}; pass a dataset yaml with path, train, val and names "
                             "(yoloprune.data.make_dataset writes one)")
    try:
        data = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise YoloPruneError(f"{file}: not valid YAML{at}; fix the syntax (keys path, train, val, names)") from e
    if not isinstance(data, dict):
        raise YoloPruneError(f"{file}: holds a {type(data).__name__}, not a mapping; write keys path, train, val "
                             "and names")
    data["names"] = _names(file, data)
    data["nc"] = len(data["names"])

    root = _root(file, data.get("path"))
    for split in ("train", "val"):
        if not data.get(split):
            raise YoloPruneError(f"{file}: no '{split}:' key; add '{split}: images/{split}' (a folder of images "
                                 f"relative to path: {root})")
        images = _images(file, root, split, data[split])
        if not images:
            raise YoloPruneError(f"{file}: {split} has no images (looked in {_show(root, data[split])}); "
                                 f"put .jpg or .png images there, or fix '{split}:'")
        if not any(_has_labels(img) for img in images):
            raise YoloPruneError(f"{file}: every {split} label file is missing or empty (expected "
                                 f"{_label_of(images[0])} and its siblings); write one 'class x y w h' line per "
                                 "object, normalised to 0-1")
        sources = [str(p) for p in _split_sources(root, data[split])]
        data[split] = sources if isinstance(data[split], list) else sources[0]
    data["path"] = str(root)
    return data


def _names(file: Path, data: dict) -> dict[int, str]:
    names = data.get("names")
    if names is None:
        nc = data.get("nc")
        if isinstance(nc, int) and not isinstance(nc, bool) and nc > 0:
            return {i: f"class_{i}" for i in range(nc)}
        raise YoloPruneError(f"{file}: no 'names:' key; list the class names, e.g. 'names: [cat, dog]' or "
                             "'names: {0: cat, 1: dog}'")
    if isinstance(names, list) and names:
        return {i: str(n) for i, n in enumerate(names)}
    if isinstance(names, dict) and names and all(isinstance(k, int) for k in names):
        if sorted(names) != list(range(len(names))):
            raise YoloPruneError(f"{file}: names keys are {sorted(names)}; number the classes 0..{len(names) - 1} "
                                 "without gaps")
        return {int(k): str(v) for k, v in sorted(names.items())}
    raise YoloPruneError(f"{file}: 'names:' is {names!r}; list the class names, e.g. 'names: [cat, dog]' or "
                         "'names: {0: cat, 1: dog}'")


def _root(file: Path, path: Any) -> Path:
    if path is None or path == "":
        return file.parent.resolve()
    root = Path(str(path)).expanduser()
    if not root.is_absolute():
        if root.exists():
            return root.resolve()
        from ultralytics.utils import DATASETS_DIR

        root = (DATASETS_DIR / root).resolve()
    if not root.is_dir():
        raise YoloPruneError(f"{file}: path: {path} is not a folder (resolved to {root}); set path to the dataset's "
                             "absolute folder (a relative path is read from the current directory, not the yaml's)")
    return root


def _split_sources(root: Path, entry: Any) -> list[Path]:
    return [(root / str(e)).resolve() for e in (entry if isinstance(entry, list) else [entry])]


def _show(root: Path, entry: Any) -> str:
    return ", ".join(str(p) for p in _split_sources(root, entry))


def _images(file: Path, root: Path, split: str, entry: Any) -> list[Path]:
    """Return the image files of one split: folders are searched recursively, .txt files list one image a line."""
    images: list[Path] = []
    for src in _split_sources(root, entry):
        if src.is_dir():
            images += sorted(p for p in src.rglob("*") if p.suffix.lower() in IMG_SUFFIXES and p.is_file())
        elif src.is_file() and src.suffix == ".txt":
            lines = [ln.strip() for ln in src.read_text(errors="replace").splitlines() if ln.strip()]
            images += [(src.parent / ln).resolve() if not Path(ln).is_absolute() else Path(ln) for ln in lines]
        else:
            raise YoloPruneError(f"{file}: {split} folder {src} does not exist; create it or fix '{split}:' "
                                 f"(relative to path: {root})")
    return images


def _label_of(image: Path) -> Path:
    # Ultralytics' rule (ultralytics.data.utils.img2label_paths): the last /images/ becomes /labels/.
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    head, sep, tail = str(image).rpartition(sa)
    return Path((head + sb + tail) if sep else str(image)).with_suffix(".txt")


def _has_labels(image: Path) -> bool:
    label = _label_of(image)
    return label.is_file() and label.stat().st_size > 0 and bool(label.read_text(errors="replace").strip())
