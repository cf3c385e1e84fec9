"""One warm fused step per GPU backend inside an NVTX range named after it, for Nsight Compute.

    ncu --clock-control none --nvtx --nvtx-include "triton/" --nvtx-include "cuda/" \
        --section SpeedOfLight --section MemoryWorkloadAnalysis \
        python benchmarks/ncu_step.py [B C H W] [fp32|bf16] [eta]

Two unprofiled warm-up steps per backend come first (Triton compilation, first touch), so the
profiled launch is the one inside the range. Defaults: 1024 3 64 64 fp32 1.0.
"""
from __future__ import annotations

import sys

import torch

from fastddim.dispatch import available_backends, make_step
from fastddim.plan import make_plan
from fastddim.schedule import Schedule

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv: list[str]) -> None:
    shape = tuple(int(v) for v in argv[:4]) if len(argv) >= 4 else (1024, 3, 64, 64)
    dtype = DTYPES[argv[4] if len(argv) > 4 else "fp32"]
    eta = float(argv[5]) if len(argv) > 5 else 1.0
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(dev)
    out = torch.randn(shape, generator=g).to(dev, dtype)
    plan = make_plan(Schedule.linear(), 10, eta=eta)
    for backend in ("triton", "cuda"):
        reason = available_backends(dev)[backend]
        if reason is not None:
            print("skip", backend, reason)
            continue
        step = make_step(backend, plan, 1, need_x0=False, device=dev)
        for _ in range(2):
            step(x, out, 3, 0)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push(backend)
        step(x, out, 3, 0)
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        print("ran", backend, shape, dtype, "eta", eta, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
