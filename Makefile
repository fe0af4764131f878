# DeepSeek-V4 pretraining framework — the commands a user types.
#   make pretrain   the main job: data pipeline on the bundled corpus, then the tiny V4 model on CPU
#   make test       the test suite (what CI runs through .ci/run)
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-stamp
# torch: CPU build unless a GPU is present (override with TORCH_SPEC=...)
HAVE_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAVE_GPU),1)
TORCH_SPEC ?= torch==2.13.0
else
TORCH_SPEC ?= torch==2.13.0+cpu
endif
CONFIG ?= tiny
NODES ?= 1
GPUS ?= 8
PYTEST_ARGS ?=
# what the formatter and the linter cover (settings: pyproject.toml)
LINT_PATHS ?= pretrain parallel data_pipeline ops tests benchmarks tools
RUFF := $(VENV)/bin/ruff
export OMP_NUM_THREADS ?= 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1

.PHONY: help setup test test-fast pretrain data lint format clean

help:
	@echo "make setup      create $(VENV) and install the pinned stack (idempotent)"
	@echo "make pretrain   data pipeline on the bundled corpus, then train the tiny V4 model on CPU"
	@echo "make test       run the whole test suite (CI runs exactly this)"
	@echo "make data       run only the data pipeline (CONFIG=$(CONFIG))"
	@echo "make lint       ruff format --check and ruff check (also the first step of make test)"
	@echo "make format     rewrite the code with ruff format and apply ruff check's safe fixes"
	@echo "make clean      remove runs, caches and $(VENV)"
	@echo "cluster launch: make slurm-pretrain|slurm-data|ray-up|ray-data|ray-down|dry-run (clusters/README.md)"

# setup is re-run only when the requirement files change (stamp file)
setup: $(STAMP)
$(STAMP): requirements.txt requirements-nodeps.txt Makefile
	@set -e; t0=$$(date +%s); \
	if [ ! -x $(PY) ]; then $(PYTHON_SYS) -m venv $(VENV); fi; \
	echo "[setup] installing $(TORCH_SPEC) first (never a CUDA build on CPU machines)"; \
	$(PIP) install -q "$(TORCH_SPEC)"; \
	echo "[setup] installing requirements.txt"; \
	sed -e 's|^torch==.*|$(TORCH_SPEC)|' requirements.txt > $(VENV)/requirements.resolved.txt; \
	DS_BUILD_OPS=0 $(PIP) install -q -r $(VENV)/requirements.resolved.txt; \
	echo "[setup] installing requirements-nodeps.txt (--no-deps, see the file)"; \
	$(PIP) install -q --no-deps --ignore-requires-python -r requirements-nodeps.txt; \
	$(PY) -c "import torch, megatron.core, deepspeed, ray, datasets, transformers, tokenizers; from data_pipeline.streaming_compat import import_streaming; import_streaming()" ; \
	touch $(STAMP); echo "[setup] done in $$(( $$(date +%s) - t0 )) s; venv $$(du -sh $(VENV) | cut -f1)"

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The main job: the tiny V4 model on CPU with 2 ranks (expert parallel). On first use the trainer runs the data
# pipeline on the bundled corpus into runs/data/$(CONFIG) (cached; safe when both ranks start at once).
# Override e.g. `make pretrain NPROC=1 ARGS="train.steps=50"`.
NPROC ?= 2
ARGS ?=
pretrain: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m pretrain --config $(CONFIG) \
	    parallel.ep=$(NPROC) $(ARGS)

# Only the data pipeline (ingest, clean, dedup, tokenizer, pack) on the bundled corpus.
data: setup
	$(PY) -m data_pipeline run --mixture data_pipeline/configs/default_mixture.yaml --output runs/data/default

lint: setup
	$(RUFF) format --check $(LINT_PATHS)
	$(RUFF) check $(LINT_PATHS)

format: setup
	$(RUFF) format $(LINT_PATHS)
	$(RUFF) check --fix $(LINT_PATHS)

clean:
	rm -rf runs .cache $(VENV) .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

include clusters/clusters.mk
