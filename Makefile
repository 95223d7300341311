# make train: set up .venv, fetch the embedded dataset, train the default model.
# make test:  the same set-up, then the whole test suite (WORKERS=2 processes).
PY      := .venv/bin/python
PIP     := $(PY) -m pip
FMNIST  := /usr/share/datasets/fashion-mnist
STAMP   := .venv/.spikegrad-installed
WORKERS ?= 2

.PHONY: train test setup data bench clean

train: setup data
	$(PY) -m spikegrad train --config configs/default.yaml --overwrite

# pytest-xdist workers (one torch thread each), whole test modules per worker; a worker
# that dies ends the run with the test it was running (no replacement worker to hang on)
test: setup data
	$(PY) -m pytest -n $(WORKERS) --dist loadscope --max-worker-restart=0

bench: setup
	$(PY) -m spikegrad bench step --threads 1 --out runs/bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps spikingjelly==2.0.0
	touch $(STAMP)

# The embedded dataset: Debian's dataset-fashion-mnist, never downloaded at run time.
data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ] || [ -f .data$(FMNIST)/train-images-idx3-ubyte.gz ]; then \
		true; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-cache show dataset-fashion-mnist >/dev/null 2>&1 || apt-get update -qq; \
		apt-get install -y -qq dataset-fashion-mnist; \
	else \
		mkdir -p .data && cd .data && apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb . ; \
	fi

clean:
	rm -rf .venv .data runs
