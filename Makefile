# Run `make` to list the targets by group: each `##@` line opens a group, each `## ` comment
# is the target's line in the list. Every target is one command; dvc.yaml holds the pipeline.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export DVC_SITE_CACHE_DIR := $(CURDIR)/.dvc/tmp/site-cache
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

CONFIG ?= configs/ner-en.yaml

.PHONY: gpu-check gpu-check-prepare help venv lock run repro relog exp sweep test test-fast test-gpu lint deps format bench bench-data bench-avx2 bench-gpu package mlflow-ui mlflow-server push pull release promote reproduce metrics serve clean docs docs-build docs-figures docs-tables

# The environment comes from a lock (locks/README.md): every package pinned with its hash, nothing
# resolved at install time. VARIANT=gpu installs PyPI's CUDA build of torch instead of the CPU one.
VARIANT ?= cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
LOCK := locks/$(VARIANT).txt

$(STAMP): $(LOCK) locks/assets.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(filter cpu,$(VARIANT)),$(BIN)/pip install --require-hashes --no-deps --extra-index-url $(TORCH_CPU_INDEX) -r locks/cpu-torch.txt)
	$(BIN)/pip install --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install --require-hashes --no-deps -r locks/assets.txt
	$(BIN)/pip install --no-deps -e .
	touch $@

##@ Run: the pipeline and its results

venv: $(STAMP) ## create the virtual environment from the lock (VARIANT=cpu|gpu)

run: $(STAMP) ## run the whole pipeline on the embedded default model and data
	dvc repro
	@$(BIN)/python docs/figures.py --curves reports/training --out docs/img/training-curves.svg --reports reports --page docs/text-classification.md
	@$(BIN)/python -m pipeline.ops.summary

repro: $(STAMP) ## dvc repro (what changed only), without the summary
	dvc repro

metrics: $(STAMP) ## show the committed metrics of the last run
	dvc metrics show

##@ Experiment: configs, sweeps, tracking

exp: $(STAMP) ## run a config as a DVC experiment: make exp CONFIG=c.yaml [SAVE=dir] [SET=s.k=v] [REPORT=f.json] [NAME=n] [REPLACE=1]
	$(BIN)/python -m pipeline.ops.experiment $(CONFIG) $(if $(NAME),--name $(NAME)) $(if $(REPLACE),--replace) $(if $(SAVE),--save-model $(SAVE)) $(if $(REPORT),--report $(REPORT)) $(foreach s,$(SET),--set $(s))

sweep: $(STAMP) ## queue and run configs/sweeps/cls.yaml, ranked by validation macro-F1
	$(BIN)/python -m pipeline.ops.sweep $(or $(CONFIG),configs/sweeps/cls.yaml)

mlflow-ui: $(STAMP) ## browse the runs at http://127.0.0.1:5000
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000 --workers 1

mlflow-server: $(STAMP) ## a team tracking server: PostgreSQL + served artifacts on 127.0.0.1:5001
	$(BIN)/python -m pipeline.ops.team_server --dir .mlflow-server --port 5001 --db-port 5433

relog: $(STAMP) ## after a tracking outage: fill the run in from reports/ (docs/reliability.md)
	$(BIN)/python -m pipeline.ops.relog --params params.yaml --report reports/train.json --curves reports/training

##@ Release: tag, register, reproduce

release: $(STAMP) ## tag a finished run, push its artifacts, register its model: make release TAG=v1 [SIGNING_KEY=key.pem] [SIGNED=1]
	$(BIN)/python -m pipeline.ops.release $(TAG) --params params.yaml --model models/onnx --test data/validated/test.parquet $(if $(MODEL),--name $(MODEL)) $(if $(SIGNING_KEY),--signing-key $(SIGNING_KEY)) $(if $(SIGNED),--signed)

promote: $(STAMP) ## point models:/MODEL@production at a version: make promote MODEL=m VERSION=2
	$(BIN)/python -m pipeline.ops.release --params params.yaml --promote $(MODEL) $(VERSION)

reproduce: $(STAMP) ## restore a tag's artifacts in .reproduce/TAG; RERUN=1 re-runs and compares
	$(BIN)/python -m pipeline.ops.reproduce $(TAG) $(if $(RERUN),--rerun)

push: $(STAMP) ## store data, models and the run cache in the DVC remote (.dvc/config)
	dvc push --run-cache

pull: $(STAMP) ## fetch the data, models and run cache of this commit from the DVC remote
	dvc pull --run-cache

##@ Serve: the exported model

serve: $(STAMP) ## serve the exported model on http://127.0.0.1:8000
	$(BIN)/python -m bertrt serve --model models/onnx

package: $(STAMP) ## build a wheel with the runtime and the exported model into dist/
	$(BIN)/python -m bertrt package --model models/onnx --out dist

##@ Develop: tests, lint, locks, docs, benchmarks

help: ## list the targets by group (the default goal)
	@awk 'BEGIN {FS = ":.*## "} /^##@ / {printf "\n%s\n", substr($$0, 5)} /^[a-z][a-z0-9-]*:.*## / {printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# Offline, and bytecode written even where the shell says not to: pytest keeps each test module
# it has rewritten for assertions in __pycache__, and skips that work on the next run.
TEST_ENV = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=

test: $(STAMP) ## run the test suite (offline, CPU)
	$(TEST_ENV) $(BIN)/python -m pytest -q -n auto --dist loadscope --no-loadscope-reorder --durations=15

test-fast: $(STAMP) ## the test suite without the slow end-to-end tests
	$(TEST_ENV) $(BIN)/python -m pytest -q -n auto --dist loadscope --no-loadscope-reorder -m "not slow"

test-gpu: $(STAMP) ## the gpu-marked tests (CUDA, IO binding, TensorRT); they skip without a GPU
	$(TEST_ENV) $(BIN)/python -m pytest -q -rs -m gpu

gpu-check-prepare: $(STAMP) ## pieces under 60 MiB in gpu-carry/ for the GPU check (docs/gpu.md)
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.gpu_carry prepare --dir gpu-carry --lock locks/gpu.txt --finetuned models/finetuned --validated data/validated --params params.yaml

gpu-check: ## on the GPU machine, its python3: install gpu-carry/, then the 8-minute check into OUT
	python3 -m benchmarks.gpu_check --carry gpu-carry --out $(or $(OUT),gpu-carry/report)

lint: $(STAMP) ## ruff lint and format check, import layers (lint-imports), dvc.yaml code deps
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports && $(BIN)/python -m pipeline.ops.code_deps --check

format: $(STAMP) ## ruff format and fix
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

deps: $(STAMP) ## write each dvc.yaml stage's code deps from the import graph
	$(BIN)/python -m pipeline.ops.code_deps

lock: ## re-pin every package with hashes from requirements*.txt into locks/ (needs uv)
	locks/compile.sh

docs: $(STAMP) ## serve the documentation site on http://127.0.0.1:8001 (live reload)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8001

docs-build: $(STAMP) ## build the documentation site into site/ (fails on any warning)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs-figures: $(STAMP) ## redraw the training curves and the results table from reports/
	$(BIN)/python docs/figures.py --curves reports/training --out docs/img/training-curves.svg --reports reports --page docs/text-classification.md --experiments reports/experiments --experiments-page docs/token-classification.md --masked-lm-page docs/masked-lm.md

bench: $(STAMP) ## CPU benchmarks: PyTorch vs ORT variants, training, serving; docs/benchmarks.md
	$(BIN)/python -m benchmarks.cpu --model-dir models/onnx --finetuned models/finetuned --test data/validated/test.parquet --out docs/benchmarks.md --json reports/bench_cpu.json
	$(BIN)/python -m benchmarks.train_mlm --model package:cognition/model --out docs/benchmarks.md --json reports/bench_train_mlm.json
	$(BIN)/python -m benchmarks.train_cls --validated data/validated --rows 2000 --target-rows 0 --out docs/benchmarks.md --json reports/bench_train.json
	$(BIN)/python -m benchmarks.serving --model-dir models/onnx --test data/validated/test.parquet --out docs/benchmarks.md --json reports/bench_serving.json
	$(BIN)/python -m benchmarks.load --model-dir models/onnx --test data/validated/test.parquet --out docs/benchmarks.md --json reports/bench_load.json
	$(BIN)/python -m benchmarks.overhead --validated data/validated --params params.yaml --out docs/benchmarks.md --json reports/bench_overhead.json
	$(BIN)/python -m benchmarks.long_documents --raw data/raw --model-dir models/onnx --out docs/benchmarks.md --json reports/long_documents.json
	$(BIN)/python -m benchmarks.memory --model-dir models/onnx --out docs/benchmarks.md --json reports/bench_memory.json
	$(BIN)/python -m benchmarks.dask_batch --model-dir models/onnx --test data/validated/test.parquet --out docs/benchmarks.md --json reports/bench_dask.json
	$(BIN)/python -m benchmarks.docs_tables

bench-data: $(STAMP) ## peak memory and time of ingest, validate and tokenize on 100k, 1M and 5M synthetic rows
	$(BIN)/python -m benchmarks.data_stages --validated data/validated --params params.yaml --rows $(or $(ROWS),100000 1000000 5000000) --out docs/benchmarks.md --json reports/bench_data_stages.json $(if $(BEFORE),--before $(BEFORE))

docs-tables: $(STAMP) ## re-render docs/benchmarks.md from the benchmarks' JSON reports
	$(BIN)/python -m benchmarks.docs_tables --write

bench-avx2: $(STAMP) ## the CPU benchmark with AVX-512, VNNI and AMX hidden: an AVX2-only server
	$(BIN)/python -m benchmarks.isa avx2 -- $(BIN)/python -m benchmarks.cpu --model-dir models/onnx --finetuned models/finetuned --test data/validated/test.parquet --out docs/benchmarks.md --json reports/bench_cpu_avx2.json --section "CPU, AVX2 kernels"

bench-gpu: $(STAMP) ## GPU benchmarks (need CUDA): inference and fine-tuning speed, memory, MFU
	$(BIN)/python -m benchmarks.gpu --model-dir models/onnx --finetuned models/finetuned --test data/validated/test.parquet --out docs/benchmarks.md --json reports/bench_gpu.json
	$(BIN)/python -m benchmarks.train_cls --device cuda --validated data/validated --rows 0 --target-rows 0 --out docs/benchmarks.md --json reports/bench_train_gpu.json

clean: ## remove the virtual environment and caches (keeps data, models and mlflow.db)
	rm -rf $(VENV) .pytest_cache .ruff_cache dist build
