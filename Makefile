# Two commands on a fresh machine: `make run` (the main job) and `make test` (the test suite).
# Each creates .venv and installs everything it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run demo test test-all review study study-probe clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
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
	@$(BIN)/python -m yoloprune.review --base $(BASE) $(if $(REV),--head $(REV))

# The measured study (docs/results.md and its plot): the sweep of DVC experiments in yoloprune/study.py, queued, run
# by two background queue workers (one training thread each; an experiment is queued once its baseline is trained),
# then the equal-budget controls and the report. Resumable: after an interruption (Ctrl-C leaves the workers
# running) `make study` again skips what is queued or done and waits for the rest; `dvc queue stop --kill` stops
# them. `python -m yoloprune.study plan` lists the experiments, runs nothing.
study: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m yoloprune.study queue
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m yoloprune.study run
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m yoloprune.study control
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m yoloprune.study report

# The probes, checks on the study itself: each generation's 2x experiment again with its baseline trained half as long
# and a control on it (the report's "Baseline budget"), seed replicates of each generation's 2x experiment ("Run-to-run
# spread": the noise `python -m yoloprune.study compare` holds two runs against) and the 3x remedy for yolo11n and
# yolo26n ("Remedy tried"); then the report. Not part of `make study`, which has to fit in 180 minutes on
# a 2-core CPU (their baselines cost as much as the sweep's); resumable alike.
study-probe: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m yoloprune.study --probe queue
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m yoloprune.study --probe run
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m yoloprune.study --probe control
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m yoloprune.study report

clean:
	rm -rf $(VENV) .pytest_cache
