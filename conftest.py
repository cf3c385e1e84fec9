"""Which suite a bare ``pytest`` runs: the unit tests, or with ``--benchmark-only`` the benchmarks.

pyproject's ``addopts`` carries ``--benchmark-disable`` so that the unit tests run each
``benchmark`` call once and stay fast. pytest-benchmark refuses ``--benchmark-only`` together with
``--benchmark-disable`` (a usage error, exit 4), so asking for the benchmarks drops the disable
here, before the plugin reads the options (its ``pytest_configure`` runs last).

``testpaths`` lists both ``tests`` and ``benchmarks``; when pytest falls back on them (a bare
``pytest`` from the repository root), ``--benchmark-only`` collects only ``benchmarks/`` and
anything else only ``tests/``. Paths named on the command line are collected as given.
"""
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent
_SUITES = {False: _ROOT / "tests", True: _ROOT / "benchmarks"}  # keyed by --benchmark-only


def _benchmark_only(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_only", default=False))


def pytest_configure(config: pytest.Config) -> None:
    only = _benchmark_only(config)
    if only:
        config.option.benchmark_disable = False
    if config.args_source is pytest.Config.ArgsSource.TESTPATHS:
        # Initial paths are never subject to pytest_ignore_collect: pick the suite by replacing them.
        config.args = [str(_SUITES[only])]
