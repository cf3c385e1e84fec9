"""The GPU path checked end to end in one command: tests, checks, benchmark cells, memcheck, ncu.

    source .gpu/setup-gpu.sh && python3 benchmarks/gpu_check.py --out $OUT     # the GPU machine
    python benchmarks/gpu_check.py --cpu --out /tmp/gpu_check                  # the dry run (CI)

A lent GPU session has 15 minutes of device time in all, so this is the one prepared command it
runs (issue 21). Sections run in the order of what they decide, each with its own time limit,
and a section that would not finish inside ``--budget-s`` is skipped with that reason (rerun it
with ``--only``):
  env      device, driver, versions, the backends fastddim sees
  tests    the GPU-marked tests (pytest -m gpu), in parallel where pytest-xdist is installed
  checks   what the tests do not make: the three Triton size classes against the reference, a
           batch past 2**31 elements, a graph replay under set_sync_debug_mode("error"),
           thresholding and per-sample model_kwargs inside a graph, compile + graph in bf16 on a
           channels_last model
  step     bench_ddim_step.py's GPU rows at 1024x3x32x32 and 1024x4x64x64 (fp32 and bf16 model
           output, eta 0 and 1) and the copy rate at the same bytes: bar >= 85% of it at eta 0
  sample   bench_sample.py's DDPM CIFAR-10 U-Net cells (n = 1024 and 1, S = 10): the bars
  memcheck compute-sanitizer --tool memcheck on a small graphed sample (this file's --tiny-graph)
  ncu      ncu --nvtx of the step kernel (benchmarks/ncu_step.py)
Every section's result (passed / failed / skipped, seconds, figures) is written to
``OUT/gpu_check.json`` after each section (atomically) and its output to ``OUT/gpu_check.log``;
the pytest-benchmark JSONs and the ncu / memcheck reports go beside them (8 files at most: what
the device tool brings back). The Triton kernels it compiles are counted from the Triton cache it
uses (``TRITON_CACHE_DIR``, a fresh folder unless set: a cache compiled ahead may be carried).

``--cpu`` runs the same sections on the CPU, small: the GPU tests are collected, not run; the
checks run on the CPU backends (Triton under the interpreter) without graphs; one CPU step row
and one cheap-model sample cell are measured; memcheck and ncu are skipped. It exists so that
this command cannot rot between GPU sessions (tests/test_gpu_check.py runs it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
STEP_BAR = 0.85  # the step at eta = 0 against the copy rate (bytes read + written)
# Bars of issue 21, from bench_sample's rows: (cell, contender, baseline contender, minimum ratio).
SAMPLE_BARS = [
    ("cuda-cifar10d-n1024-S10-eta0", "fastddim-graph-compile-bf16", "diffusers-eager", 3.0),
    ("cuda-cifar10d-n1024-S10-eta0", "fastddim-graph-compile-bf16", "diffusers-compile-bf16", 1.3),
    ("cuda-cifar10d-n1-S10-eta0", "fastddim-graph-compile-bf16", "diffusers-eager", 5.0),
]
OVERHEAD_BAR = 0.03  # the sampler over S graph-replayed forwards
CPU_SAMPLE_CELL = "cpu-cheap-n1-S20-eta0-1thr"


class Check:
    """The run's state: where results go, the deadline, and the JSON written after each section."""

    def __init__(self, out: Path, cpu: bool, budget_s: float):
        self.out, self.cpu, self.budget_s = out, cpu, budget_s
        self.t0 = time.monotonic()
        self.results: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "cpu_dry_run": cpu,
                              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "sections": {}}
        self.log = open(out / "gpu_check.log", "a", buffering=1)

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.log.write(line + "\n")

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def save(self) -> None:
        tmp = self.out / ".gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, self.out / "gpu_check.json")

    def run(self, cmd: list[str], timeout: float, log_name: str | None = None) -> tuple[int, str]:
        """(exit code, output) of a subprocess in the repository root; 124 when it ran past timeout."""
        self.say("$ " + " ".join(cmd))
        try:
            p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=timeout)
            rc, text = p.returncode, p.stdout
        except subprocess.TimeoutExpired as e:
            rc, text = 124, (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or "") + "\n[timed out]"
        self.log.write(text)
        if log_name is not None:
            (self.out / log_name).write_text(text)
        return rc, text


# ------------------------------------------------------------------------------------- sections
def section_env(c: Check) -> dict:
    import torch

    import fastddim

    figures = {"torch": torch.__version__, "cuda": torch.version.cuda, "fastddim": fastddim.__version__,
               "python": sys.version.split()[0], "backends": fastddim.info()["backends"]}
    try:
        import triton

        figures["triton"] = triton.__version__
    except ImportError:
        figures["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        figures.update(device=p.name, sms=p.multi_processor_count, memory_GiB=round(p.total_memory / 2**30, 1))
        if shutil.which("nvidia-smi"):
            figures["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                               capture_output=True, text=True).stdout.strip()
    return {"status": "passed", "figures": figures}


def _junit_counts(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{tc.get('classname')}::{tc.get('name')}" for s in suites for tc in s.iter("testcase")
              if tc.find("failure") is not None or tc.find("error") is not None]
    counts["failed"] = failed[:50]
    return counts


def section_tests(c: Check) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider", "-o", "addopts=-ra"]
    if c.cpu:
        rc, text = c.run(cmd + ["--collect-only"], timeout=300)
        collected = sum(1 for line in text.splitlines() if "::" in line)
        ok = rc == 0 and collected > 0
        return {"status": "passed" if ok else "failed", "figures": {"collected": collected, "exit": rc},
                "reason": None if ok else text[-2000:]}
    junit = Path(tempfile.mkdtemp()) / "gpu_tests.xml"
    try:
        import xdist  # noqa: F401  (the GPU machine has it: Triton compiles in parallel)

        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    except ImportError:
        pass
    rc, text = c.run(cmd + [f"--junitxml={junit}"], timeout=min(300, c.left()))
    counts = _junit_counts(junit) if junit.exists() else {}
    ok = rc == 0 and counts.get("tests", 0) > counts.get("skipped", 0)
    return {"status": "passed" if ok else "failed", "figures": {"exit": rc, **counts},
            "reason": None if ok else text[-3000:]}


def section_checks(c: Check) -> dict:
    import gpu_checks  # benchmarks/gpu_checks.py: imported here so --help needs no torch

    results, failed = {}, []
    for name, fn in gpu_checks.CHECKS:
        t0 = time.monotonic()
        try:
            figures = fn(c.cpu)
            status = "skipped" if figures.get("skipped") else "passed"
        except Exception as e:  # one check's failure must not hide the others
            figures, status = {"error": f"{type(e).__name__}: {e}"[:2000]}, "failed"
            failed.append(name)
        figures["seconds"] = round(time.monotonic() - t0, 2)
        results[name] = {"status": status, **figures}
        c.say(f"  check {name}: {status} {json.dumps(figures, default=str)[:400]}")
    return {"status": "failed" if failed else "passed", "figures": results,
            "reason": f"failed: {', '.join(failed)}" if failed else None}


def _bench(c: Check, selection: list[str], json_name: str, timeout: float) -> tuple[int, list[dict], str]:
    path = c.out / json_name
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra", "--benchmark-only",
           "--benchmark-enable", "--benchmark-columns=median,min,rounds", f"--benchmark-json={path}", *selection]
    rc, text = c.run(cmd, timeout=timeout)
    rows = json.loads(path.read_text())["benchmarks"] if path.exists() else []
    return rc, rows, text


def section_step(c: Check) -> dict:
    if c.cpu:
        sel = ["benchmarks/bench_ddim_step.py", "-k", "test_step_cpu and 1x3x32x32 and cpp and fp32 and eta0 and 1thr"]
    else:
        sel = ["benchmarks/bench_ddim_step.py", "-k",
               "(test_step_gpu or test_copy_gpu) and (1024x3x32x32 or 1024x4x64x64) and not torch"]
    rc, rows, text = _bench(c, sel, "bench_step.json", timeout=min(240, c.left()))
    table, copy = [], {}
    for r in rows:
        e = r["extra_info"]
        key = ("x".join(map(str, e["shape"])), e["out_dtype"])
        if e["backend"] == "copy":
            copy[key] = e["GBps"]
        else:
            table.append({"backend": e["backend"], "shape": key[0], "out_dtype": key[1], "eta": e["eta"],
                          "GBps": e["GBps"], "us": round(r["stats"]["median"] / e.get("steps_per_round", 1) * 1e6, 2)})
    missed = []
    for row in table:
        base = copy.get((row["shape"], row["out_dtype"]))
        if base:
            row["fraction_of_copy"] = round(row["GBps"] / base, 3)
            if row["eta"] == 0.0 and row["fraction_of_copy"] < STEP_BAR:
                missed.append(f"{row['backend']} {row['shape']} {row['out_dtype']}: {row['fraction_of_copy']:.2f}")
    ok = rc == 0 and bool(table)
    return {"status": "passed" if ok else "failed", "reason": None if ok else text[-3000:],
            "figures": {"rows": table, "copy_GBps": {f"{k[0]} {k[1]}": v for k, v in copy.items()},
                        "bar": f"eta=0 step >= {STEP_BAR:.0%} of the copy rate",
                        "bar_missed": missed if copy else None}}


def section_sample(c: Check) -> dict:
    test = "benchmarks/bench_sample.py::test_sample"
    if c.cpu:
        ids = [f"{CPU_SAMPLE_CELL}-{k}" for k in ("diffusers-eager", "fastddim-eager")]
    else:
        n1024 = "cuda-cifar10d-n1024-S10-eta0"
        ids = [f"{n1024}-{k}" for k in ("diffusers-eager", "diffusers-compile-bf16", "fastddim-graph-compile-bf16")]
        ids += [f"cuda-cifar10d-n1-S10-eta0-{k}" for k in ("diffusers-eager", "fastddim-graph-compile-bf16")]
    rc, rows, text = _bench(c, [f"{test}[{i}]" for i in ids], "bench_sample.json", timeout=min(420, c.left()))
    med = {(r["extra_info"]["cell"], r["extra_info"]["contender"]): r for r in rows}
    cells = [{k: r["extra_info"].get(k) for k in (
        "cell", "contender", "images_per_s", "seconds_median", "compile_seconds", "capture_seconds",
        "overhead", "fraction_of_ceiling", "peak_memory_MiB", "check_max_abs_diff", "graph")} for r in rows]
    bars = []
    for cell, who, base, minimum in ([] if c.cpu else SAMPLE_BARS):
        a, b = med.get((cell, who)), med.get((cell, base))
        ratio = None if a is None or b is None else b["stats"]["median"] / a["stats"]["median"]
        bars.append({"bar": f"{cell}: {who} >= {minimum:g}x {base}", "ratio": None if ratio is None else round(ratio, 3),
                     "met": None if ratio is None else ratio >= minimum})
    for r in rows:
        e = r["extra_info"]
        if e.get("graph") and e.get("overhead") is not None:
            bars.append({"bar": f"{e['cell']}: {e['contender']} overhead over S graphed forwards <= {OVERHEAD_BAR:.0%}",
                         "ratio": e["overhead"], "met": e["overhead"] <= OVERHEAD_BAR})
    ok = rc == 0 and len(rows) == len(ids)
    return {"status": "passed" if ok else "failed", "reason": None if ok else text[-3000:],
            "figures": {"cells": cells, "bars": bars}}


def section_memcheck(c: Check) -> dict:
    if c.cpu or not shutil.which("compute-sanitizer"):
        rc, text = c.run([sys.executable, str(BENCH / "gpu_check.py"), "--tiny-graph", "--cpu"], timeout=120)
        return {"status": "skipped" if rc == 0 else "failed", "reason": "needs a GPU and compute-sanitizer "
                "(the --tiny-graph run itself ran on the CPU)" if rc == 0 else text[-2000:]}
    cmd = ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "9", "--print-limit", "20",
           sys.executable, str(BENCH / "gpu_check.py"), "--tiny-graph"]
    rc, text = c.run(cmd, timeout=min(180, c.left()), log_name="memcheck.txt")
    summary = next((line for line in reversed(text.splitlines()) if "ERROR SUMMARY" in line), None)
    return {"status": "passed" if rc == 0 else "failed", "figures": {"exit": rc, "summary": summary},
            "reason": None if rc == 0 else text[-2000:]}


def section_ncu(c: Check) -> dict:
    if c.cpu or not shutil.which("ncu"):
        return {"status": "skipped", "reason": "needs a GPU and Nsight Compute (ncu)"}
    cmd = ["ncu", "--clock-control", "none", "--nvtx", "--nvtx-include", "triton/", "--nvtx-include", "cuda/",
           "--section", "SpeedOfLight", "--section", "MemoryWorkloadAnalysis",
           sys.executable, str(BENCH / "ncu_step.py"), "1024", "3", "64", "64", "fp32", "0.0"]
    rc, text = c.run(cmd, timeout=min(180, c.left()), log_name="ncu_step.txt")
    keys = ("Duration", "DRAM Throughput", "Memory Throughput", "Registers Per Thread")
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith(keys)]
    profiled = sum(1 for line in lines if line.startswith("Duration"))
    ok = rc == 0 and profiled > 0
    return {"status": "passed" if ok else "failed", "figures": {"kernels_profiled": profiled, "metrics": lines[:24]},
            "reason": None if ok else text[-2000:]}


# (name, seconds it needs at least on a GPU / on the CPU, function)
SECTIONS = [
    ("env", (5, 5), section_env),
    ("tests", (120, 60), section_tests),
    ("checks", (60, 60), section_checks),
    ("step", (30, 20), section_step),
    ("sample", (150, 30), section_sample),
    ("memcheck", (40, 10), section_memcheck),
    ("ncu", (30, 1), section_ncu),
]


def _triton_cache_count(path: Path) -> int:
    return sum(1 for p in path.iterdir() if p.is_dir()) if path.is_dir() else 0


def tiny_graph(cpu: bool) -> None:
    """A small graphed sample on each GPU backend (the memcheck target); eager on the CPU."""
    import gpu_checks

    gpu_checks.tiny_graph(cpu)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for gpu_check.json, the log and the reports (made if missing)")
    ap.add_argument("--cpu", action="store_true", help="the dry run on the CPU (what CI runs)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip a section that would end past this (default 480)")
    ap.add_argument("--only", default=None, help="comma-separated sections to run (default: all)")
    ap.add_argument("--tiny-graph", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(BENCH))
    if a.tiny_graph:
        tiny_graph(a.cpu)
        return 0
    if a.out is None:
        ap.error("--out is required")
    names = [s[0] for s in SECTIONS]
    only = names if a.only is None else [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(names))
    if unknown:
        ap.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    if a.out.exists() and not a.out.is_dir():
        ap.error(f"--out: {a.out} is a file, not a folder")
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="fastddim-triton-"))
    if a.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    cache = Path(os.environ["TRITON_CACHE_DIR"])
    c = Check(a.out, a.cpu, a.budget_s)
    c.results["triton_cache"] = {"dir": str(cache), "entries_at_start": _triton_cache_count(cache)}
    for name, need, fn in SECTIONS:
        if name not in only:
            continue
        need_s = need[1] if a.cpu else need[0]
        t0 = time.monotonic()
        if c.left() < need_s:
            res = {"status": "skipped", "reason": f"budget: {c.left():.0f} s left, needs ~{need_s} s (rerun with --only {name})"}
        else:
            c.say(f"== {name}")
            try:
                res = fn(c)
            except Exception as e:  # a broken section is reported, and the next one still runs
                res = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
        res["seconds"] = round(time.monotonic() - t0, 1)
        c.results["sections"][name] = res
        c.results["triton_cache"]["entries_now"] = _triton_cache_count(cache)
        c.save()
        c.say(f"== {name}: {res['status']} in {res['seconds']} s" + (f" ({res['reason'][:300]})" if res.get("reason") else ""))
    c.results["wall_seconds"] = round(time.monotonic() - c.t0, 1)
    c.save()
    _summary(c)
    return 1 if any(r["status"] == "failed" for r in c.results["sections"].values()) else 0


def _summary(c: Check) -> None:
    """The closing table (the device tool shows the last lines of the output)."""
    c.say("\n== summary")
    for name, r in c.results["sections"].items():
        c.say(f"  {name:<9} {r['status']:<8} {r['seconds']:>6} s")
    step = c.results["sections"].get("step", {}).get("figures", {})
    for row in step.get("rows", []):
        c.say(f"  step {row['backend']:<6} {row['shape']:<14} {row['out_dtype']:<14} eta={row['eta']:<3} "
              f"{row['GBps']:>8.1f} GB/s {row.get('fraction_of_copy', '-')}")
    for b in c.results["sections"].get("sample", {}).get("figures", {}).get("bars", []):
        c.say(f"  bar {b['bar']}: {b['ratio']} {'met' if b['met'] else 'MISSED'}")
    tc = c.results["triton_cache"]
    c.say(f"  Triton cache entries: {tc['entries_at_start']} -> {tc.get('entries_now')}; wall {c.results['wall_seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
