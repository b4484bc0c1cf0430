# Development tasks. `make example` and `make test` work on a CPU-only machine
# from a fresh clone: they create .venv with the pinned stack when it is missing.
# `make test-gpu` and `make benchmark` use the system python (a CUDA build of
# torch, with kernels/transformers/peft/bitsandbytes installed) and no venv.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# Rebuilt only when the pins change.
VENV_STAMP := $(VENV)/.installed-requirements-dev

REPO_ID := org/qwen3-moe-fused
HUB_CACHE := $(CURDIR)/build/hub-cache
# How tests and examples find the kernel: get_kernel("org/qwen3-moe-fused",
# version=1) resolved offline from the Hub cache that publish-local writes.
# (KERNELS_CACHE=$(HUB_CACHE) would move only kernels' cache; with
# LOCAL_KERNELS=$(REPO_ID)=$(CURDIR) kernels loads build/ directly, and that
# takes precedence over any cache.)
KERNEL_ENV := HF_HUB_OFFLINE=1 HF_HUB_CACHE=$(HUB_CACHE)

EXAMPLE := examples/train_tiny_qwen3_moe.py
BENCHMARK ?= benchmarks/benchmark_moe.py

.PHONY: venv build publish-local test test-gpu example benchmark clean distclean

venv: $(VENV_STAMP)

$(VENV_STAMP): requirements-dev.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q $$(grep -E '^torch==' requirements-dev.txt)
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $@

# Pure Python (standard library): runs with the venv when there is one (which
# also validates build.toml with kernels' parser), else with $(PYTHON).
build:
	py=$(VPY); [ -x "$$py" ] || py=$(PYTHON); "$$py" scripts/build.py

publish-local: build
	py=$(VPY); [ -x "$$py" ] || py=$(PYTHON); "$$py" scripts/publish_local.py

test: venv build publish-local
	$(KERNEL_ENV) TRITON_INTERPRET=1 $(VPY) -m pytest -q tests

test-gpu:
	$(PYTHON) scripts/build.py
	$(PYTHON) scripts/publish_local.py
	$(KERNEL_ENV) $(PYTHON) -m pytest -q -m gpu tests

example: venv build publish-local
	$(KERNEL_ENV) $(VPY) $(EXAMPLE)

benchmark:
	$(PYTHON) scripts/build.py
	$(PYTHON) scripts/publish_local.py
	$(KERNEL_ENV) $(PYTHON) $(BENCHMARK)

clean:
	rm -rf build result .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
