# Two entry points, both from nothing on a fresh machine:
#   make demo   the whole tiny pipeline on this machine (runs/demo/)
#   make test   the test suite, with a real local SLURM cluster started for it and stopped after
#   make gpu-check   the GPU checks (tools/gpu_check.py): one JSON; says so and exits 0 without a GPU
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SLURM_STATE ?= /tmp/sdtt-slurm
PYTEST_ARGS ?= --durations=25
export OMP_NUM_THREADS ?= 1
# DeepSpeed's CPU accelerator only where there is no NVIDIA GPU: on a GPU machine DeepSpeed must pick
# CUDA itself (a cpu accelerator there fails against the NCCL/cuda process group).
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAVE_GPU),)
export DS_ACCELERATOR ?= cpu
endif

.PHONY: demo text-demo test test-fast lint venv slurm-up slurm-down clean gpu-check

venv: $(STAMP)

# torch first and pinned: 2.13.0 is the tested CPU build, and installing it before anything that
# depends on torch keeps pip from pulling a multi-GB CUDA wheel. Everything else at the versions of
# the tested environment (constraints.txt; pyproject.toml holds the ranges).
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/python tools/submit.py --config configs/tiny.yaml --local --run-dir runs/demo

# A small text pipeline (configs/tiny-text.yaml) on the Python standard library's own sources, with a
# BPE tokenizer trained on them (runs/tiny-text/report.md): 24.5 minutes on 2 cores shared with the test suite
# at e6b848d (docs/results/tiny-text.md).
STDLIB = $(shell $(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
text-demo: $(STAMP)
	$(BIN)/python tools/train_tokenizer.py --out runs/tiny-text-tokenizer --vocab-size 4096 '$(STDLIB)/*.py'
	$(BIN)/python tools/submit.py --config configs/tiny-text.yaml --local --run-dir runs/tiny-text \
	  'data.paths=[$(STDLIB)/*.py]' data.tokenizer=$(CURDIR)/runs/tiny-text-tokenizer

test: $(STAMP) lint
	bash cluster/local/up.sh $(SLURM_STATE)
	source $(SLURM_STATE)/env.sh && SDTT_SLURM_STATE=$(SLURM_STATE) $(BIN)/pytest $(PYTEST_ARGS); \
	  rc=$$?; bash cluster/local/down.sh $(SLURM_STATE); exit $$rc

# The inner loop: unit tests only (no torchrun, no SLURM), well under 3 minutes.
test-fast: $(STAMP) lint
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

# On a GPU machine, under 8 minutes: the tiny pipeline on one GPU, small-shape pretrain/distill steps
# with MFU, student@16 vs AR+KV sampling at L=1024, the targets benchmark -> runs/gpu-check/gpu_check.json.
gpu-check: $(STAMP)
	$(BIN)/python tools/gpu_check.py --out runs/gpu-check/gpu_check.json

lint: $(STAMP)
	$(BIN)/ruff check trainer cluster tools tests

slurm-up:
	bash cluster/local/up.sh $(SLURM_STATE)

slurm-down:
	bash cluster/local/down.sh $(SLURM_STATE)

clean:
	rm -rf $(VENV) runs build *.egg-info
