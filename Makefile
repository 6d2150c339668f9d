# mgrq-runner: `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
IMAGENET ?= $(IMAGENET_ROOT)
EXP := outputs/experiments
PORT ?= 5000

.PHONY: help setup run test test-all fuzz lint bench bench-recon bench-memory bench-onnx device-bundle train-proxy \
	train-proxy-swin clean mlflow-ui \
	table-w4a4 table-w3a3 table-w6a6 ablation loss-grid proxy-table proxy-framework proxy-leaders proxy-loss-grid optuna-loss

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## install Fashion-MNIST (apt) and a virtual environment with the package

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	rm -f $(VENV)/.installed
	bash scripts/setup.sh

run: setup ## run the embedded default job (proxy ViT, Fashion-MNIST, W4A4, CPU); extra overrides in ARGS=
	$(VENV)/bin/mgrq-run $(ARGS)

test: setup ## the fast test suite (about 15 minutes on 2 cores, the wheel check included)
	$(PY) -m pytest -q

test-all: setup ## every test, the slow ones too
	$(PY) -m pytest -q -m ""

fuzz: setup ## the file readers fuzzed long (Hypothesis profile fuzz: 1500 examples a reader; make test runs 30)
	$(PY) -m pytest -q tests/test_fuzz_readers.py --hypothesis-profile=fuzz --hypothesis-show-statistics -p no:cacheprovider

lint: setup ## ruff lint
	$(VENV)/bin/ruff check src scripts tests

bench: setup ## throughput of W4A4 fake-quantized deit_s relative to FP (CPU, batch 32)
	$(PY) scripts/bench_quant.py

train-proxy: setup ## retrain the shipped proxy ViT on Fashion-MNIST (CPU, about an hour)
	$(PY) scripts/train_proxy.py

train-proxy-swin: setup ## retrain the shipped Swin proxy on Fashion-MNIST (CPU, 1-2 hours)
	$(PY) scripts/train_proxy.py --model proxy_swin --epochs 30 --threads 1

mlflow-ui: setup ## MLflow's UI over logger=mlflow's default store (outputs/mlflow.db) on http://127.0.0.1:5000 (PORT=)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --host 127.0.0.1 --port $(PORT) \
		--backend-store-uri sqlite:///$(CURDIR)/outputs/mlflow.db

clean: ## remove the virtual environment and run outputs
	rm -rf $(VENV) outputs/runs outputs/multiruns outputs/experiments

bench-recon: setup ## per-iteration reconstruction cost relative to an FP block step (deit_s, then the proxy; CPU)
	$(PY) scripts/bench_recon.py
	$(PY) scripts/bench_recon.py --model proxy_vit --iters 50

bench-onnx: setup ## ONNX throughput, size, integer kernels: FP32 vs this runner's W8A8 vs onnxruntime quantize_static
	$(PY) scripts/bench_onnx.py --accuracy

bench-memory: setup ## peak memory of one deit_b and one swin_b reconstruction, caches accounted (CPU, long)
	$(PY) scripts/bench_memory.py --model deit_base_patch16_224 --images 128
	$(PY) scripts/bench_memory.py --model swin_base_patch4_window7_224 --images 32   # 128: about an hour on one core

device-bundle: setup ## what scripts/device_check.sh needs on a lent GPU machine (no network there) -> .device_bundle/
	rm -rf .device_bundle && mkdir -p .device_bundle/whl
	$(PY) -m pip wheel -q --no-deps -w .device_bundle/whl \
		$$($(PY) -m pip freeze | grep -iE '^(hydra-core|omegaconf|antlr4-python3-runtime|timm)==')
	cp -r /usr/share/datasets/fashion-mnist .device_bundle/fashion-mnist
	du -sh .device_bundle

# An experiment: its sweep into $(EXP)/<name> (rerunning overwrites), then the collected table and plots there.
define experiment
	$(VENV)/bin/mgrq-run experiment=$(1) hydra.sweep.dir=$(EXP)/$(1) $(2) $(ARGS)
	$(VENV)/bin/mgrq-collect $(EXP)/$(1) --plots
endef

imagenet-given:
	@test -n "$(IMAGENET)" || { echo "ImageNet root not set. Fix: make $(MAKECMDGOALS) IMAGENET=/path/to/imagenet"; exit 2; }

table-w4a4: setup imagenet-given ## the W4A4 table, 8 ImageNet models x FP/repq/qdrop/mgrq (IMAGENET=/path)
	$(call experiment,table_w4a4,data.root=$(IMAGENET))

table-w3a3: setup imagenet-given ## the W3A3 table (IMAGENET=/path)
	$(call experiment,table_w3a3,data.root=$(IMAGENET))

table-w6a6: setup imagenet-given ## the W6A6 table (IMAGENET=/path)
	$(call experiment,table_w6a6,data.root=$(IMAGENET))

ablation: setup imagenet-given ## mgrq's components on deit_s and vit_s at W3A3/W4A4 (IMAGENET=/path)
	$(call experiment,ablation,data.root=$(IMAGENET))

loss-grid: setup imagenet-given ## mgrq over global x local loss weights, deit_s W4A4 (IMAGENET=/path)
	$(call experiment,loss_grid,data.root=$(IMAGENET))

optuna-loss: setup ## Optuna search of the loss weights on held-out train images (proxy W3A3; ARGS= to change)
	$(VENV)/bin/mgrq-run experiment=optuna_loss hydra.sweep.dir=$(EXP)/optuna_loss $(ARGS)

proxy-loss-grid: setup ## the loss-weight grid on the proxy at W3A3 (CPU, about 15 minutes)
	$(call experiment,proxy_loss_grid,)

proxy-table: setup ## every method on both proxies (ViT: W4A4/W3A3/W2A4, Swin: W4A4/W3A3) x 3 seeds (CPU, hours), into docs/proxy
	$(call experiment,proxy_table,)
	$(call experiment,proxy_swin_table,)
	$(VENV)/bin/mgrq-collect $(EXP)/proxy_table $(EXP)/proxy_swin_table --out docs/proxy --plots

proxy-leaders: setup ## fimaq, aphq, pdquant and glfq (its cosine weight lr) on both proxies x 3 seeds (CPU, hours), into docs/proxy/leaders
	$(VENV)/bin/mgrq-run experiment=proxy_leaders hydra.sweep.dir=$(EXP)/proxy_leaders/main $(ARGS)
	$(VENV)/bin/mgrq-run experiment=proxy_leaders hydra.sweep.dir=$(EXP)/proxy_leaders/glfq_cosine method=glfq $(ARGS)
	$(VENV)/bin/mgrq-run experiment=proxy_leaders_swin hydra.sweep.dir=$(EXP)/proxy_leaders_swin/main $(ARGS)
	$(VENV)/bin/mgrq-collect $(EXP)/proxy_leaders $(EXP)/proxy_leaders_swin --out docs/proxy/leaders

proxy-framework: setup ## glfq, its ablations, mgrq_glfq, mgrq_brecq on both proxies x 3 seeds (CPU, many hours), into docs/proxy/framework
	$(VENV)/bin/mgrq-run experiment=proxy_framework hydra.sweep.dir=$(EXP)/proxy_framework/main $(ARGS)
	$(VENV)/bin/mgrq-run experiment=proxy_framework hydra.sweep.dir=$(EXP)/proxy_framework/w2a4 \
		quant=w2a4 method=glfq,mgrq_glfq,mgrq_brecq $(ARGS)
	$(VENV)/bin/mgrq-run experiment=proxy_framework hydra.sweep.dir=$(EXP)/proxy_framework/mgrq_brecq \
		quant=w4a4,w3a3 method=mgrq_brecq $(ARGS)
	$(VENV)/bin/mgrq-run experiment=proxy_framework hydra.sweep.dir=$(EXP)/proxy_framework/mgrq_glfq_p1 \
		quant=w3a3 method=mgrq_glfq method.recon.quant_prob=1.0 $(ARGS)
	$(VENV)/bin/mgrq-run experiment=proxy_framework hydra.sweep.dir=$(EXP)/proxy_framework/softmax \
		quant=w4a4 method=glfq method.init.softmax_quantizer=log_sqrt2 $(ARGS)
	$(VENV)/bin/mgrq-run experiment=proxy_framework_swin hydra.sweep.dir=$(EXP)/proxy_framework_swin/main $(ARGS)
	$(VENV)/bin/mgrq-run experiment=proxy_framework_swin hydra.sweep.dir=$(EXP)/proxy_framework_swin/w4a4 \
		quant=w4a4 method=glfq,mgrq_glfq,mgrq_brecq $(ARGS)
	$(VENV)/bin/mgrq-collect $(EXP)/proxy_framework $(EXP)/proxy_framework_swin --out docs/proxy/framework --plots
