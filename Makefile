# satconv: build the book and run the tests.  See README.md and ../shared/docs/toolchain.md.
#
#   make book      install, execute the chapters (cached) and build _build/html; fails on any warning
#   make test      unit tests, strict nbval on chapters/*.ipynb (per CPU kernel set), the book, the browser test
#   make sync      jupytext --sync chapters/*.py, then re-execute each paired .ipynb in place (CPU);
#                  CHAPTERS="chapters/a.py" limits it to some chapters
#   make gpu-runs RUNS="paper_resnet18:42:300 paper_quadratic:43:300" GPU_DATA=/path/to/images
#                  papermill chapters/train.ipynb per config into book/runs/<stem>.ipynb and its artifacts into
#                  book/runs/<stem>/ (checkpoints removed); on the GPU machine, with the python found on PATH
#   make gpu-bench GPU_DATA=/path/to/images   the cost and engineering chapters' GPU figures into book/bench/
#
# Plain pip only (never uv: it ignores the build machines' local wheels and torch cap).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Recipes find the venv's tools (jupyter-book, papermill, the python3 kernel) first.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1

CHAPTERS_PY := $(sort $(wildcard chapters/*.py))
# `make sync CHAPTERS="chapters/intro.py"` syncs and re-executes only those chapters.
CHAPTERS ?= $(CHAPTERS_PY)
CHAPTERS_NB := $(sort $(wildcard chapters/*.ipynb))
STAMP := $(VENV)/.installed
VENDOR := _static_vendor/widgets/embed-amd.js
# gpu-runs: config:seed:epochs[:key=value,...] per run, the image-folder root of the data ("" = the
# config's own source), the overrides of every run, and where the runner keeps its runs (git-ignored)
RUNS ?=
GPU_DATA ?=
GPU_OVERRIDES ?= train.precision=bf16 train.compile=true train.eval_batch_size=100
GPU_RUNS_DIR ?= runs/gpu
PACKAGE_SRC := $(shell find satconv -name '*.py' 2>/dev/null)
EXEC_STAMP := _build/.satconv-sources.stamp
NBVAL_SANITIZE := nbval_sanitize.cfg

# pytest exits 5 when it collects nothing; that is not a failure here, but say so.
# usage: $(call pytest_ok5,<pytest arguments>)
define pytest_ok5
rc=0; $(BIN)/pytest $(1) || rc=$$?; \
if [ $$rc -eq 5 ]; then echo "note: no tests collected by: pytest $(1)"; elif [ $$rc -ne 0 ]; then exit $$rc; fi
endef

.PHONY: help setup vendor chromium unit nbval book browser test sync gpu-runs gpu-test gpu-bench gpu-bench-speed gpu-bench-routes gpu-bench-graphs gpu-bench-tuning gpu-bench-scale gpu-bench-kernels gpu-bench-fused clean clean-all

help:
	@sed -n '2,10p' Makefile | sed 's/^# \{0,1\}//'

## --- setup --------------------------------------------------------------------------------------
setup: $(STAMP)

# Re-installs only when requirements.txt or pyproject.toml change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt -e .
	touch $@

# The ipywidgets HTML manager, require.js and MathJax 3, exact versions from package-lock.json,
# copied into _static_vendor/ (git-ignored; html_static_path in _config.yml).
vendor: $(VENDOR)

$(VENDOR): package.json package-lock.json
	npm ci --no-audit --no-fund --ignore-scripts
	rm -rf _static_vendor
	mkdir -p _static_vendor/widgets _static_vendor/mathjax
	cp node_modules/requirejs/require.js _static_vendor/widgets/
	cp node_modules/@jupyter-widgets/html-manager/dist/embed-amd.js _static_vendor/widgets/
	cp node_modules/@jupyter-widgets/html-manager/dist/*.{woff,woff2,ttf,eot,svg} _static_vendor/widgets/
	cp node_modules/mathjax/es5/tex-svg.js _static_vendor/mathjax/

# The system Chromium drives the browser test (never `playwright install`: its CDN is unreachable).
chromium:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get update; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	fi

## --- tests --------------------------------------------------------------------------------------
unit: setup
	$(call pytest_ok5,tests -m "not browser")

# Strict nbval: every stored output must be reproduced (sanitized by nbval_sanitize.cfg), on any CPU.
# Round-off depends on the CPU's kernels: glued float errors that passed on the machine that executed the
# chapters failed on another one (issue 17). So nbval runs once per entry of NBVAL_CAPABILITIES, each pass
# forcing PyTorch's CPU kernels to one vector width (ATEN_CPU_CAPABILITY) and capping the libraries' to match
# (NBVAL_ENV_<capability>; the caps are ceilings, so harmless on any CPU, and ignored where the library is
# absent, as on arm64):
#   default  PyTorch's scalar kernels and MKL's compatible code path (oneDNN is left alone: capped at
#            SSE4.1 it made the engineering appendix's bf16 activation count minutes slower)
#   avx2     an AVX2 machine throughout: PyTorch's AVX2 kernels, MKL and oneDNN at AVX2 (oneDNN's path
#            changes the visualise chapter's CPU stand-ins; its bf16 kernels are slow without AVX-512)
# Neither is the AVX-512 path that executes the committed notebooks on the build machines, and they round
# differently from each other, as a fresh clone on another x86-64 or arm64 CPU does. Every pass checks every
# chapter: the CPU-dependent outputs are not confined to the numerical chapters (visualise trains its CPU
# stand-ins and prints their scores, train and the engineering appendix compute on the CPU), a list of chapters would have to
# be kept up to date by hand, and the two passes take about 4 and 7 minutes here (2 CPUs), so `make test`
# stays well within CI's 90 minutes. Each pass first removes the visualise chapter's stand-in runs
# (_build/visualise_runs, which it trains on first use and reuses after), so that it trains them under its
# own kernels, as a fresh clone does. A capability this CPU lacks is skipped with a note: PyTorch obeys
# ATEN_CPU_CAPABILITY=avx2 or avx512 without checking the CPU (those kernels would stop at an illegal
# instruction), and an arm64 build warns about the unknown value into the chapters' outputs.
NBVAL_CAPABILITIES ?= default avx2
NBVAL_ENV_default := ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE
NBVAL_ENV_avx2 := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
NBVAL_ENV_avx512 := ATEN_CPU_CAPABILITY=avx512
NBVAL_ARGS = --nbval $(CHAPTERS_NB) --nbval-sanitize-with $(NBVAL_SANITIZE) -p no:cacheprovider

# one pass of strict nbval under capability $(1), if this CPU ($$native, set by the recipe) has it
define nbval_pass
$(if $(NBVAL_ENV_$(1)),,$(error NBVAL_CAPABILITIES: unknown capability '$(1)' (known: default avx2 avx512)))\
case "$(1)/$$native" in \
  default/*|avx2/avx2|avx2/avx512|avx512/avx512) \
    echo "strict nbval, pass $(1): $(NBVAL_ENV_$(1))"; rm -rf _build/visualise_runs; \
    (export $(NBVAL_ENV_$(1)); $(call pytest_ok5,$(NBVAL_ARGS)));; \
  *) echo "note: no strict nbval pass $(1): this CPU's PyTorch kernels go up to $$native";; \
esac;
endef

nbval: setup
ifeq ($(CHAPTERS_NB),)
	@echo "note: no chapters/*.ipynb to check"
else
	@native="$$(env -u ATEN_CPU_CAPABILITY $(BIN)/python -c \
	  'import torch; print(torch.backends.cpu.get_cpu_capability().lower())')"; \
	$(foreach cap,$(NBVAL_CAPABILITIES),$(call nbval_pass,$(cap)))
endif

# --all: a fresh Sphinx environment every time, otherwise an incremental build would not repeat the
# warnings of unchanged pages and -W would pass after a failed build. Executions stay cached in
# _build/.jupyter_cache (keyed on each chapter's code); that cache is dropped whenever the package
# or the pins change, so chapters always show what the current satconv computes.
book: setup vendor $(EXEC_STAMP)
	$(BIN)/jupyter-book build . -W -n --keep-going --all

$(EXEC_STAMP): $(PACKAGE_SRC) requirements.txt
	rm -rf _build/.jupyter_cache
	mkdir -p $(@D)
	touch $@

browser: book chromium
	SATCONV_REQUIRE_BROWSER=1 $(BIN)/pytest tests/test_book_browser.py -m browser

test: unit nbval book browser

## --- notebooks ----------------------------------------------------------------------------------
# Pair and re-execute the chapters so the committed .ipynb carry real outputs for nbval.
sync: setup
	$(BIN)/jupytext --sync $(CHAPTERS)
	for nb in $(CHAPTERS:.py=.ipynb); do \
	  echo "executing $$nb"; \
	  $(BIN)/jupyter execute --inplace --timeout=600 --kernel_name=python3 "$$nb"; \
	done

# On the GPU machine: one executed training notebook per run (satconv.campaign: one run at a time, each
# resumed if it was stopped, checkpoints removed, page titled by config, seed and schedule), then the
# finished runs installed into book/runs/, rendered by the book as they are. Uses papermill from the
# python on PATH (the venv's when there is one).
gpu-runs:
	@test -n "$(strip $(RUNS))" || { echo 'usage: make gpu-runs RUNS="paper_resnet18:42:300 ..." GPU_DATA=DIR'; exit 2; }
	$(PYTHON) -m satconv.campaign run --data "$(GPU_DATA)" --out $(GPU_RUNS_DIR) --overrides "$(GPU_OVERRIDES)" $(RUNS)
	$(PYTHON) -m satconv.campaign pack --out $(GPU_RUNS_DIR) $(GPU_RUNS_DIR)/finished.tar.gz
	$(PYTHON) -m satconv.campaign install --replace $(GPU_RUNS_DIR)/finished.tar.gz

# On the GPU machine, before any figure: the unit tests there, where the CUDA-only ones run (bf16 and
# compile tolerances, the sdpa route's fused kernel, the whole-step CUDA graph against eager steps, the
# input pipeline without host waits); -rs lists any that still skipped.
gpu-test:
	$(PYTHON) -m pytest -q -rs -p no:cacheprovider tests -m "not browser"

# The GPU figures of the cost chapter and the engineering appendix (book/bench/<BENCH_TAG>*.jsonl), on the GPU machine:
#   make gpu-bench GPU_DATA=/path/to/cifar10-images    (GPU_DATA empty: whole epochs on generated images)
BENCH_TAG ?= h200
BENCH_OUT = book/bench/$(BENCH_TAG)
ATTN_CONFIGS ?= configs/paper_learned_content.yaml configs/paper_learned.yaml configs/paper_quadratic.yaml configs/re_vit.yaml
CONV_CONFIGS ?= configs/paper_resnet18.yaml
# ResNet18 is launch-bound: its config captures the whole training step as one CUDA graph
# (train.step_graph), which measured faster on the H200 than reduce-overhead's graphs of the model alone
CONV_OPTS ?= --compile --channels-last
SCALE_CONFIGS ?= configs/paper_quadratic.yaml configs/paper_learned.yaml configs/paper_learned_content.yaml \
  configs/re_san_pairwise.yaml configs/sasa.yaml configs/fcvit.yaml
BENCH = $(PYTHON) -m satconv bench --precision bf16
# the content models whose attention takes the folded dense route (train.attention_route applies), and
# the position-only ones whose probabilities are shared by the batch (train.shared_route applies)
ROUTED_CONFIGS ?= configs/paper_learned_content.yaml configs/re_vit.yaml
SHARED_CONFIGS ?= configs/paper_learned.yaml configs/paper_quadratic.yaml
# near the memory limit a fragmented cache fails where the search succeeded: grow segments instead
MAX_ALLOC = PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
gpu-bench: gpu-bench-speed gpu-bench-routes gpu-bench-graphs gpu-bench-tuning gpu-bench-scale gpu-bench-kernels gpu-bench-fused

# each half fits one 10-minute call on the GPU machine
gpu-bench-speed:
	mkdir -p book/bench
	rm -f $(BENCH_OUT).jsonl $(BENCH_OUT)_maxbatch.jsonl
	$(BENCH) --config $(ATTN_CONFIGS) --batch 100 --compile reduce-overhead --out $(BENCH_OUT).jsonl
	$(BENCH) --config $(CONV_CONFIGS) --batch 100 $(CONV_OPTS) --out $(BENCH_OUT).jsonl
	$(BENCH) --config $(CONV_CONFIGS) --batch 100 --compile reduce-overhead --channels-last --train-only \
	  --set train.step_graph=false --out $(BENCH_OUT).jsonl
	$(BENCH) --config configs/re_san_pairwise.yaml configs/re_san_patchwise.yaml configs/sasa.yaml configs/fcvit.yaml \
	  --batch 100 --out $(BENCH_OUT).jsonl
	$(MAX_ALLOC) $(BENCH) --config $(ATTN_CONFIGS) $(CONV_CONFIGS) --batch max --out $(BENCH_OUT)_maxbatch.jsonl

# the whole training step as one CUDA graph (train.step_graph), next to the reduce-overhead rows (appends)
gpu-bench-graphs:
	$(BENCH) --config $(ATTN_CONFIGS) --batch 100 --compile --set train.step_graph=true --train-only \
	  --out $(BENCH_OUT).jsonl

# inductor's coordinate-descent tuning of its generated kernels (the softmax and normalisation
# reductions), next to the default rows (appends; rows record the switch under "inductor")
gpu-bench-tuning:
	TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 $(BENCH) --config $(ATTN_CONFIGS) --batch 100 \
	  --compile reduce-overhead --train-only --out $(BENCH_OUT).jsonl

# the other routes, next to the default rows (appends; after gpu-bench-speed): the fused attention of the
# routed configs (also at the largest batch, where its memory matters) and the batched shared-probability GEMM
gpu-bench-routes:
	$(BENCH) --config $(SHARED_CONFIGS) --batch 100 --compile reduce-overhead --set train.shared_route=bmm \
	  --train-only --out $(BENCH_OUT).jsonl
	$(BENCH) --config $(SHARED_CONFIGS) --batch 100 --compile reduce-overhead --set train.shared_route=wfirst \
	  --train-only --out $(BENCH_OUT).jsonl
	$(BENCH) --config $(SHARED_CONFIGS) --batch 100 --compile reduce-overhead --set train.shared_route=einsum \
	  --train-only --out $(BENCH_OUT).jsonl
	$(BENCH) --config $(ROUTED_CONFIGS) --batch 100 --compile reduce-overhead --set train.attention_route=sdpa \
	  --out $(BENCH_OUT).jsonl
	$(BENCH) --config $(ROUTED_CONFIGS) --batch 100 --compile --set train.attention_route=sdpa \
	  --set train.step_graph=true --train-only --out $(BENCH_OUT).jsonl
	$(MAX_ALLOC) $(BENCH) --config $(ROUTED_CONFIGS) --batch max --set train.attention_route=sdpa \
	  --out $(BENCH_OUT)_maxbatch.jsonl

gpu-bench-scale:
	mkdir -p book/bench
	rm -f $(BENCH_OUT)_scaling.jsonl $(BENCH_OUT)_epochs.jsonl
	$(BENCH) --config $(SCALE_CONFIGS) --sides 16 32 64 --batch 100 --out $(BENCH_OUT)_scaling.jsonl
	$(BENCH) --config $(ATTN_CONFIGS) --epoch --compile reduce-overhead $(if $(GPU_DATA),--data $(GPU_DATA)) \
	  --out $(BENCH_OUT)_epochs.jsonl
	$(BENCH) --config $(CONV_CONFIGS) --epoch $(CONV_OPTS) \
	  $(if $(GPU_DATA),--data $(GPU_DATA)) --out $(BENCH_OUT)_epochs.jsonl

# the fused softmax-dropout kernels (satconv.attention.fused) of the content attention: rows without either,
# with the backward one, with both (the default); then the launch-shape sweep behind fused.LAUNCH
FUSED_CONFIGS ?= configs/paper_learned_content.yaml configs/re_vit.yaml
gpu-bench-fused:
	mkdir -p book/bench
	rm -f $(BENCH_OUT)_fused.jsonl $(BENCH_OUT)_fused_launch.jsonl
	$(BENCH) --config $(FUSED_CONFIGS) --batch 100 --compile reduce-overhead --train-only --no-fused-forward \
	  --no-fused-backward --out $(BENCH_OUT)_fused.jsonl
	$(BENCH) --config $(FUSED_CONFIGS) --batch 100 --compile reduce-overhead --train-only --no-fused-forward \
	  --out $(BENCH_OUT)_fused.jsonl
	$(BENCH) --config $(FUSED_CONFIGS) --batch 100 --compile reduce-overhead --train-only --out $(BENCH_OUT)_fused.jsonl
	$(BENCH) --fused-launch --config $(FUSED_CONFIGS) --batch 100 --out $(BENCH_OUT)_fused_launch.jsonl

# where a training step's time goes (satconv.bench.kernels), batch 100, the same compile modes as gpu-bench-speed
gpu-bench-kernels:
	mkdir -p book/bench
	rm -f $(BENCH_OUT)_kernels.jsonl
	$(BENCH) --kernels --config $(ATTN_CONFIGS) --batch 100 --compile reduce-overhead --out $(BENCH_OUT)_kernels.jsonl
	$(BENCH) --kernels --config $(CONV_CONFIGS) --batch 100 $(CONV_OPTS) --out $(BENCH_OUT)_kernels.jsonl
	$(BENCH) --kernels --config $(ROUTED_CONFIGS) --batch 100 --compile reduce-overhead \
	  --set train.attention_route=sdpa --out $(BENCH_OUT)_kernels.jsonl

## --- cleaning -----------------------------------------------------------------------------------
clean:
	rm -rf _build

clean-all: clean
	rm -rf _static_vendor node_modules $(VENV)
