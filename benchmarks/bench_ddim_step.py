"""The DDIM step: the eager torch reference (with its noise) against the fused kernels; the noise
alone against torch.randn.

    pytest benchmarks/bench_ddim_step.py --benchmark-only --benchmark-enable -q

GB/s counts the bytes the step's interface moves per element: x_t read (4 B), the model output
read (4 B fp32, 2 B bf16) and x_{t-1} written (4 B); the fused steps run as the sampler runs them
without a callback (need_x0=False). The count is the same for every backend (the reference's own
traffic is several times larger), so the column compares across rows and against the copy rate.
The timed call includes dispatch and, on a GPU, GPU_REPS back-to-back steps before one synchronize
(the row's figure is per step); Triton compilation and the first touch of the output pages happen
in an untimed warm-up. test_copy_gpu is the yardstick of the GPU bar (the step at eta = 0 at >= 85%
of the copy rate): a device-to-device copy moving the same bytes, timed the same way.

test_noise_vs_randn (CPU, one thread, 1024x3x32x32 fp32): torch.randn of that shape (allocating,
and into a preallocated tensor), fastddim.noise.normal (the plain-torch reference),
_ops.normal_("cpp") into a preallocated tensor on each C++ noise path (the default SIMD one, AVX-512 or AVX2, and scalar), and the
fused C++ step with noise (fp32 model output, eta = 1, as make_step runs it, allocating x_{t-1}).
Each row also times PAIRS interleaved (row, torch.randn) pairs for a ratio robust to the
neighbours' load; the run ends with the bars: the fused step no slower than torch.randn alone,
the reference noise within 10x of it.

test_dpm_vs_ddim (CPU, one thread, 1024x3x32x32, fp32 model output): the DPM-Solver++(2M) step
(first and second order, C++, and the torch reference's second order) against the C++ DDIM step
at eta = 0, each as the engine runs it (DDIM with need_x0=False: 12 B per element; DPM reading
x0_prev and writing x0: 16 B first order, 20 B second order), each row also in DPM_PAIRS
interleaved (row, DDIM step) pairs; the bar: the second-order step within 1.3x of the DDIM step
(paired median).
"""
from __future__ import annotations

import time

import pytest
import torch

from fastddim import _ops, noise
from fastddim.dispatch import available_backends, make_step
from fastddim.plan import make_dpm_plan, make_plan
from fastddim.schedule import Schedule
from machine import versions

SCHEDULE = Schedule.linear()
CPU_SIZES = [(1, 3, 32, 32), (64, 3, 32, 32), (1024, 3, 32, 32)]
GPU_SIZES = CPU_SIZES + [(256, 3, 64, 64), (1024, 3, 64, 64), (1024, 4, 64, 64)]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
ETAS = [pytest.param(0.0, id="eta0"), pytest.param(1.0, id="eta1")]
# Intra-op threads on the CPU (torch's and at::parallel_for's alike). One thread is the robust
# figure on a shared machine: with every core busy elsewhere, a parallel region waits for its
# slowest thread's next time slice (several ms) and the multi-thread medians say more about the
# neighbours than about the kernels.
THREADS = sorted({1, torch.get_num_threads()})
# On a GPU a timed round is GPU_REPS back-to-back launches and one synchronize (the row's time is
# the round's over GPU_REPS): a 13 us kernel timed alone would mostly measure the synchronize.
GPU_REPS = 20


def step_bytes(shape, dtype) -> int:
    """Bytes the step's interface moves: x_t read (4 B), the model output read, x_{t-1} written (4 B)."""
    numel = 1
    for d in shape:
        numel *= d
    return numel * (4 + torch.empty((), dtype=dtype).element_size() + 4)


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
    reps = GPU_REPS if device == "cuda" else 1

    def call():
        for _ in range(reps):
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
    nbytes = step_bytes(shape, dtype)
    median = benchmark.stats.stats.median / reps
    key = (device, "x".join(map(str, shape)), str(dtype).replace("torch.", ""), f"eta={eta}", f"threads={threads or saved}")
    record_median(key, backend, median)
    benchmark.extra_info.update(
        backend=backend, device=device if device == "cpu" else torch.cuda.get_device_name(), shape=list(shape),
        out_dtype=str(dtype), eta=eta, bytes=nbytes, GBps=round(nbytes / median / 1e9, 3), seconds_per_step=median,
        steps_per_round=reps, **versions(),
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_copy_gpu(benchmark, record_median, shape, dtype):
    """The device-to-device copy rate at the step's byte count: the bar's yardstick (same run).

    One fp32 copy that reads and writes as many bytes as the step of (shape, dtype) moves in all.
    """
    nbytes = step_bytes(shape, dtype)
    src = torch.randn(nbytes // 8, device="cuda")
    dst = torch.empty_like(src)

    def call():
        for _ in range(GPU_REPS):
            dst.copy_(src)
        torch.cuda.synchronize()

    call()
    benchmark.pedantic(call, rounds=20, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median / GPU_REPS
    key = ("cuda", "x".join(map(str, shape)), str(dtype).replace("torch.", ""), "copy")
    record_median(key, "copy", median, baseline="copy")
    benchmark.extra_info.update(
        backend="copy", device=torch.cuda.get_device_name(), shape=list(shape), out_dtype=str(dtype), bytes=nbytes,
        GBps=round(nbytes / median / 1e9, 3), seconds_per_copy=median, copies_per_round=GPU_REPS, **versions(),
    )


# ------------------------------------------------------------------ the noise against torch.randn
NOISE_SHAPE = (1024, 3, 32, 32)
NOISE_ROWS = ["torch.randn", "torch.randn(out=)", "reference", "normal_-cpp-simd", "normal_-cpp-scalar",
              "step-cpp-simd", "step-cpp-scalar"]
PAIRS = 7
_NOISE: dict[str, dict] = {}  # row -> {"median", "paired", "extra_info"}, for the closing bars


def _noise_call(row: str):
    """(the timed call, the C++ noise path it needs or None) for one row."""
    n, shape = NOISE_SHAPE[0], NOISE_SHAPE[1:]
    if row == "torch.randn":
        return (lambda: torch.randn(NOISE_SHAPE)), None
    if row == "torch.randn(out=)":
        buf = torch.empty(NOISE_SHAPE)
        return (lambda: torch.randn(NOISE_SHAPE, out=buf)), None
    if row == "reference":
        return (lambda: noise.normal(1, 0, n, 3, shape)), None
    if available_backends(torch.device("cpu"))["cpp"] is not None:
        pytest.skip(available_backends(torch.device("cpu"))["cpp"])
    simd = row.endswith("simd")
    if row.startswith("normal_"):
        res, rng = torch.empty(NOISE_SHAPE), _ops.rng_state(1, 0, "cpu")
        return (lambda: _ops.normal_("cpp", res, rng, 0)), simd
    plan = make_plan(SCHEDULE, 10, eta=1.0)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(NOISE_SHAPE, generator=g), torch.randn(NOISE_SHAPE, generator=g)
    step = make_step("cpp", plan, 1, need_x0=False, device=torch.device("cpu"))
    return (lambda: step(x, out, 3, 0)), simd


@pytest.fixture(scope="module")
def noise_bars(request):
    """Writes the bars once this module's noise rows have run; fills each row's vs-randn ratios."""
    yield _NOISE
    base = _NOISE.get("torch.randn")
    if not _NOISE or base is None:
        return
    for info in _NOISE.values():
        info["extra_info"]["ratio_vs_randn"] = round(info["median"] / base["median"], 3)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        _write_noise_bars(reporter.write_line, base)


def _write_noise_bars(w, base: dict) -> None:
    w("")
    w(f"noise, one thread, {'x'.join(map(str, NOISE_SHAPE))} fp32, each row's time over torch.randn's "
      f"({base['median'] * 1e3:.2f} ms), from the medians and from {PAIRS} interleaved pairs:")
    for row, info in _NOISE.items():
        w(f"  {row:<20} {info['median'] * 1e3:8.2f} ms  {info['median'] / base['median']:6.2f}x  paired "
          f"{info['paired']:.2f}x")
    bars = [("fused step with noise (cpp, fp32, eta=1) no slower than torch.randn", "step-cpp-simd", 1.0),
            ("reference noise (fastddim.noise.normal) within 10x of torch.randn", "reference", 10.0)]
    for label, row, bound in bars:
        if row in _NOISE:
            r = _NOISE[row]
            verdict = "met" if max(r["median"] / base["median"], r["paired"]) <= bound else "MISSED"
            w(f"  bar: {label}: {r['median'] / base['median']:.2f}x (medians), {r['paired']:.2f}x (paired); "
              f"<= {bound:g}x: {verdict}")


def _time_with_pairs(benchmark, call, base, rounds: int, pairs: int = PAIRS) -> list[float]:
    """Times call with benchmark (after a warm-up: first touch of the buffers), then ``pairs``
    interleaved (call, base) pairs; returns each pair's time ratio call / base."""
    call()
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    ratios = []
    for _ in range(pairs):
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        base()
        ratios.append((t1 - t0) / (time.perf_counter() - t1))
    return ratios


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


@pytest.mark.parametrize("row", NOISE_ROWS)
def test_noise_vs_randn(benchmark, noise_bars, row):
    call, simd = _noise_call(row)
    C = _ops.extension() if simd is not None else None
    saved_simd = C.cpu_simd() if C is not None else None  # the path's name, restored exactly
    saved, active = torch.get_num_threads(), None
    try:
        if C is not None:
            try:
                C.cpu_simd(simd)
            except RuntimeError as e:
                pytest.skip(str(e))
            active = C.cpu_simd()  # the path that ran (the default SIMD one may be avx512 or avx2)
        torch.set_num_threads(1)
        with torch.inference_mode():
            ratios = _time_with_pairs(benchmark, call, lambda: torch.randn(NOISE_SHAPE), 5 if row == "reference" else 15)
    finally:
        torch.set_num_threads(saved)
        if C is not None:
            C.cpu_simd(saved_simd)
    paired = _median(ratios)
    benchmark.extra_info.update(
        row=row, shape=list(NOISE_SHAPE), cpu_simd=active,
        paired_ratios_vs_randn=[round(r, 3) for r in ratios], paired_ratio_vs_randn=round(paired, 3), **versions(),
    )
    benchmark.extra_info["threads"] = 1
    noise_bars[row] = {"median": benchmark.stats.stats.median, "paired": paired, "extra_info": benchmark.extra_info}


# ------------------------------------------------------- the DPM-Solver++ step against the DDIM step
DPM_SHAPE = NOISE_SHAPE
DPM_ROWS = ["ddim-cpp-eta0", "dpm1-cpp", "dpm2-cpp", "dpm2-torch"]
DPM_BAR = 1.3  # the second-order step against the DDIM step: one more read and one more write
DPM_PAIRS = 21  # more than the noise rows' 7: the two steps differ by tens of percent, not times
_DPM: dict[str, dict] = {}  # row -> {"median", "paired"}, for the closing bar


def _step_call(row: str):
    """The timed call of one row: a step of (1024, 3, 32, 32) fp32 as the engine runs it."""
    backend = row.rsplit("-", 1)[1] if row.startswith("dpm") else "cpp"
    reason = available_backends(torch.device("cpu"))[backend]
    if reason is not None:
        pytest.skip(reason)
    g = torch.Generator().manual_seed(0)
    x, out, x0_prev = (torch.randn(DPM_SHAPE, generator=g) for _ in range(3))
    if row.startswith("ddim"):
        step = make_step(backend, make_plan(SCHEDULE, 10, eta=0.0), 1, need_x0=False)
        return lambda: step(x, out, 3, 0)
    plan = make_dpm_plan(SCHEDULE, 10)
    j = 0 if row.startswith("dpm1") else 3
    assert plan.orders[j] == int(row[3])
    step = make_step(backend, plan, 1, need_x0=True)
    return lambda: step(x, out, j, None, x0_prev)


@pytest.fixture(scope="module")
def dpm_bar(request):
    """Writes the DPM rows' ratios and the bar once this module's DPM rows have run."""
    yield _DPM
    base = _DPM.get("ddim-cpp-eta0")
    if base is None:
        return
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        w = reporter.write_line
        w("")
        w(f"DPM-Solver++(2M) step vs the DDIM step (cpp, eta 0, {base['median'] * 1e3:.2f} ms), one thread, "
          f"{'x'.join(map(str, DPM_SHAPE))}, fp32 model output, from the medians and from {DPM_PAIRS} interleaved pairs:")
        for row, info in _DPM.items():
            w(f"  {row:<14} {info['median'] * 1e3:8.2f} ms  {info['median'] / base['median']:6.2f}x  paired {info['paired']:.2f}x")
        if "dpm2-cpp" in _DPM:
            r = _DPM["dpm2-cpp"]
            verdict = "met" if r["paired"] <= DPM_BAR else "MISSED"
            w(f"  bar: second-order DPM step (cpp) within {DPM_BAR}x of the DDIM step: {r['paired']:.2f}x (paired), "
              f"{r['median'] / base['median']:.2f}x (medians); {verdict}")


@pytest.mark.parametrize("row", DPM_ROWS)
def test_dpm_vs_ddim(benchmark, dpm_bar, row):
    call, ddim = _step_call(row), _step_call("ddim-cpp-eta0")
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.inference_mode():
            ratios = _time_with_pairs(benchmark, call, ddim, 3 if row.endswith("torch") else 15, DPM_PAIRS)
    finally:
        torch.set_num_threads(saved)
    paired = _median(ratios)
    benchmark.extra_info.update(
        row=row, shape=list(DPM_SHAPE), paired_ratios_vs_ddim=[round(r, 3) for r in ratios],
        paired_ratio_vs_ddim=round(paired, 3), **versions(),
    )
    benchmark.extra_info["threads"] = 1
    dpm_bar[row] = {"median": benchmark.stats.stats.median, "paired": paired}
