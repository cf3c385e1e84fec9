"""The checks of benchmarks/gpu_check.py that the test suite does not make (issue 21, part A).

Each check takes ``cpu`` (the dry run: CPU backends, Triton under the interpreter, no graphs,
small sizes) and returns a dict of figures, or raises when the GPU path is wrong. On a GPU every
graphed call is strict (``graph=True`` raises when capture fails) and must report
``info()["last_run"]["graph"] is True``: a check never passes on an eager fallback.
"""
from __future__ import annotations

import torch

import fastddim
from fastddim.dispatch import available_backends, make_step
from fastddim.plan import make_plan
from fastddim.schedule import Schedule

SCHED = Schedule.linear()


def _device(cpu: bool) -> torch.device:
    return torch.device("cpu" if cpu else "cuda")


def _fused(cpu: bool) -> list[str]:
    """The fused backends under test: Triton (the interpreter on the CPU) and C++ or CUDA."""
    dev = _device(cpu)
    names = ["triton", "cpp" if cpu else "cuda"]
    missing = {b: available_backends(dev)[b] for b in names if available_backends(dev)[b] is not None}
    if missing:
        raise RuntimeError(f"backends not available on {dev}: {missing}")
    return names


def _step_error(backend: str, shape: tuple, out_dtype: torch.dtype, eta: float, dev: torch.device,
                rows: slice | None = None) -> float:
    """max |fused - reference| / max(1, max |reference|) of step 3 of a 10-step plan on (B, *shape)."""
    plan = make_plan(SCHED, 10, eta=eta)
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(shape, generator=g, device=dev)
    out = torch.randn(shape, generator=g, device=dev).to(out_dtype)
    fused, _ = make_step(backend, plan, 5, need_x0=False, device=dev)(x, out, 3, 0)
    rows = rows or slice(0, shape[0])
    first = rows.start
    ref, _ = make_step("torch", plan, 5, device=dev)(x[rows], out[rows].float(), 3, first)
    err = (fused[rows] - ref).abs().max().item()
    return err / max(1.0, ref.abs().max().item())


def triton_size_classes(cpu: bool) -> dict:
    """The step against the reference on the three Triton size classes: numel per sample a
    multiple of 16, not (3x37x37), tiny (1x3x3); fp32 and bf16 model output; eta 0 and 1."""
    dev = _device(cpu)
    shapes = [(2, 3, 16, 16), (2, 3, 37, 37), (3, 1, 3, 3)] if cpu else [(64, 3, 32, 32), (64, 3, 37, 37), (5, 1, 3, 3)]
    worst = {}
    for backend in _fused(cpu):
        for shape in shapes:
            for dt in (torch.float32, torch.bfloat16):
                for eta in (0.0, 1.0):
                    key = f"{backend} {'x'.join(map(str, shape))} {str(dt)[6:]} eta={eta:g}"
                    worst[key] = _step_error(backend, shape, dt, eta, dev)
    bad = {k: v for k, v in worst.items() if v > 1e-5}
    if bad:
        raise AssertionError(f"fused step off the reference by more than 1e-5 (relative): {bad}")
    return {"max_rel_error": max(worst.values()), "cases": len(worst)}


def batch_past_int32(cpu: bool) -> dict:
    """A batch of more than 2**31 elements (26 GB of fp32 state): the last samples, whose element
    offsets overflow int32, against the reference (noise indexed by sample: eta = 1)."""
    if cpu:
        return {"skipped": "needs ~26 GB of device memory: GPU only"}
    dev = _device(cpu)
    per = 3 * 64 * 64
    B = 2**31 // per + 2
    errs = {}
    for backend in _fused(cpu):
        errs[backend] = _step_error(backend, (B, 3, 64, 64), torch.bfloat16, 1.0, dev, rows=slice(B - 3, B))
        torch.cuda.empty_cache()
    if max(errs.values()) > 1e-5:
        raise AssertionError(f"rows past 2**31 elements off the reference: {errs}")
    return {"batch": B, "elements": B * per, "max_rel_error": errs}


class CondConv(torch.nn.Module):
    """A small class-conditional conv eps-model (rows do not interact)."""

    def __init__(self, classes: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.sample_shape, self.schedule = (3, 16, 16), SCHED
        self.embed = torch.nn.Embedding(classes, 16)
        self.a = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.b = torch.nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x, t, class_labels=None):
        h = self.a(x) + (t.to(x.dtype) / 1000).view(-1, 1, 1, 1)
        if class_labels is not None:
            h = h + self.embed(class_labels).to(x.dtype)[:, :, None, None]
        return self.b(torch.nn.functional.silu(h))


def _graphed(model, cpu: bool, **kw) -> torch.Tensor:
    """fastddim.sample with a strict graph on the GPU (asserting one replayed), eagerly on the CPU."""
    out = fastddim.sample(model, graph=not cpu, progress=False, **kw)
    ran = fastddim.info()["last_run"].get("graph")
    if not cpu and ran is not True:
        raise AssertionError(f"graph=True returned without a replayed graph (last_run graph={ran!r})")
    return out


def graph_threshold_kwargs(cpu: bool) -> dict:
    """Thresholding and per-sample class labels inside a captured graph, on each fused backend,
    equal to the eager loop (n = 10 in batches of 4: a padded partial batch too)."""
    dev = _device(cpu)
    model = CondConv().to(dev).eval()
    labels = torch.arange(10, device=dev) % 4
    kw = dict(n=10, steps=5, eta=1.0, batch_size=4, seed=2, thresholding=True, model_kwargs={"class_labels": labels})
    errs = {}
    for backend in _fused(cpu):
        if cpu and backend == "triton":
            continue  # the interpreter is minutes per U-Net-free sample of this size: the size check covers it
        eager = fastddim.sample(model, graph=False, backend=backend, progress=False, **kw)
        g = _graphed(model, cpu, backend=backend, **kw)
        errs[backend] = (g - eager).abs().max().item()
    if max(errs.values()) > 1e-5:
        raise AssertionError(f"graph with thresholding and per-sample labels differs from eager: {errs}")
    return {"max_abs_diff": errs}


def graph_guided(cpu: bool) -> dict:
    """Classifier-free guidance inside a captured graph (doubled calls with per-sample labels and a
    shared null label, rescale 0.7, an interval that leaves some steps conditional-only; and the
    split calls), on each fused backend, equal to the eager loop."""
    dev = _device(cpu)
    model = CondConv(classes=5).to(dev).eval()  # label 4 plays the null label
    labels = torch.arange(10, device=dev) % 4
    base = dict(n=10, steps=6, eta=1.0, batch_size=4, seed=3, model_kwargs={"class_labels": labels},
                uncond_kwargs={"class_labels": torch.tensor([4], device=dev)}, guidance_scale=4.0,
                guidance_rescale=0.7, guidance_interval=(150, 850))
    errs = {}
    for backend in _fused(cpu):
        if cpu and backend == "triton":
            continue  # the interpreter: the size check covers it
        for split in (False, True):
            kw = dict(base, guidance_split=split, backend=backend)
            eager = fastddim.sample(model, graph=False, progress=False, **kw)
            g = _graphed(model, cpu, **kw)
            errs[f"{backend}{'-split' if split else ''}"] = (g - eager).abs().max().item()
    calls = fastddim.info()["last_run"]["model_calls_per_sample"]
    if max(errs.values()) > 1e-5:
        raise AssertionError(f"guided graph differs from eager: {errs}")
    return {"max_abs_diff": errs, "model_calls_per_sample": calls}


def graph_sync_free(cpu: bool) -> dict:
    """A replay of a captured trajectory (compiled model, bf16, thresholding) under
    torch.cuda.set_sync_debug_mode("error"): nothing between the batch's start and its output
    synchronizes with the host (the finiteness flags, read once per batch, are off here)."""
    if cpu:
        return {"skipped": "CUDA sync debug mode: GPU only"}
    dev = _device(cpu)
    model = CondConv().to(dev).eval()
    kw = dict(n=8, steps=5, eta=1.0, batch_size=8, thresholding=True, check_finite=False)
    run = fastddim.prepare(model, **kw)
    run.sample(graph=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run.sample(graph=True, first_index=8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"replayed_under": "set_sync_debug_mode('error')"}


def compile_graph_bf16_channels_last(cpu: bool) -> dict:
    """compile=True + graph + bf16 on a channels_last model against the fp32 eager loop."""
    dev = _device(cpu)
    model = CondConv().to(dev).eval().to(memory_format=torch.channels_last)
    kw = dict(n=8, steps=6, batch_size=8, seed=1)
    ref = fastddim.sample(model, graph=False, progress=False, **kw)
    if cpu:  # no compile: inductor's CPU build of even this model would dominate the dry run
        fast = fastddim.sample(model, dtype=torch.bfloat16, graph=False, progress=False, **kw)
    else:
        fast = _graphed(model, cpu, compile=True, dtype=torch.bfloat16, **kw)
    err = (fast - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    if err > 5e-2:
        raise AssertionError(f"compiled bf16 graph off the fp32 eager loop by {err:.3g} (relative)")
    return {"max_rel_error": err, "memory_format": fastddim.info()["last_run"].get("memory_format")}


def tiny_graph(cpu: bool) -> None:
    """A small graphed sample on each fused backend: compute-sanitizer's target."""
    dev = _device(cpu)
    model = CondConv().to(dev).eval()
    for backend in _fused(cpu):
        if cpu and backend == "triton":
            continue
        x = _graphed(model, cpu, n=4, steps=3, eta=1.0, backend=backend, thresholding=True)
        print(backend, tuple(x.shape), "finite:", bool(torch.isfinite(x).all()), flush=True)


CHECKS = [
    ("triton_size_classes", triton_size_classes),
    ("graph_threshold_kwargs", graph_threshold_kwargs),
    ("graph_guided", graph_guided),
    ("graph_sync_free", graph_sync_free),
    ("compile_graph_bf16_channels_last", compile_graph_bf16_channels_last),
    ("batch_past_int32", batch_past_int32),
]
