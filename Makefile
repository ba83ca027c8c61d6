# lars_tf: `make train` and `make test` set the stack up first when needed.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
NP ?= 2
export PATH := $(abspath $(BIN)):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 1

# The README's recipe: LARS at global batch 4096 on Fashion-MNIST, 2 ranks on one machine.
TRAIN_FLAGS ?= --model=small_cnn --dataset=fashion_mnist --global_batch_size=4096 \
	--epochs=30 --optimizer=lars --learning_rate=3.0 --warmup_epochs=3 \
	--weight_decay=5e-4 --model_dir=runs/fashion_mnist_lars_4k

.PHONY: setup train test test-fast lint bench clean

setup:
	@bash tools/setup_env.sh

train: setup
	horovodrun --gloo -np $(NP) -H localhost:$(NP) lars-train $(TRAIN_FLAGS)

test: setup
	python -m pytest tests

# The inner loop: every test that starts no other process (no Horovod job), in about 2 minutes.
test-fast: setup
	python -m pytest tests -m "not multiprocess"

# Benchmarks write benchmarks/RESULTS.md (and raw JSON + plots in benchmarks/results/).
# Model Garden (the LARS baseline) is installed here only, without its dependencies: the
# benchmark loads just its lars.py. matplotlib draws the plots. The large-batch study takes
# about an hour on 2 cores.
bench: setup
	python -m pip install -q --no-deps -c constraints.txt tf-models-official
	python -m pip install -q -c constraints.txt matplotlib
	python -m benchmarks.lars_overhead
	python -m benchmarks.onednn
	python -m benchmarks.input_pipeline
	python -m benchmarks.allreduce
	python -m benchmarks.scaling
	python -m benchmarks.large_batch

lint: setup
	ruff check lars_tf models benchmarks tests

clean:
	rm -rf $(VENV) runs .pytest_cache
