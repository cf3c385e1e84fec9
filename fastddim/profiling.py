"""NVTX ranges for Nsight Systems and ``ncu --nvtx``: around plan, compile, warm-up, capture, replay
and eager steps, on CUDA devices only (elsewhere a no-op). A range costs a microsecond of host
time when no profiler listens. Ranges inside a captured region appear at capture time only, so
replays are annotated around the replay call (FACTS.md section 6)."""
from __future__ import annotations

from contextlib import contextmanager

import torch

__all__ = ["nvtx_range"]


@contextmanager
def nvtx_range(name: str, device: torch.device):
    """``with nvtx_range("fastddim.replay", dev):`` an NVTX range named ``name`` when dev is CUDA."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
