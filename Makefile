# Two commands for a fresh clone: `make sample` and `make test`.
# torch is installed before the package so the C++ extension can be built against it.
# TORCH_SPEC picks the torch build: the default pin resolves to the local CPU wheel on the
# project's CPU machines and to PyPI's CUDA build elsewhere; override it as you need, e.g.
#   make test TORCH_SPEC='torch==2.14.1'
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fastddim-installed

.PHONY: install sample test bench clean

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q '$(TORCH_SPEC)' numpy pybind11 ninja
	$(PIP) install -q --no-build-isolation -e '.[dev,train,triton]'
	touch $(STAMP)

install: $(STAMP)

sample: $(STAMP)
	$(VENV)/bin/fastddim sample -n 64 --steps 10 -o samples.png

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-enable

clean:
	rm -rf $(VENV) build *.egg-info
