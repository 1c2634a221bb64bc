"""Training curves: Ultralytics' per-epoch ``results.csv``, read once per epoch, and how far it still rose at its end.

Light on purpose (csv and math only): the study's report reads these figures without
loading a trainer.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

from yoloprune.errors import YoloPruneError

MAP_COLUMN = "metrics/mAP50-95(B)"  # results.csv's column of box mAP50-95
TAIL_WINDOW = 10  # epochs: tail_gain compares the mean of the last ones with the mean of as many before


def read_results(path: str | Path) -> list[dict[str, str]]:
    """Return the rows of an Ultralytics ``results.csv``, one per epoch in epoch order, header names stripped.

    A run killed after writing an epoch's row but before saving ``last.pt`` trains that
    epoch again when resumed and appends a second row for it: the later row (the one the
    finished run's weights come from) wins.
    """
    with open(path, newline="") as f:
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(f)]
    by_epoch: dict[int, dict[str, str]] = {}
    for i, row in enumerate(rows):
        try:
            epoch = int(float(row.get("epoch", "")))
        except ValueError:
            epoch = i + 1  # no epoch column: rows are epochs in order
        by_epoch[epoch] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def results_text(rows: Sequence[dict[str, str]]) -> str:
    """Return ``rows`` (as ``read_results`` gives them) as CSV text, for a copy with one row per epoch."""
    if not rows:
        return f"epoch,{MAP_COLUMN}\n"
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def map_curve(rows: Sequence[dict[str, str]], column: str = MAP_COLUMN) -> tuple[float, ...]:
    """Return ``column`` of each epoch's row as floats (NaN where blank); empty when the run has no such column."""
    if not rows or column not in rows[0]:
        return ()

    def value(text: str | None) -> float:
        try:
            return float(text) if text else math.nan
        except ValueError:
            return math.nan
    return tuple(value(r.get(column)) for r in rows)


def tail_gain(curve: Sequence[float], window: int = TAIL_WINDOW) -> float | None:
    """Return how far a training curve still rose at its end: the mean of its last ``window`` values minus the
    mean of the ``window`` before them; None with fewer than ``2 * window`` values or a NaN among them.

    Means, not single epochs, so one lucky validation does not decide it. Near zero the
    curve had flattened. With Ultralytics' learning rate decaying to the last epoch, the
    end flattens partly by the schedule: a longer run can still gain (the study's budget
    probe measures that).
    """
    if window < 1:
        raise YoloPruneError(f"window must be a positive number of epochs, got {window!r}")
    tail = list(curve[-2 * window:])
    if len(tail) < 2 * window or any(math.isnan(v) for v in tail):
        return None
    return float(sum(tail[window:]) / window - sum(tail[:window]) / window)
