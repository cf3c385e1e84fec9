"""The DDIM step: the eager torch reference (with its noise) against the fused kernels.

    pytest benchmarks --benchmark-only --benchmark-enable

GB/s counts the bytes the step's interface moves per element: x_t read (4 B), the model output
read (4 B fp32, 2 B bf16) and x_{t-1} written (4 B); the fused steps run as the sampler runs them
without a callback (need_x0=False). The count is the same for every backend (the reference's own
traffic is several times larger), so the column compares across rows and against the copy rate.
The timed call includes dispatch and, on a GPU, a synchronize; Triton compilation and the first
touch of the output pages happen in an untimed warm-up.
"""
from __future__ import annotations

import os
import platform

import pytest
import torch

import fastddim
from fastddim.dispatch import available_backends, make_step
from fastddim.plan import make_plan
from fastddim.schedule import Schedule

SCHEDULE = Schedule.linear()
CPU_SIZES = [(1, 3, 32, 32), (64, 3, 32, 32), (1024, 3, 32, 32)]
GPU_SIZES = CPU_SIZES + [(256, 3, 64, 64), (1024, 3, 64, 64)]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
ETAS = [pytest.param(0.0, id="eta0"), pytest.param(1.0, id="eta1")]
# Intra-op threads on the CPU (torch's and at::parallel_for's alike). One thread is the robust
# figure on a shared machine: with every core busy elsewhere, a parallel region waits for its
# slowest thread's next time slice (several ms) and the multi-thread medians say more about the
# neighbours than about the kernels.
THREADS = sorted({1, torch.get_num_threads()})


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())
    except OSError:
        return platform.machine()


def _versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "fastddim": fastddim.__version__,
            "threads": torch.get_num_threads(), "nproc": os.cpu_count(), "cpu": _cpu_model()}


def _run(benchmark, record_median, backend: str, device: str, shape, dtype, eta: float, threads: int | None = None) -> None:
    reason = available_backends(torch.device(device))[backend]
    if reason is not None:
        pytest.skip(reason)
    if device == "cpu" and backend == "triton":
        pytest.skip("the Triton interpreter is for tests, not timing")
    plan = make_plan(SCHEDULE, 10, eta=eta)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device)
    out = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    step = make_step(backend, plan, 1, need_x0=False, device=torch.device(device))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    j = 3  # a middle step: noise when eta > 0

    def call():
        step(x, out, j, 0)
        sync()

    call()  # warm-up: compilation, first touch
    numel = x.numel()
    slow = device == "cpu" and backend == "torch" and numel >= 1 << 20
    rounds = 3 if slow else (10 if numel >= 1 << 20 else 50)
    saved = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(saved)
    nbytes = numel * (4 + out.element_size() + 4)
    median = benchmark.stats.stats.median
    key = (device, "x".join(map(str, shape)), str(dtype).replace("torch.", ""), f"eta={eta}", f"threads={threads or saved}")
    record_median(key, backend, median)
    benchmark.extra_info.update(
        backend=backend, device=device if device == "cpu" else torch.cuda.get_device_name(), shape=list(shape),
        out_dtype=str(dtype), eta=eta, bytes=nbytes, GBps=round(nbytes / median / 1e9, 3), **_versions(),
    )
    if device == "cpu":
        benchmark.extra_info["threads"] = threads or saved


@pytest.mark.parametrize("threads", THREADS, ids=lambda n: f"{n}thr")
@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CPU_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_step_cpu(benchmark, record_median, backend, shape, dtype, eta, threads):
    _run(benchmark, record_median, backend, "cpu", shape, dtype, eta, threads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_step_gpu(benchmark, record_median, backend, shape, dtype, eta):
    _run(benchmark, record_median, backend, "cuda", shape, dtype, eta)
