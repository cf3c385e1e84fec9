"""Benchmark collection (bench_*.py files), the run's conditions in the JSON, and closing tables.

Two tables close a run: the fused step's speed-up over the eager torch reference
(bench_ddim_step.py) and, for bench_sample.py, every contender against the diffusers eager loop
of its cell, then the bars with their measured ratios. The same ratios go into each row's
extra_info in the JSON (`speedup_vs_diffusers_eager`), computed from the medians of this run.
"""
import os
import platform
import subprocess
import sys
import time

import pytest

_MEDIANS: dict[tuple, float] = {}
_BASELINE: dict = {}  # key -> name of the row its ratios are taken against
_ROWS: dict[tuple, dict] = {}  # (key, backend) -> the row's extra_info (bench_sample)
_BARS: dict[tuple, tuple] = {}  # (key, backend) -> (label, minimum speed-up)
_START = {"time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "loadavg": None}


def pytest_collect_file(file_path, parent):
    if parent.session.isinitpath(file_path):  # named on the command line: pytest collects it itself
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def pytest_sessionstart(session):
    _START["loadavg"] = _loadavg()
    _START["time"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    _START["t0"] = time.time()


@pytest.fixture
def record_median():
    """record_median(key, backend, seconds, baseline="torch", row=None, bar=None).

    Remembered for the closing tables: rows of the same key are compared with its `baseline` row.
    `row` (a dict: images_per_s, peak memory, compile time, ...) adds columns; `bar` =
    (label, minimum speed-up over the baseline) lists the row among the bars.
    """
    def record(key, backend: str, seconds: float, baseline: str = "torch", row: dict | None = None,
               bar: tuple | None = None) -> None:
        _MEDIANS[(key, backend)] = seconds
        _BASELINE[key] = baseline
        if row is not None:
            _ROWS[(key, backend)] = row
            base = _MEDIANS.get((key, baseline))
            if base is not None:
                row["speedup_vs_diffusers_eager"] = round(base / seconds, 3)
        if bar is not None:
            _BARS[(key, backend)] = bar

    return record


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def pytest_benchmark_update_machine_info(config, machine_info):
    """The run's conditions: device, versions, the command, the load at start (end: in the JSON's root)."""
    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    try:
        import diffusers

        dv = diffusers.__version__
    except ImportError:
        dv = None
    import fastddim

    machine_info.update(
        cuda_device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        cuda_driver=_driver() if torch.cuda.is_available() else None,
        nproc=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__, triton=tv,
        diffusers=dv, fastddim=fastddim.__version__, python_full=platform.python_version(),
        command=" ".join(sys.argv), started=_START["time"], loadavg_start=_START["loadavg"], git=_git_commit(),
    )


def _driver():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Speed-ups over the cell's diffusers-eager row from this run's medians; the load at the end."""
    rows = output_json.get("benchmarks", [])
    base = {}
    for r in rows:
        ei = r.get("extra_info", {})
        if ei.get("contender") == "diffusers-eager":
            base[ei.get("cell")] = r["stats"]["median"]
    for r in rows:
        ei = r.get("extra_info", {})
        if "cell" in ei and ei["cell"] in base:
            ei["speedup_vs_diffusers_eager"] = round(base[ei["cell"]] / r["stats"]["median"], 3)
    output_json["loadavg_end"] = _loadavg()
    output_json["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    if "t0" in _START:
        output_json["wall_seconds"] = round(time.time() - _START["t0"], 1)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def pytest_terminal_summary(terminalreporter):
    w = terminalreporter.write_line
    # The step kernel: each row against the torch reference of its key.
    keys = sorted({k for k, b in _MEDIANS if b == "torch" and _BASELINE.get(k) == "torch"}, key=str)
    rows = []
    for key in keys:
        ref = _MEDIANS[(key, "torch")]
        for (k, b), t in sorted(_MEDIANS.items(), key=str):
            if k == key and b != "torch":
                rows.append(f"  {key}: {b} {t * 1e3:.3f} ms vs torch {ref * 1e3:.3f} ms -> {ref / t:.1f}x")
    if rows:
        w("speed-up of the fused step over the eager torch reference (medians):")
        for r in rows:
            w(r)

    # End to end (bench_sample): one block per cell, in run order.
    if _ROWS:
        w("")
        w("end to end, each contender against the cell's diffusers-eager loop (medians of this run):")
        w(f"  {'cell / contender':<44} {'median s':>9} {'min s':>8} {'img/s':>9} {'speedup':>8} "
          f"{'peak MiB':>9} {'+MiB':>7} {'warm-up s':>9} {'compile s':>9} {'overhead':>8} {'check':>9}")
        cells = list(dict.fromkeys(k for k, _ in _ROWS))
        for cell in cells:
            w(f"  {cell}")
            base = _MEDIANS.get((cell, _BASELINE.get(cell)))
            for (k, b), row in _ROWS.items():
                if k != cell:
                    continue
                t = _MEDIANS[(k, b)]
                sp = None if base is None else base / t
                w(f"    {b:<42} {t:>9.4f} {row.get('seconds_min', t):>8.4f} {row['images_per_s']:>9.1f} "
                  f"{_fmt(sp, '>7.2f')}x {_fmt(row.get('peak_memory_MiB'), '>9.0f')} "
                  f"{_fmt(row.get('peak_added_MiB'), '>7.0f')} {_fmt(row.get('warmup_seconds'), '>9.2f')} "
                  f"{_fmt(row.get('compile_seconds'), '>9.2f')} {_fmt(row.get('overhead'), '>8.3f')} "
                  f"{_fmt(row.get('check_max_abs_diff'), '>9.1e')}")
    if _BARS:
        w("")
        w("bars (speed-up over the diffusers-eager loop of the same cell, same run):")
        for (k, b), (label, minimum) in _BARS.items():
            base = _MEDIANS.get((k, _BASELINE.get(k)))
            t = _MEDIANS[(k, b)]
            row = _ROWS.get((k, b), {})
            if base is None:
                w(f"  {label}: {b} {t:.4f} s; no baseline row in this run")
                continue
            ratio = base / t
            paired = row.get("paired_ratio_median")
            # Both figures must clear the bar: on a shared machine the medians of back-to-back
            # rounds and the interleaved pairs can disagree.
            verdict = "met" if min(ratio, paired if paired is not None else ratio) >= minimum else "MISSED"
            w(f"  {label}: {ratio:.2f}x from the medians ({base:.4f} s / {t:.4f} s), paired median "
              f"{_fmt(paired, '.2f')}x {row.get('paired_ratios', '')}; bar >= {minimum:g}x: {verdict}")


def device_slug() -> str:
    """The device part of a results file name: the GPU's name, or cpu-<nproc>cores-<CPU model>."""
    import re

    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        from machine import cpu_model

        name = f"cpu-{os.cpu_count()}cores-{cpu_model()}"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


if __name__ == "__main__" and sys.argv[1:] == ["--device-slug"]:  # for the Makefile's bench target
    print(device_slug())
