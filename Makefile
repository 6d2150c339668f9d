# mgrq-runner: `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: help setup run test test-all lint bench bench-recon train-proxy proxy-table clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## install Fashion-MNIST (apt) and a virtual environment with the package

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	rm -f $(VENV)/.installed
	bash scripts/setup.sh

run: setup ## run the embedded default job (proxy ViT, Fashion-MNIST, W4A4, CPU); extra overrides in ARGS=
	$(VENV)/bin/mgrq-run $(ARGS)

test: setup ## the fast test suite (under 10 minutes on 2 cores)
	$(PY) -m pytest -q

test-all: setup ## every test, the slow ones too
	$(PY) -m pytest -q -m ""

lint: setup ## ruff lint
	$(VENV)/bin/ruff check src scripts tests

bench: setup ## throughput of W4A4 fake-quantized deit_s relative to FP (CPU, batch 32)
	$(PY) scripts/bench_quant.py

train-proxy: setup ## retrain the shipped proxy ViT on Fashion-MNIST (CPU, about 30 minutes)
	$(PY) scripts/train_proxy.py

clean: ## remove the virtual environment and run outputs
	rm -rf $(VENV) outputs/runs outputs/multiruns

bench-recon: setup ## per-iteration reconstruction cost relative to an FP block step (deit_s, CPU)
	$(PY) scripts/bench_recon.py

proxy-table: setup ## every method on the proxy at W4A4, W3A3, W2A4, 3 seeds (CPU, hours at the full budget)
	$(PY) scripts/proxy_table.py $(ARGS)
