"""benchmarks/gpu_check.py, the GPU session's one prepared command, run as its CPU dry run so
that it cannot rot between GPU sessions: every section runs or says why not, and the JSON the
device tool brings back holds each section's figures."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cpu_dry_run_runs_every_section(tmp_path):
    pytest.importorskip("diffusers")
    p = _run("--cpu", "--out", str(tmp_path / "out"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    sections = res["sections"]
    assert list(sections) == ["env", "tests", "checks", "step", "sample", "memcheck", "ncu"]
    for name in ("env", "tests", "checks", "step", "sample"):
        assert sections[name]["status"] == "passed", (name, sections[name])
    for name in ("memcheck", "ncu"):  # GPU tools: skipped on the CPU, with the reason
        assert sections[name]["status"] == "skipped" and sections[name]["reason"]
    assert sections["tests"]["figures"]["collected"] > 20  # the GPU-marked tests still collect
    checks = sections["checks"]["figures"]
    assert checks["triton_size_classes"]["status"] == "passed" and checks["triton_size_classes"]["cases"] >= 12
    assert checks["graph_threshold_kwargs"]["status"] == "passed"
    assert sections["step"]["figures"]["rows"] and sections["sample"]["figures"]["cells"]
    assert (tmp_path / "out" / "gpu_check.log").stat().st_size > 0
    assert "== summary" in p.stdout


def test_bad_arguments_are_one_line_errors(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    p = _run("--cpu", "--out", str(f), timeout=120)
    assert p.returncode == 2 and "--out" in p.stderr and "Traceback" not in p.stderr
    p = _run("--cpu", "--out", str(tmp_path / "o"), "--only", "tests,nope", timeout=120)
    assert p.returncode == 2 and "nope" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()  # nothing made before the arguments were checked
