# Set-up, demo and tests. `make demo` and `make test` each install what they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PY_SOURCES := $(wildcard *.py) common diffusion lora sdxl sd3 flux training sampling evaluation tools tests benchmarks

.PHONY: install demo test test-fast lint bench

# torch is a range in pyproject.toml (keep your CUDA build); where none is installed, pin 2.13.0.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev,eval,recipes]"

demo: install
	$(PYTHON) demo.py

test: install lint
	$(PYTHON) -m pytest

test-fast: install
	$(PYTHON) -m pytest -m "not slow"

lint:
	ruff check .
	vermin -q -t=3.10- --violations --no-tips --eval-annotations $(PY_SOURCES)  # runs on the Python it declares

bench: install
	$(PYTHON) benchmarks/bench_unet.py
	$(PYTHON) benchmarks/bench_train.py
	$(PYTHON) benchmarks/bench_sample.py
