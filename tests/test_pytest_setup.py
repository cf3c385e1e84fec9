"""What a fresh clone's commands promise: the pytest commands the README names, run as typed
(collection only: a few seconds each), and a clean `git status` after `make sample`.

``pytest --benchmark-only`` from the repository root or from benchmarks/ collects the benchmarks
(pyproject's ``--benchmark-disable`` used to make it a usage error, exit 4); a bare ``pytest``
collects the unit tests and no benchmark (root conftest.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def collect(*args: str, cwd: Path) -> list[str]:
    """The test ids ``pytest --collect-only -q ARGS`` prints when run in ``cwd`` (asserting exit 0)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return [ln for ln in p.stdout.splitlines() if "::" in ln]


@pytest.mark.parametrize("cwd", [ROOT, ROOT / "benchmarks"], ids=["root", "benchmarks"])
def test_benchmark_only_collects_the_benchmarks(cwd):
    ids = collect("--benchmark-only", cwd=cwd)
    files = {i.split("::")[0].rsplit("/", 1)[-1] for i in ids}
    assert {"bench_ddim_step.py", "bench_sample.py"} <= files, files
    assert all(f.startswith("bench_") for f in files), files  # no unit test module collected


def test_bare_pytest_collects_the_unit_tests_only():
    # python_files narrows the unit tests to this module (importing all of them takes long); the
    # bench_*.py files are collected by benchmarks/conftest.py whatever python_files says, so they
    # would show up here if a bare pytest looked in benchmarks/.
    files = {i.split("::")[0] for i in collect("-o", f"python_files={Path(__file__).name}", cwd=ROOT)}
    assert files == {f"tests/{Path(__file__).name}"}, sorted(files)


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_make_sample_output_is_ignored_by_git():
    """`make sample` writes samples.png in the repository root; the figure in docs/ stays tracked."""
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    assert ignored("samples.png") and not ignored("docs/samples_mnist.png")

