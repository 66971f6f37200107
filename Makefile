# vitrail: `make demo` pretrains DINO on Fashion-MNIST and prints a k-NN table; `make test` runs the suite.
# Both start from nothing: they create .venv, install the package and fetch Debian's Fashion-MNIST if missing.

VENV ?= .venv
PYTHON ?= python3
DATA ?= data
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist
BIN := $(VENV)/bin

.PHONY: install fashion-mnist demo test benchmarks clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Exact torch pair: the CUDA build, which also runs on the CPU (see README).
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

fashion-mnist:
	@if [ -z "$$VITRAIL_DATA" ] && [ ! -e $(FASHION_MNIST)/train-images-idx3-ubyte.gz ]; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; \
	fi

demo: install fashion-mnist
	$(BIN)/vitrail shard fashion-mnist $(DATA)/fashion-mnist --workers 2
	$(BIN)/vitrail pretrain configs/demo.yaml
	$(BIN)/vitrail eval knn runs/demo --baselines --resize-size 28

test: install fashion-mnist
	$(BIN)/lint-imports
	# Two test files at a time fill the two cores; three are slower (BENCHMARKS.md, "The suite's wall time").
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

clean:
	rm -rf runs $(DATA)/fashion-mnist .pytest_cache
