# Two commands on a fresh machine: `make run` (the main job) and `make test` (the test suite).
# Each creates .venv and installs everything it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run demo test test-all review study clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,pipeline]'
	touch $(STAMP)

setup: $(STAMP)

# The DVC pipeline on the embedded default (synthetic data, yolov8n trained from its yaml); stages call `python`,
# so the venv goes first on PATH.
run: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

demo: setup
	$(BIN)/yoloprune prune yolov8n.yaml --speed-up 2 -o yolov8n-pruned.pt --report yolov8n-pruned.json

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

# Pull-request markdown: `dvc params diff` and `dvc metrics diff` of REV (default: the workspace) against BASE;
# each a branch, tag, commit or experiment name. `make -s review BASE=main > review.md` keeps make's output out.
BASE ?= main
REV ?=
review: setup
	@$(BIN)/python -m tools.review --base $(BASE) $(if $(REV),--head $(REV))

# The measured study (docs/results.md, its plot and docs/study/experiments.csv): the sweep of DVC experiments in
# tools/study.py (per generation and baseline seed: 2x at 10 fine-tune epochs and 3x at 20; for seed 0 also 3x at
# 10, the latency target at 2x, and cwd distillation at 2x and at 3x), queued, run two at a time (each queued once its baseline is
# trained; latency-target runs one at a time, as they time the network while pruning), then every run timed alone
# against its baseline, then the report; each run's equal-budget control is the pipeline's control stage.
# Run again, it skips what is done. `python -m tools.study plan` prints the queue commands; `python -m tools.study
# report --csv docs/study/experiments.csv` redraws the report from the committed table without running anything.
study: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m tools.study run
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m tools.study latency
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m tools.study report

clean:
	rm -rf $(VENV) .pytest_cache
