# lars_tf: `make train` and `make test` set the stack up first when needed.
# LARS_TF_STACK=keras2 selects the legacy stack (TF 2.15 + Keras 2) in .venv-keras2.
SHELL := /bin/bash
export LARS_TF_STACK ?= keras3
ifeq ($(LARS_TF_STACK),keras2)
VENV ?= .venv-keras2
else
VENV ?= .venv
endif
export LARS_TF_VENV := $(abspath $(VENV))
CONSTRAINTS := $(if $(filter keras2,$(LARS_TF_STACK)),constraints-keras2.txt,constraints.txt)
BIN := $(VENV)/bin
NP ?= 2
export PATH := $(abspath $(BIN)):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 1

# The recipe of the README's make train: LARS at global batch 4096 on Fashion-MNIST, 2 ranks on one machine.
TRAIN_FLAGS ?= --model=small_cnn --dataset=fashion_mnist --global_batch_size=4096 \
	--epochs=30 --optimizer=lars --learning_rate=3.0 --warmup_epochs=3 \
	--weight_decay=5e-4 --model_dir=runs/fashion_mnist_lars_4k

.PHONY: setup train test test-fast test-legacy test-gpu-build study-quick lint docs bench clean

setup:
	@bash tools/setup_env.sh

train: setup
	horovodrun --gloo -np $(NP) -H localhost:$(NP) lars-train $(TRAIN_FLAGS)

test: setup
	python -m pytest tests

# The inner loop: every test that starts no other process (no Horovod job).
test-fast: setup
	python -m pytest tests -m "not multiprocess"

# What CI runs on the legacy stack (LARS_TF_STACK=keras2 make test-legacy): the tests marked
# legacy: LARS against NumPy, lars_tf.DistributedOptimizer (its refusals, plain
# compile/fit on 2 ranks), the composition and equivalence jobs, 2-rank trainer runs, exact
# resume, and elastic training's local tests.
test-legacy: setup
	python -m pytest tests -m legacy

# The GPU build proved as far as a machine without a GPU allows (CI runs it): Horovod with
# NCCL against TensorFlow 2.20 in .venv-gpu (LARS_TF_GPU=1 set-up), then tools/gpu_check.sh
# --cpu with it. On a GPU host: LARS_TF_GPU=1 make setup, then tools/gpu_check.sh.
test-gpu-build:
	LARS_TF_GPU=1 $(MAKE) setup VENV=.venv-gpu
	LARS_TF_VENV=$(abspath .venv-gpu) tools/gpu_check.sh --cpu

# Benchmarks write benchmarks/RESULTS.md (and raw JSON + plots in benchmarks/results/).
# Model Garden (the LARS baseline) is installed here only, without its dependencies: the
# benchmark loads just its lars.py (for TF 2.20 written against tf_keras, installed too).
# matplotlib draws the plots. The large-batch study takes
# about an hour on 2 cores, the all-reduce across hosts (root only) about as long.
bench: setup
	python -m pip install -q --no-deps -c $(CONSTRAINTS) tf-models-official \
		$(if $(filter keras2,$(LARS_TF_STACK)),,tf-keras)
	python -m pip install -q -c $(CONSTRAINTS) matplotlib
	python -m benchmarks.lars_overhead
	python -m benchmarks.onednn
	python -m benchmarks.xla
	LARS_TF_STACK=keras2 $(MAKE) setup   # benchmarks.stacks measures both stacks
	python -m benchmarks.stacks
	python -m benchmarks.input_pipeline
	python -m benchmarks.allreduce
	@if [ "$$(id -u)" -eq 0 ]; then python -m benchmarks.cluster_allreduce && \
		python -m benchmarks.mwms_peer && python -m benchmarks.elastic_reset; \
	else echo "benchmarks.cluster_allreduce, mwms_peer, elastic_reset skipped: tools/cluster.sh needs root"; fi
	python -m benchmarks.scaling
	python -m benchmarks.horovod_idle
	python -m benchmarks.noise_scale
	python -m benchmarks.critical_batch

# The critical-batch study's pipeline on a few minutes' worth of trials (CI runs it; the
# study itself, hours long, is part of make bench).
study-quick: setup
	python -m pip install -q -c $(CONSTRAINTS) matplotlib
	python -m benchmarks.critical_batch --quick

lint: setup
	ruff check lars_tf models benchmarks tests

# The documentation site (docs/, mkdocs.yml) into site/; make test builds it too, --strict.
docs: setup
	mkdocs build --strict

clean:
	rm -rf .venv .venv-keras2 .venv-gpu runs site .pytest_cache
