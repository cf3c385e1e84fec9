"""End to end: ``fastddim.sample`` against a diffusers ``DDIMScheduler`` loop, same run, same weights.

    pytest benchmarks/bench_sample.py --benchmark-only --benchmark-enable -rs \
        --benchmark-json=benchmarks/results/<date>-<device>.json
    (`make bench` runs this and bench_ddim_step.py and names the JSON itself)

Each row is one contender on one cell (model, n, S, eta, intra-op threads); the contenders of a
cell run one after the other, so they see the same machine. Models: `cheap` (eps = 0.1 x as an
nn.Module, 3x32x32: the sampler's own cost), `cheap-dpm` (the same model sampled with
DPM-Solver++(2M): diffusers' DPMSolverMultistepScheduler loop against fastddim.sample with
**from_diffusers of it; eager rows only, the bar (c)), `mnist` (fastddim.pretrained(), 1x32x32),
`cifar10d` (diffusers UNet2DModel in the DDPM CIFAR-10 configuration, random weights, 35.7M
parameters), `cifar10` (fastddim's UNet("cifar10"), random weights; CUDA only). Contenders:
  diffusers-eager        DDIMScheduler loop over the module as loaded: set_timesteps(S), x_T from
                         torch.randn, out = model(x, t), step(out, t, x, eta=eta, generator=g)
  diffusers-compile      the same loop over torch.compile(model, dynamic=False)
  diffusers-compile-bf16 (CUDA) the same over a compiled bf16 copy, state in bf16 (as DDIMPipeline)
  fastddim-eager         fastddim.sample with default arguments (CPU) / graph=False (CUDA)
  fastddim-compile       compile=True
  fastddim-graph         (CUDA) graph=True, fp32
  fastddim-graph-compile-bf16  (CUDA) graph=True, compile=True, dtype=torch.bfloat16
  fastddim-nocheck, fastddim-bf16  (CPU diagnostics in the bar cells) check_finite=False on the
                         cheap model; dtype=torch.bfloat16 on the MNIST U-Net
Guided cells (classifier-free guidance against the diffusers CFG loop; `-k guided`): see the
section "guided cells" at the end of this file.
Both sides run under inference mode (fastddim enters it itself), draw their own x_T inside the
timed call, and sample the same schedule, timesteps and update (clip_sample=False).

Every row's extra_info (the JSON) holds images/s, the speed-up over diffusers-eager of the same
cell (filled in at the end of the run), peak memory over the timed rounds (CPU: VmHWM of the
process after `malloc_trim` and a reset through /proc/self/clear_refs, with the resident size at
the reset; CUDA: max_memory_allocated after reset_peak_memory_stats), the untimed warm-up call and
the compile / capture time inside it (fastddim: info()["last_run"]; diffusers: its first model
call), the forward alone at the contender's batch (S x batches x forward is the floor, and
`overhead` is the run's time over it, minus 1), device, versions, n, S, eta, dtype, threads, and
a check (not timed): at eta = 0, fastddim's samples from x_T= (the diffusers loop's own
torch.randn draw) against the diffusers loop's samples, within CHECK_TOL. On CUDA also the fraction of the compute ceiling: n x S x 12.44 GFLOP (a
CIFAR-10 U-Net forward, FACTS.md section 5) over the run time, against an 8192^3 bf16 matmul
measured in the same run.

CPU: intra-op threads are 1 by default (FASTDDIM_BENCH_THREADS=1,2 for more): on a machine whose
cores are shared with other jobs, a multi-thread parallel region waits for its slowest thread's
next time slice and the medians describe the neighbours. The bar cells also run at all cores
(torch's default thread count), eager contenders only. The CIFAR-10 U-Net runs on the CPU at
n = 1, S = 2, eager only; the MNIST U-Net at n = 1024 with S = 2 and eager only (CPU_SKIPS).

GPU (one run, issue 11; the full grid compiles the big U-Net ~30 times, so pick cells):
    pytest benchmarks/bench_sample.py --benchmark-only --benchmark-enable -rs \
        -k "cuda and cifar10d and (n1- or n1024-)" --benchmark-json=$OUT/bench_sample_cuda.json
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import math
import os
import sys
import tempfile
import time
import warnings

import pytest
import torch

import fastddim
from fastddim.contract import model_output
from fastddim.engine import prepare
from machine import cpu_model, versions

# Compile times are reported, so start from an empty inductor cache (as a user's first run does),
# unless the caller chose a cache directory.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fastddim-bench-inductor-"))

try:
    import diffusers
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DModel
except ImportError:  # the benchmark needs it; the library never imports it
    diffusers = None

CUDA = torch.cuda.is_available()
CIFAR10_GFLOP = 12.44  # per image forward of the DDPM CIFAR-10 U-Net (FACTS.md section 5)
BASELINE = "diffusers-eager"
CPU_THREADS = sorted({int(s) for s in os.environ.get("FASTDDIM_BENCH_THREADS", "1").split(",") if s.strip()})
ALL_CORES = os.cpu_count() or 1
SEED = 0


# --------------------------------------------------------------------------------- the models
class Cheap(torch.nn.Module):
    """eps = 0.1 * x: a model that costs one elementwise pass, so the sampler's own cost shows."""

    def forward(self, x, t):
        return 0.1 * x


def _diffusers_cifar10():
    """The DDPM CIFAR-10 U-Net as diffusers builds it (FACTS.md section 5), random weights."""
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )


@functools.lru_cache(maxsize=None)
def model_setup(name: str, device: str):
    """(module, shape, scheduler, fastddim kwargs, GFLOP per image forward or None).

    Built once per run (outside inference mode, as a user loads it). The scheduler is configured
    to compute what fastddim computes with those kwargs: for the project's models that is
    fastddim's defaults (their own schedule, no clipping), so fastddim's row uses no kwargs.
    """
    torch.manual_seed(SEED)
    if name in ("cheap", "cheap-dpm"):
        # cheap-dpm: DPM-Solver++(2M), diffusers' DPMSolverMultistepScheduler defaults, on both sides
        sched = DDIMScheduler(clip_sample=False) if name == "cheap" else DPMSolverMultistepScheduler()
        kw = dict(fastddim.from_diffusers(sched), shape=(3, 32, 32), device=device)  # no parameters to say where
        return Cheap().to(device), (3, 32, 32), sched, kw, None
    if name == "mnist":
        m = fastddim.pretrained(device=device)
        sched = DDIMScheduler(trained_betas=m.schedule.betas.tolist(), clip_sample=False)
        return m, m.sample_shape, sched, {}, None
    if name == "cifar10d":
        sched = DDIMScheduler(clip_sample=False)
        m = _diffusers_cifar10().eval().requires_grad_(False).to(device)
        return m, (3, 32, 32), sched, dict(fastddim.from_diffusers(sched)), CIFAR10_GFLOP
    if name == "cifar10":
        from fastddim.models.unet import UNet
        from fastddim.schedule import Schedule

        m = UNet("cifar10", schedule=Schedule.linear(linspace="float32"))
        m.conv_out.reset_parameters()  # zero-initialised for training: random weights give a real output
        m = m.eval().requires_grad_(False).to(device)
        sched = DDIMScheduler(trained_betas=m.schedule.betas.tolist(), clip_sample=False)
        return m, m.sample_shape, sched, {}, CIFAR10_GFLOP
    raise ValueError(name)


@functools.lru_cache(maxsize=None)
def diffusers_model(name: str, device: str, dtype: torch.dtype, compiled: bool):
    """The module the diffusers loop calls: as loaded, a bf16 copy, and/or torch.compile of it (cached)."""
    m = model_setup(name, device)[0]
    if dtype != torch.float32:
        m = copy.deepcopy(m).to(dtype)
    return torch.compile(m, dynamic=False) if compiled else m


# ------------------------------------------------------------------------------------ the cells
# contender -> (library, compile, graph, dtype)
CONTENDERS = {
    "diffusers-eager": ("diffusers", False, False, torch.float32),
    "diffusers-compile": ("diffusers", True, False, torch.float32),
    "diffusers-compile-bf16": ("diffusers", True, False, torch.bfloat16),
    "fastddim-eager": ("fastddim", False, False, torch.float32),
    "fastddim-compile": ("fastddim", True, False, torch.float32),
    "fastddim-graph": ("fastddim", False, True, torch.float32),
    "fastddim-graph-compile-bf16": ("fastddim", True, True, torch.bfloat16),
    # Diagnostics on the CPU, in the bar cells only: what the bars' misses are made of.
    "fastddim-nocheck": ("fastddim", False, False, torch.float32),  # check_finite=False
    "fastddim-bf16": ("fastddim", False, False, torch.bfloat16),  # dtype=torch.bfloat16 (not fp32-identical)
}
EXTRA_KWARGS = {"fastddim-nocheck": {"check_finite": False}}
CPU_CONTENDERS = ["diffusers-eager", "diffusers-compile", "fastddim-eager", "fastddim-compile"]

# The bars (issue 10), side by side in one run: (cell, contender) -> (label, minimum speed-up).
BAR_THREADS = sorted({*CPU_THREADS, ALL_CORES})
BARS = {}
for _thr in BAR_THREADS:
    _t = f"{_thr} thread" + ("s" if _thr > 1 else "")
    BARS[(("cpu", "cheap", 1024, 20, 1.0, _thr), "fastddim-eager")] = (f"(a) cheap model, n=1024, S=20, eta=1, {_t}", 3.0)
    BARS[(("cpu", "cheap", 1024, 20, 0.0, _thr), "fastddim-eager")] = (f"(a) cheap model, n=1024, S=20, eta=0, {_t}", 2.0)
    BARS[(("cpu", "mnist", 64, 10, 0.0, _thr), "fastddim-eager")] = (
        f"(b) fastddim.sample(fastddim.pretrained(), n=64, steps=10), defaults, {_t}", 2.0)
    BARS[(("cpu", "cheap-dpm", 1024, 20, 0.0, _thr), "fastddim-eager")] = (
        f"(c) DPM-Solver++(2M) against DPMSolverMultistepScheduler, cheap model, n=1024, S=20, {_t}", 3.0)
PAIRS = 7  # interleaved (diffusers-eager, fastddim) pairs in a bar cell: a paired ratio robust to drift

# Rows left out on the CPU, with the reason pytest prints (-rs). Compiling a U-Net at a new shape
# takes 1-2 minutes there (inductor's C++ backend, one loaded core), each contender and batch
# size apart: the compiled MNIST rows run at n = 1 and 64 (batch 1 and 64) and not again at 1024
# (batch 192 for fastddim, 1024 for diffusers).
CPU_SKIPS = {
    ("cifar10d", 1): "compiling the 35.7M-parameter CIFAR-10 U-Net with inductor's C++ backend takes minutes on a "
                     "2-core CPU; its compiled rows run on CUDA",
    ("mnist", 1024): "a third compile of the MNIST U-Net per contender (~1-2 min each here) would push the CPU run past "
                     "15 minutes; the compiled rows at n = 1 and 64 show the compiled rate",
}


def _cells():
    """(cell, contender) in run order; cell = (device, model, n, S, eta, threads)."""
    out = []
    cpu = []
    for n in (1, 64, 1024):
        for eta in (0.0, 1.0):
            cpu.append(("cpu", "cheap", n, 20, eta))
    # The MNIST U-Net is ~5 ms per image forward on one loaded core: S = 2 keeps n = 1024 near a minute.
    cpu += [("cpu", "mnist", 1, 10, 0.0), ("cpu", "mnist", 64, 10, 0.0), ("cpu", "mnist", 1024, 2, 0.0)]
    cpu += [("cpu", "cifar10d", 1, 2, 0.0)]
    for c in cpu:
        for threads in CPU_THREADS:
            for contender in CPU_CONTENDERS:
                out.append(((*c, threads), contender))
    for threads in CPU_THREADS:  # the DPM solver's bar cell: the eager loops (the sampler's own cost)
        out += [(("cpu", "cheap-dpm", 1024, 20, 0.0, threads), c) for c in (BASELINE, "fastddim-eager")]
    # The bar cells also at every core (torch's default), eager contenders: what a user gets by default.
    for cell, _ in BARS.items():
        if cell[0][5] not in CPU_THREADS:
            out += [(cell[0], BASELINE), (cell[0], "fastddim-eager")]
    # Diagnostics right after their cell's rows: the finiteness check's share of the cheap model's
    # run, and what bf16 gives the MNIST U-Net.
    diag = {"cheap": "fastddim-nocheck", "mnist": "fastddim-bf16"}
    for i in range(len(out) - 1, -1, -1):
        cell, contender = out[i]
        if contender == "fastddim-eager" and (cell, contender) in BARS and cell[1] in diag:
            out.insert(i + 1, (cell, diag[cell[1]]))
    if CUDA:
        for model in ("cifar10d", "cifar10", "mnist", "cheap"):
            for n, S in ((1, 10), (16, 10), (256, 10), (1024, 10), (1024, 50)):
                for contender in CONTENDERS:
                    out.append((("cuda", model, n, S, 0.0, None), contender))
    return out


def _id(cell, contender) -> str:
    dev, model, n, S, eta, threads = cell
    thr = f"-{threads}thr" if threads is not None else ""
    return f"{dev}-{model}-n{n}-S{S}-eta{eta:g}{thr}-{contender}"


# ----------------------------------------------------------------------------- measurement helpers
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else cpu_model()


def _versions() -> dict:
    return {**versions(), "diffusers": getattr(diffusers, "__version__", None)}


def _vm(field: str) -> int | None:
    """A field of /proc/self/status in bytes (VmHWM, VmRSS), None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory over a block: CUDA max_memory_allocated, or the CPU process's VmHWM.

    On the CPU, freed heap is first handed back (malloc_trim) and the high-water mark reset by
    writing 5 to /proc/self/clear_refs; `peak` is the process's VmHWM after the block and `base`
    its resident size at the reset, so peak - base is what the block added.
    """

    def __init__(self, device: str):
        self.device, self.base, self.peak, self.how = device, None, None, None

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.how = "cuda max_memory_allocated"
            return self
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.how = "VmHWM after clear_refs=5"
        except OSError:
            self.how = "VmHWM since process start (clear_refs not writable)"
        self.base = _vm("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = _vm("VmHWM")
        return False

    def info(self) -> dict:
        mib = lambda b: None if b is None else round(b / 2**20, 1)  # noqa: E731
        return {"peak_memory_MiB": mib(self.peak), "memory_at_start_MiB": mib(self.base),
                "peak_added_MiB": mib(None if self.peak is None or self.base is None else self.peak - self.base),
                "memory_measure": self.how}


@functools.lru_cache(maxsize=None)
def matmul_tflops() -> float:
    """bf16 dense matmul rate on this GPU (8192^3, median of 20 after warm-up), TFLOP/s."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return 2 * 8192**3 / times[len(times) // 2] / 1e12


def _time_forward(fn, x, t, device: str, graph: bool, budget_s: float = 1.0) -> dict:
    """Seconds of one forward alone at x's batch: eager calls, or replays of a CUDA graph of one.

    The model has already run at this batch in the row (compiled, cuDNN/oneDNN set up), so a
    forward slower than the budget is timed once.
    """
    with torch.inference_mode():
        call = lambda: fn(x, t)  # noqa: E731
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn(x, t)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn(x, t)
            call = g.replay
        if device == "cuda":
            call()
        _sync(device)
        t0 = time.perf_counter()
        call()
        _sync(device)
        times = [time.perf_counter() - t0]
        reps = min(50, int(budget_s / max(times[0], 1e-6)))
        for _ in range(reps):
            t0 = time.perf_counter()
            call()
            _sync(device)
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"forward_seconds": times[len(times) // 2], "forward_reps": len(times), "forward_graphed": graph}


def _rounds(seconds: float, device: str) -> int:
    """Timed rounds for a call of about `seconds`: ~4 s of rounds, 2 to 30."""
    return max(2 if seconds > 5 else 3, min(30, math.ceil(4.0 / max(seconds, 1e-6))))


# ----------------------------------------------------------------------------------- contenders
def diffusers_loop(model, sched, n: int, S: int, eta: float, shape, device: str, dtype, x_T=None, first_call=None):
    """The plain scheduler loop as a diffusers user writes it (DDIMPipeline's body): DDIMScheduler,
    or DPMSolverMultistepScheduler (deterministic: no eta; x_T * init_noise_sigma, which is 1).

    The state lives in the model's dtype, as in DDIMPipeline. ``first_call``: a list that gets the
    seconds of the first model call (the compile, for a compiled model).
    """
    step_kw = {"eta": eta} if isinstance(sched, DDIMScheduler) else {}
    g = torch.Generator(device).manual_seed(SEED)
    sched.set_timesteps(S)
    x = torch.randn((n, *shape), generator=g, device=device, dtype=dtype) if x_T is None else x_T.to(device, dtype)
    with torch.inference_mode():
        for i, t in enumerate(sched.timesteps):
            if first_call is not None and i == 0:
                t0 = time.perf_counter()
                out = model(x, t)
                _sync(device)
                first_call.append(time.perf_counter() - t0)
            else:
                out = model(x, t)
            out = out.sample if hasattr(out, "sample") else out
            x = sched.step(out, t, x, generator=g, **step_kw).prev_sample
    _sync(device)
    return x


def make_call(cell, contender):
    """(call(x_T=None, first_call=None) -> samples, description dict) for one contender on one cell."""
    dev, name, n, S, eta, _ = cell
    lib, compiled, graph, dtype = CONTENDERS[contender]
    model, shape, sched, kw, _ = model_setup(name, dev)
    if lib == "diffusers":
        m = diffusers_model(name, dev, dtype, compiled)

        def call(x_T=None, first_call=None):
            return diffusers_loop(m, sched, n, S, eta, shape, dev, dtype, x_T, first_call)

        return call, {"batch_size": n, "compile": "default" if compiled else False, "graph": False,
                      "dtype": str(dtype).removeprefix("torch."), "memory_format": "contiguous_format"}
    kwargs = dict(kw, **EXTRA_KWARGS.get(contender, {}))
    if eta != 0.0:
        kwargs["eta"] = eta
    if compiled:
        kwargs["compile"] = True
    if dtype != torch.float32:
        kwargs["dtype"] = dtype
    if dev == "cuda":
        kwargs["graph"] = graph

    def call(x_T=None, first_call=None):
        out = fastddim.sample(model, n, S, **kwargs) if x_T is None else fastddim.sample(model, n, S, x_T=x_T, **kwargs)
        _sync(dev)
        return out

    return call, {"fastddim_kwargs": sorted(k for k in kwargs if k not in kw)}


def forward_alone(cell, contender) -> dict:
    """One forward of the model exactly as the contender calls it, at the batch it uses."""
    dev, name, n, S, eta, _ = cell
    lib, compiled, graph, dtype = CONTENDERS[contender]
    model, shape, sched, kw, _ = model_setup(name, dev)
    if lib == "diffusers":
        m, b = diffusers_model(name, dev, dtype, compiled), n
        t = torch.tensor(500, device="cpu")
        fn = lambda x, t: model_output(m, x, t, {})  # noqa: E731
    else:
        extra = {"compile": True} if compiled else {}
        run = prepare(model, n, S, eta=eta, dtype=dtype, **extra, **kw)
        b = run.batch_size
        t = run.t_dev[len(run.t_dev) // 2].expand(b)
        fn = lambda x, t: model_output(run.model, x, t, {})  # noqa: E731
    with torch.inference_mode():  # as in the run: a normal tensor would make dynamo recompile
        x = torch.randn((b, *shape), device=dev).to(dtype)
    res = _time_forward(fn, x, t, dev, graph=graph)
    batches = math.ceil(n / b)
    res.update(forward_batch=b, model_calls=S * batches, floor_seconds=S * batches * res["forward_seconds"])
    return res


_REFERENCE: dict = {}


def _x_T(cell, shape):
    """The x_T the diffusers loop draws: torch.randn from a generator seeded with SEED."""
    dev, _, n, _, _, _ = cell
    return torch.randn((n, *shape), generator=torch.Generator(dev).manual_seed(SEED), device=dev)


def reference(cell):
    """(x_T, the diffusers eager loop's samples from it) for a cell at eta = 0.

    The diffusers-eager row of the cell leaves its own output here (its x_T is _x_T); a cell run
    without that row computes it.
    """
    dev, name, n, S, eta, _ = cell
    key = (dev, name, n, S)
    if key not in _REFERENCE:
        model, shape, sched, kw, _ = model_setup(name, dev)
        x_T = _x_T(cell, shape)
        _REFERENCE[key] = (x_T, diffusers_loop(model, sched, n, S, 0.0, shape, dev, torch.float32, x_T).float())
    return _REFERENCE[key]


# Tolerances of the check: max |fastddim - diffusers| over all elements of x_0 from the same x_T,
# relative to max(1, max |x_0|). CPU fp32: channels_last convolutions and the fused step reorder
# fp32 sums (measured: <= 2e-5 for the U-Nets, 0 for the cheap model, RESULTS.md); compiled:
# inductor fuses and reorders more. CUDA fp32: cuDNN convolutions run in TF32 by default
# (torch.backends.cudnn.allow_tf32) on both sides, in different algorithms per layout.
# bf16 (CUDA) is recorded, not asserted: its bound is tests/' business (graph + compile tests).
CHECK_TOL = {("cpu", False): 1e-4, ("cpu", True): 1e-3, ("cuda", False): 3e-2, ("cuda", True): 3e-2}


# ---------------------------------------------------------------------------------------- the test
@pytest.mark.skipif(diffusers is None, reason="needs diffusers (pip install diffusers): the baseline loop")
@pytest.mark.parametrize("cell,contender", [pytest.param(c, k, id=_id(c, k)) for c, k in _cells()])
def test_sample(benchmark, record_median, cell, contender):
    dev, name, n, S, eta, threads = cell
    lib, compiled, graph, dtype = CONTENDERS[contender]
    if dev == "cpu" and compiled and (name, n) in CPU_SKIPS:
        pytest.skip(CPU_SKIPS[(name, n)])
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        _run(benchmark, record_median, cell, contender)
    finally:
        torch.set_num_threads(saved)


def _run(benchmark, record_median, cell, contender):
    dev, name, n, S, eta, threads = cell
    lib, compiled, graph, dtype = CONTENDERS[contender]
    dt = str(dtype).removeprefix("torch.")
    cell_id = _id(cell, "").rstrip("-")
    benchmark.group = cell_id
    load_start = _loadavg()
    call, desc = make_call(cell, contender)

    # Warm-up (untimed): compile, capture, first touch. Its compile/capture part is reported apart.
    # On the CPU dynamo's cache is reset first, or a contender would reuse code compiled for another
    # one of the same module and shape (the cheap model; inductor's on-disk cache of this run still
    # serves repeated graphs). Not on CUDA, where recompiling the big U-Net per row costs device time:
    # there a row's compile_seconds is small when an earlier row compiled the same module and shape.
    if compiled and dev == "cpu":
        torch._dynamo.reset()
    first_call: list[float] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        call(first_call=first_call)
        warmup = time.perf_counter() - t0
    notes = [str(w.message) for w in caught]
    if graph and any("capture failed" in m for m in notes):
        pytest.fail(f"graph=True fell back to eager: {notes}")
    if lib == "fastddim":
        last = fastddim.info()["last_run"]
        compile_s, capture_s = last.get("compile_seconds"), last.get("capture_seconds")
        desc.update(batch_size=last["batch_size"], backend=last["backend"], dtype=last["dtype"],
                    compile=last["compile"] or False, memory_format=last["memory_format"], graph=last.get("graph"))
    else:
        compile_s, capture_s = (first_call[0] if compiled and first_call else None), None
    if compiled or graph:
        t0 = time.perf_counter()
        call()
        estimate = time.perf_counter() - t0
    else:
        estimate = warmup
    rounds = _rounds(estimate, dev)

    with PeakMemory(dev) as mem:
        result = benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    if contender == BASELINE and eta == 0.0:
        _REFERENCE[(dev, name, n, S)] = (_x_T(cell, model_setup(name, dev)[1]), result.float())
    del result
    stats = benchmark.stats.stats
    median = stats.median

    info = {
        "cell": cell_id, "contender": contender, "library": lib, "model": name, "n": n, "S": S, "eta": eta,
        "device": dev, "device_name": _device_name(dev), "threads": torch.get_num_threads() if dev == "cpu" else None,
        "nproc": os.cpu_count(), "images_per_s": round(n / median, 3), "seconds_median": median, "seconds_min": stats.min,
        "rounds": rounds, "warmup_seconds": round(warmup, 3), "compile_seconds": compile_s, "capture_seconds": capture_s,
        "loadavg_start": load_start, "loadavg_end": _loadavg(), "command": " ".join(sys.argv),
        "speedup_vs_diffusers_eager": None, "warnings": notes or None, **desc, **mem.info(), **_versions(),
    }
    info.setdefault("dtype", dt)

    # The floor: S x batches x one forward as this contender calls it (U-Nets only: the cheap
    # model's forward is one elementwise pass, so the ratio would only restate the sampler's cost).
    if not name.startswith("cheap"):
        fw = forward_alone(cell, contender)
        fw["overhead"] = round(median / fw["floor_seconds"] - 1, 4)
        info.update(fw)
    gflop = model_setup(name, dev)[4]
    if dev == "cuda":
        rate = matmul_tflops()
        info["matmul_bf16_tflops"] = round(rate, 1)
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        if gflop is not None:
            info["fraction_of_ceiling"] = round(n * S * gflop * 1e9 / median / (rate * 1e12), 4)

    # Paired ratio in the bar cells: alternate diffusers-eager and this call, PAIRS times.
    key = (cell, contender)
    if key in BARS or contender in ("fastddim-nocheck", "fastddim-bf16"):
        info.update(_paired(make_call(cell, BASELINE)[0], call))

    # The check (not timed): fastddim from the diffusers loop's x_T at eta = 0.
    if lib == "fastddim" and eta == 0.0:
        x_T, ref = reference(cell)
        out = call(x_T=x_T)
        diff = (out.float() - ref).abs().max().item()
        scale = max(1.0, ref.abs().max().item())  # the cheap model's x_0 reaches ~240
        tol = CHECK_TOL[(dev, compiled)] * scale if dtype == torch.float32 else None
        info.update(check_max_abs_diff=diff, check_tol=tol, check_ref_max_abs=scale)
    benchmark.extra_info.update(info)
    record_median(cell_id, contender, median, baseline=BASELINE, row=info, bar=BARS.get(key))
    if info.get("check_tol") is not None:
        assert info["check_max_abs_diff"] <= info["check_tol"], (
            f"fastddim differs from the diffusers loop by {info['check_max_abs_diff']:.3g} (tol {info['check_tol']:g})")


# ------------------------------------------------------------------------- guided cells (issue 18)
# Classifier-free guidance against the diffusers CFG loop, one thread (CPU_THREADS), run with
#     pytest benchmarks/bench_sample.py --benchmark-only -k guided -q
# A guided cell is (device, model, n, S, eta, w, phi, threads). Models:
#   cheap-cond  CheapCond (eps = 0.1 x + a class embedding, 3x32x32; the step dominates, not the
#               model) with diffusers' DDIMScheduler(clip_sample=False), the issue's bar: >= 3x
#   unet-cond   a tiny random UNet2DConditionModel (cross-attention, 4x32x32 latents) with Stable
#               Diffusion's DDIM settings, encoder_hidden_states (8 tokens of 16) per sample and one
#               shared negative prompt: exact, and at the model's floor (~1.0x expected)
# Contenders: diffusers-eager (the Stable Diffusion pipeline's CFG body: the whole batch doubled in
# one call, chunk, combine, rescale_noise_cfg when phi > 0, DDIMScheduler.step), fastddim-fullbatch
# (batch_size=n, the same batch as diffusers), fastddim-eager (defaults: half the unguided default
# batch per doubled call), fastddim-interval (batch_size=n, guidance_interval=GUIDED_INTERVAL:
# about half the steps guided; paired against fastddim-fullbatch, i.e. full guidance).
GUIDED_INTERVAL = (0, 500)  # t <= 500: the low-noise half (Kynkaenniemi et al. 2024 drop guidance at high noise)
GUIDED_CELLS = {  # cell -> contenders, in run order
    ("cpu", "cheap-cond", 1024, 20, 1.0, 5.0, 0.7): (BASELINE, "fastddim-fullbatch", "fastddim-eager"),
    ("cpu", "unet-cond", 8, 10, 0.0, 7.5, 0.0): (BASELINE, "fastddim-fullbatch", "fastddim-interval"),
}
GUIDED_BARS = {("cheap-cond", c): ("(d) guided cheap model, n=1024, S=20, eta=1, w=5, rescale 0.7", 3.0)
               for c in ("fastddim-fullbatch", "fastddim-eager")}
# What a row's pairs run against: the diffusers loop, or full guidance for the interval row.
PAIRED_AGAINST = {"fastddim-fullbatch": BASELINE, "fastddim-eager": BASELINE, "fastddim-interval": "fastddim-fullbatch"}


class CheapCond(torch.nn.Module):
    """eps = 0.1 * x + emb(class_labels): the cheap model with a class embedding (10 classes and the
    null label 10), so the sampler's own cost of a guided step shows. One elementwise pass, as
    Cheap's: ``torch.add(e, x, alpha=0.1)`` costs what ``0.1 * x`` does, where ``0.1 * x + e`` is
    two passes (2x the model's time, measured).

    x: (B, C, H, W); class_labels: (B,) int64. Returns (B, C, H, W)."""

    null_class_label = 10

    def __init__(self, channels: int = 3, classes: int = 10):
        super().__init__()
        self.emb = torch.nn.Embedding(classes + 1, channels)

    def forward(self, x, t, class_labels):
        return torch.add(self.emb(class_labels)[:, :, None, None], x, alpha=0.1)


def _tiny_unet2d_cond():
    """A small diffusers UNet2DConditionModel (0.25M parameters): cross-attention at 16x16 and in
    the middle block; random weights (conv_out re-initialised so the output is not zero)."""
    from diffusers import UNet2DConditionModel

    m = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    )
    return m.eval().requires_grad_(False)


@functools.lru_cache(maxsize=None)
def guided_setup(name: str, n: int, device: str):
    """(module, shape, scheduler, fastddim schedule kwargs, cond kwargs, uncond kwargs), built once.

    cond: one row per sample (leading dimension n); uncond: one row shared by all (leading 1), as
    a pipeline's single negative prompt or a null label."""
    torch.manual_seed(SEED)
    if name == "cheap-cond":
        sched = DDIMScheduler(clip_sample=False)
        m, shape = CheapCond().requires_grad_(False).to(device), (3, 32, 32)
        cond = {"class_labels": torch.arange(n, device=device) % 10}
        uncond = {"class_labels": torch.tensor([m.null_class_label], device=device)}
    elif name == "unet-cond":  # Stable Diffusion's scheduler settings
        sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
        m, shape = _tiny_unet2d_cond().to(device), (4, 32, 32)
        cond = {"encoder_hidden_states": torch.randn(n, 8, 16, device=device)}
        uncond = {"encoder_hidden_states": torch.randn(1, 8, 16, device=device)}
    else:
        raise ValueError(name)
    kw = dict(fastddim.from_diffusers(sched), shape=shape, device=device)
    return m, shape, sched, kw, cond, uncond


def _cfg_kwargs(cond: dict, uncond: dict, n: int) -> dict:
    """The doubled call's kwargs as the pipeline builds them once: cat([uncond, cond]), uncond first."""
    return {k: torch.cat([uncond[k].expand(n, *v.shape[1:]), v]) for k, v in cond.items()}


def diffusers_cfg_loop(model, sched, n, S, eta, shape, cond, uncond, w, phi, device, x_T=None):
    """The Stable Diffusion pipeline's denoising loop (diffusers 0.42.1) over the whole batch:
    cat([x] * 2), scale_model_input, one call, chunk, u + w * (c - u), rescale_noise_cfg when
    phi > 0, DDIMScheduler.step(eta, generator). Returns x_0 (n, *shape)."""
    from diffusers.guiders.guider_utils import rescale_noise_cfg  # the pipelines' copy needs transformers

    g = torch.Generator(device).manual_seed(SEED)
    sched.set_timesteps(S)
    x = torch.randn((n, *shape), generator=g, device=device) if x_T is None else x_T.clone()
    kw = _cfg_kwargs(cond, uncond, n)
    with torch.inference_mode():
        for t in sched.timesteps:
            x_in = sched.scale_model_input(torch.cat([x] * 2), t)
            out = model(x_in, t, **kw)
            out = out.sample if hasattr(out, "sample") else out
            u, c = out.chunk(2)
            out = u + w * (c - u)
            if phi > 0:
                out = rescale_noise_cfg(out, c, guidance_rescale=phi)
            x = sched.step(out, t, x, eta=eta, generator=g).prev_sample
    return x


def make_guided_call(cell, contender, backend: str = "auto"):
    """call(x_T=None, eta=None) -> x_0 for one contender of a guided cell (eta: the cell's unless given)."""
    dev, name, n, S, eta0, w, phi, _ = cell
    model, shape, sched, kw, cond, uncond = guided_setup(name, n, dev)
    if contender == BASELINE:
        return lambda x_T=None, eta=eta0: diffusers_cfg_loop(model, sched, n, S, eta, shape, cond, uncond, w, phi,
                                                             dev, x_T)
    extra = {"fastddim-fullbatch": {"batch_size": n}, "fastddim-eager": {},
             "fastddim-interval": {"batch_size": n, "guidance_interval": GUIDED_INTERVAL}}[contender]

    def call(x_T=None, eta=eta0):
        return fastddim.sample(model, n, S, eta=eta, x_T=x_T, model_kwargs=cond, uncond_kwargs=uncond,
                               guidance_scale=w, guidance_rescale=phi, backend=backend, **extra, **kw)

    return call


def _paired(base_call, call, pairs: int = PAIRS) -> dict:
    """Alternate base_call and call `pairs` times: each pair's time ratio base / call, and their median."""
    ratios = []
    for _ in range(pairs):
        t0 = time.perf_counter()
        base_call()
        d = time.perf_counter() - t0
        t0 = time.perf_counter()
        call()
        ratios.append(d / (time.perf_counter() - t0))
    return {"paired_ratios": [round(r, 3) for r in ratios],
            "paired_ratio_median": round(sorted(ratios)[len(ratios) // 2], 3)}


def _guided_floor(cell, batch_size: int, guided_steps: int) -> dict:
    """The floor of a guided run: per batch, guided_steps forwards of the doubled batch (2 x
    batch_size rows, [uncond; cond] kwargs) and S - guided_steps of the conditional batch alone,
    each forward of the module as given timed on its own (the cheap model's floor is not reported)."""
    dev, name, n, S, *_ = cell
    model, shape, _, _, cond, uncond = guided_setup(name, n, dev)
    c = {k: v[:batch_size] for k, v in cond.items()}
    t = torch.tensor(500)
    with torch.inference_mode():
        x = torch.randn((2 * batch_size, *shape), device=dev)

    def forward(rows: int, kw: dict) -> float:
        return _time_forward(lambda x, t: model_output(model, x, t, kw), x[:rows], t, dev, graph=False)["forward_seconds"]

    f2 = forward(2 * batch_size, _cfg_kwargs(c, uncond, batch_size))
    f1 = forward(batch_size, c) if guided_steps < S else None
    batches = math.ceil(n / batch_size)
    return {"forward_batch": batch_size, "forward_seconds_doubled": f2, "forward_seconds_single": f1,
            "model_calls": batches * S, "floor_seconds": batches * (guided_steps * f2 + (S - guided_steps) * (f1 or 0.0))}


_GUIDED_REF: dict = {}


def guided_reference(cell):
    """(x_T, the diffusers CFG loop's x_0 from it at eta = 0) of a cell, computed once."""
    dev, name, n, S, _, w, phi, _ = cell
    key = (dev, name, n, S, w, phi)
    if key not in _GUIDED_REF:
        shape = guided_setup(name, n, dev)[1]
        x_T = torch.randn((n, *shape), generator=torch.Generator(dev).manual_seed(SEED + 1), device=dev)
        _GUIDED_REF[key] = (x_T, make_guided_call(cell, BASELINE)(x_T=x_T, eta=0.0))
    return _GUIDED_REF[key]


def _guided_id(cell, contender) -> str:
    dev, name, n, S, eta, w, phi, threads = cell
    return f"guided-{dev}-{name}-n{n}-S{S}-eta{eta:g}-w{w:g}-phi{phi:g}-{threads}thr" + (f"-{contender}" if contender else "")


def _guided_params():
    return [pytest.param((*c, thr), k, id=_guided_id((*c, thr), k))
            for thr in CPU_THREADS for c, ks in GUIDED_CELLS.items() for k in ks]


@pytest.mark.skipif(diffusers is None, reason="needs diffusers (pip install diffusers): the baseline loop")
@pytest.mark.parametrize("cell,contender", _guided_params())
def test_guided(benchmark, record_median, cell, contender):
    saved = torch.get_num_threads()
    torch.set_num_threads(cell[-1])
    try:
        _run_guided(benchmark, record_median, cell, contender)
    finally:
        torch.set_num_threads(saved)


def _run_guided(benchmark, record_median, cell, contender):
    dev, name, n, S, eta, w, phi, threads = cell
    cell_id = _guided_id(cell, "")
    benchmark.group = cell_id
    load_start = _loadavg()
    call = make_guided_call(cell, contender)
    t0 = time.perf_counter()
    call()  # warm-up, untimed
    warmup = time.perf_counter() - t0
    last = fastddim.info()["last_run"] if contender != BASELINE else None
    with PeakMemory(dev) as mem:
        benchmark.pedantic(call, rounds=_rounds(warmup, dev), iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median
    info = {
        "cell": cell_id, "contender": contender, "library": "diffusers" if last is None else "fastddim", "model": name,
        "n": n, "S": S, "eta": eta, "guidance_scale": w, "guidance_rescale": phi, "device": dev,
        "device_name": _device_name(dev), "threads": torch.get_num_threads(), "nproc": os.cpu_count(),
        "images_per_s": round(n / median, 3), "seconds_median": median, "seconds_min": benchmark.stats.stats.min,
        "rounds": benchmark.stats.stats.rounds, "warmup_seconds": round(warmup, 3), "loadavg_start": load_start,
        "command": " ".join(sys.argv), "speedup_vs_diffusers_eager": None, **mem.info(), **_versions(),
    }
    if last is None:
        info.update(batch_size=n, model_calls_per_sample=2 * S, guided_steps=S)
    else:
        info.update({k: last[k] for k in ("batch_size", "backend", "memory_format", "guidance", "guidance_interval",
                                          "guided_steps", "model_calls_per_sample")})
    if name != "cheap-cond":  # the cheap model's forward would only restate the sampler's cost
        info.update(_guided_floor(cell, info["batch_size"], info["guided_steps"]))
        info["overhead"] = round(median / info["floor_seconds"] - 1, 4)
    if contender in PAIRED_AGAINST:
        info["paired_against"] = PAIRED_AGAINST[contender]
        info.update(_paired(make_guided_call(cell, PAIRED_AGAINST[contender]), call))
    if contender != BASELINE and info["guidance_interval"] is None:
        info.update(_guided_check(cell, contender))
    info["loadavg_end"] = _loadavg()
    benchmark.extra_info.update(info)
    bar = GUIDED_BARS.get((name, contender))
    record_median(cell_id, contender, median, baseline=BASELINE, row=info, bar=bar and (f"{bar[0]}, {contender}", bar[1]))
    for backend, diff, tol in info.get("checks", []):
        assert diff <= tol, f"guided fastddim ({backend}) differs from the diffusers CFG loop by {diff:.3g} (tol {tol:g})"


def _guided_check(cell, contender) -> dict:
    """Untimed: the contender at eta = 0 from the diffusers CFG loop's own x_T, on backend="torch"
    (bit for bit: tolerance 0) and on the default backend (within CHECK_TOL relative)."""
    dev = cell[0]
    x_T, ref = guided_reference(cell)
    scale = max(1.0, ref.abs().max().item())
    checks = []
    for backend in ("torch", "auto"):
        out = make_guided_call(cell, contender, backend)(x_T=x_T, eta=0.0)
        ran = fastddim.info()["last_run"]["backend"]
        tol = 0.0 if ran == "torch" else CHECK_TOL[(dev, False)] * scale
        checks.append((ran, (out - ref).abs().max().item(), tol))
    return {"checks": checks, "check_ref_max_abs": scale}
