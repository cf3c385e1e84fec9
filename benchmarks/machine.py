"""What a benchmark row records about the machine: one home for the CPU model and the versions."""
from __future__ import annotations

import os
import platform

import torch

import fastddim


def cpu_model() -> str:
    """/proc/cpuinfo's model name (the machine's architecture where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())
    except OSError:
        return platform.machine()


def versions() -> dict:
    """torch, Triton, fastddim and Python versions, threads, cores and the CPU model."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "fastddim": fastddim.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "nproc": os.cpu_count(),
            "cpu": cpu_model()}
