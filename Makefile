# Two commands for a fresh clone: `make sample` and `make test`.
# `make sample` installs only what sampling needs (torch, numpy, the package and its C++ extension);
# `make test` adds the dev, train and triton extras (pytest, diffusers, mlxtend, matplotlib, Triton...).
# torch is installed before the package so the C++ extension can be built against it.
# TORCH_SPEC picks the torch build: the default pin resolves to the local CPU wheel on the
# project's CPU machines and to PyPI's CUDA build elsewhere; override it as you need, e.g.
#   make test TORCH_SPEC='torch==2.14.1'
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SAMPLE_STAMP := $(VENV)/.fastddim-sample
TEST_STAMP := $(VENV)/.fastddim-test

.PHONY: install sample test bench clean

$(SAMPLE_STAMP): setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q '$(TORCH_SPEC)' numpy ninja 'setuptools>=64' wheel
	$(PIP) install -q --no-build-isolation -e .
	touch $@

$(TEST_STAMP): $(SAMPLE_STAMP)
	$(PIP) install -q --no-build-isolation -e '.[dev,train,triton]'
	touch $@

install: $(SAMPLE_STAMP)

sample: $(SAMPLE_STAMP)
	$(VENV)/bin/fastddim sample -n 64 --steps 10 -o samples.png

test: $(TEST_STAMP)
	$(PY) -m pytest -q tests

# Both benchmark files (bench_ddim_step.py, bench_sample.py); the pytest-benchmark JSON goes to
# benchmarks/results/<UTC date>-<device>.json (device: the GPU's name, or cpu-<n>cores-<model>).
# The same set as `pytest --benchmark-only`. 5 min 54 s on the project's 2-core CPU at load 1.2-1.7
# (2026-11-29, benchmarks/RESULTS.md); longer on a busy machine. BENCH_ARGS adds pytest arguments,
# e.g. BENCH_ARGS='-k mnist'.
bench: $(TEST_STAMP)
	mkdir -p benchmarks/results
	out=benchmarks/results/$$(date -u +%Y%m%d-%H%M)-$$($(PY) benchmarks/conftest.py --device-slug).json; \
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-enable -rs -q --benchmark-columns=median,min,max,rounds \
		--benchmark-sort=name --benchmark-json=$$out $(BENCH_ARGS) && echo "benchmark JSON: $$out"

clean:
	rm -rf $(VENV) build *.egg-info
