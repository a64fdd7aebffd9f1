# Two entry points, both from nothing on a fresh machine:
#   make demo   the whole tiny pipeline on this machine (runs/demo/)
#   make test   the test suite, with a real local SLURM cluster started for it and stopped after
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SLURM_STATE ?= /tmp/sdtt-slurm
PYTEST_ARGS ?=
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= cpu

.PHONY: demo test test-fast lint venv slurm-up slurm-down clean

venv: $(STAMP)

# torch first and pinned: 2.13.0 is the tested CPU build, and installing it before anything that
# depends on torch keeps pip from pulling a multi-GB CUDA wheel.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/python tools/submit.py --config configs/tiny.yaml --local --run-dir runs/demo

test: $(STAMP) lint
	bash cluster/local/up.sh $(SLURM_STATE)
	source $(SLURM_STATE)/env.sh && SDTT_SLURM_STATE=$(SLURM_STATE) $(BIN)/pytest $(PYTEST_ARGS); \
	  rc=$$?; bash cluster/local/down.sh $(SLURM_STATE); exit $$rc

# The inner loop: unit tests only (no torchrun, no SLURM), well under 3 minutes.
test-fast: $(STAMP) lint
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check trainer cluster tools tests

slurm-up:
	bash cluster/local/up.sh $(SLURM_STATE)

slurm-down:
	bash cluster/local/down.sh $(SLURM_STATE)

clean:
	rm -rf $(VENV) runs build *.egg-info
