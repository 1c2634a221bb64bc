"""Training curves: Ultralytics' results.csv read one row per epoch, and how far a curve still rose at its end."""

from __future__ import annotations

import math

import pytest

from yoloprune.curves import MAP_COLUMN, map_curve, read_results, results_text, tail_gain
from yoloprune.errors import YoloPruneError

# As Ultralytics 8.4 writes it (no padding), plus what a resumed run and a failed validation leave behind.
RESULTS = """\
epoch,time,train/box_loss,metrics/mAP50-95(B),lr/pg0
1,12.1,4.4,0.1,0.001
2,24.7,3.8,0.2,0.001
3,37.0,3.5,0.25,0.001
3,38.2,3.4,0.3,0.001
4,50.0,3.3,,0.001
5,62.0,3.2,nan,0.001
"""


def test_read_results_keeps_one_row_per_epoch_the_last(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text(RESULTS)
    rows = read_results(path)
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4", "5"]  # epoch 3 ran twice (killed, then resumed)
    assert rows[2]["time"] == "38.2"  # the resumed run's row, whose weights the run went on from
    curve = map_curve(rows)
    assert curve[:3] == (0.1, 0.2, 0.3) and math.isnan(curve[3]) and math.isnan(curve[4])  # blank and nan: NaN
    assert map_curve(rows, "metrics/mAP50-95(M)") == ()  # a column the run has not: no curve


def test_read_results_strips_padded_headers(tmp_path):
    path = tmp_path / "results.csv"  # older Ultralytics releases padded names and values to fixed widths
    path.write_text("      epoch,  metrics/mAP50-95(B)\n          1,      0.5\n          2,      0.6\n")
    assert map_curve(read_results(path)) == (0.5, 0.6)


def test_results_text_round_trips(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text(RESULTS)
    rows = read_results(path)
    again = tmp_path / "again.csv"
    again.write_text(results_text(rows))
    assert read_results(again) == rows and again.read_text().count("\n3,") == 1
    assert results_text([]) == f"epoch,{MAP_COLUMN}\n"  # no training: the header a plot can read


def test_tail_gain_compares_the_last_window_with_the_one_before():
    rising = [0.1 * i for i in range(20)]
    assert tail_gain(rising, window=10) == pytest.approx(1.0)  # each of the last ten is ten steps of 0.1 later
    flat = [0.5, 0.52, 0.49, 0.51, 0.48] * 4  # jitter around a plateau
    assert tail_gain(flat) == pytest.approx(0.0, abs=1e-12)  # the default window: 10 epochs
    assert tail_gain([0.0, 0.2, 0.3, 0.3, 0.3], window=2) == pytest.approx(0.3 - 0.25)  # older values are ignored
    assert tail_gain(rising[:19], window=10) is None  # too short to tell
    assert tail_gain([math.nan, *rising[1:]], window=10) is None  # a failed validation in the windows
    assert tail_gain([math.nan, *rising], window=10) == pytest.approx(1.0)  # ... but not before them
    with pytest.raises(YoloPruneError, match="window"):
        tail_gain(rising, window=0)
