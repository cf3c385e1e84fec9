"""The sampling engine: prepare a run once, then push batches of samples through it.

    run = prepare(model, n=1024, steps=10)       # every check, the plan, the backend, the model
    x = run.sample()                             # (1024, *shape), batch by batch
    x = run.sample(256, first_index=1024)        # more samples from the same prepared run

``prepare`` does all the work that does not depend on the samples: argument checks, the plan,
the backend, the model as it will be called (a cached low-precision / channels_last copy and
torch.compile, never changing the user's module), and the step with its static device buffers
(plan table, rng state), which later batches update in place. ``Run.trajectory`` runs the S
steps of one batch with no host work per step beyond launching kernels: the finiteness check is
a device flag read once per batch, the progress bar moves once per batch.

``sample``, ``invert``, ``interpolate`` (fastddim/sampler.py) and ``generate`` are thin drivers
over one prepared run; ``fastddim/graph.py`` captures ``Run.trajectory`` in a CUDA graph.
"""
from __future__ import annotations

import math
import sys
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from . import copies
from .checks import check_dtype, check_int, check_seed
from .contract import check_output, model_output, resolve_device, resolve_schedule, resolve_shape
from .dispatch import Step, make_step, resolve_backend
from .guidance import Guidance, doubled_kwargs, halves, halves_kwargs, make_guidance
from .kwargs import pad, split_model_kwargs
from .plan import DPM_PLAN_KWARGS, PLAN_KWARGS, SOLVERS, Plan, make_dpm_plan, make_plan
from .profiling import nvtx_range
from .schedule import Schedule

__all__ = ["prepare", "Run", "FiniteFlags", "default_batch_size", "clear_cache", "COMPILE_MODES",
           "check_solver", "step_needs_x0"]

# torch.compile modes; the ones that make CUDA graphs of their own are refused on CUDA, where
# fastddim's capture of the whole trajectory owns the graphs (nesting them breaks both).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
# Default samples per model call, for samples of REFERENCE_NUMEL elements (see default_batch_size).
CPU_BATCH, CUDA_BATCH, REFERENCE_NUMEL = 64, 1024, 3 * 32 * 32


# ---------------------------------------------------------------- the model as it is called
def clear_cache() -> None:
    """Forget every cached plan, model copy, compiled model, layout probe and captured CUDA graph."""
    _PLANS.clear()
    copies.clear_cache()
    from . import graph

    graph.clear_cache()


def _check_compile(compile, device: torch.device) -> str | None:
    if compile is False or compile is None:
        return None
    mode = "default" if compile is True else compile
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be False, True or one of {COMPILE_MODES}, got {compile!r}")
    if device.type == "cuda" and mode in _CUDAGRAPH_MODES:
        raise ValueError(
            f"compile={mode!r} makes CUDA graphs of its own, which cannot nest inside fastddim's capture of the "
            f"whole trajectory: use compile=True ('default') or 'max-autotune-no-cudagraphs' (graph=True captures the loop)"
        )
    return mode


# ------------------------------------------------------------------------------- batching
def default_batch_size(device: torch.device, n: int, shape: tuple[int, ...]) -> int:
    """Samples per model call when not given: memory flat in n, and in the image size.

    A budget of elements per batch: 64 images of 3x32x32 on the CPU (the built-in U-Net's rate
    is flat from batch 32 up there; larger batches only cost memory), 1024 of 3x32x32 on CUDA
    (the n of the GPU benchmark's largest cell, FACTS.md section 5; not yet measured on a GPU). Larger
    samples get proportionally fewer per batch (256x256x3: 1 on the CPU, 16 on CUDA).
    """
    per_sample = math.prod(shape)
    budget = (CUDA_BATCH if device.type == "cuda" else CPU_BATCH) * REFERENCE_NUMEL
    return max(1, min(n, budget // per_sample))


class FiniteFlags:
    """Per step, on the device: was the model output not finite? Read once per batch."""

    def __init__(self, steps: int, device: torch.device, enabled: bool):
        self.enabled = enabled
        self.bad = torch.zeros(steps, dtype=torch.bool, device=device) if enabled else None

    def reset(self) -> None:
        if self.enabled:
            self.bad.fill_(False)

    def update(self, out: torch.Tensor, j: int, first: bool = True) -> None:
        """Record step j's output; ``first=False``: a second call of the same step (guidance's
        split halves), or-ed into the first's flag."""
        if self.enabled:
            # One reduction pass, no temporary: aminmax propagates NaN, and an inf is the min or
            # the max. (isfinite(out).all() costs 4 passes and a bool tensor: 30x slower on the CPU.)
            lo, hi = torch.aminmax(out)
            if first:
                torch.logical_not(lo.isfinite() & hi.isfinite(), out=self.bad[j])
            else:
                self.bad[j].logical_or_(torch.logical_not(lo.isfinite() & hi.isfinite()))

    def first_bad(self) -> int | None:
        if not self.enabled:
            return None
        bad = self.bad.nonzero()  # the one sync per batch
        return int(bad[0, 0]) if len(bad) else None


# ------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """A prepared run: everything but the samples. Make it with ``prepare``.

    Attributes: ``model`` (as called: the user's, or a cached converted/compiled copy), ``plan``,
    ``schedule`` (None when prepared from a given plan), ``backend``, ``shape`` (one sample), ``device``, ``dtype`` (the model input's; the state x_t
    is float32), ``batch_size``, ``seed``, ``n``/``first_index`` (the samples that per-sample
    ``model_kwargs`` rows describe), ``step`` (the fused step with its static device buffers),
    ``compile_mode`` and ``compile_seconds`` (the first compiled call), ``capture_seconds`` (CUDA
    graph warm-up and capture), both reported apart from the sampling time; ``memory_format``
    with ``layout`` (why: fastddim/copies.py) and ``copy_bytes`` (what the model's copy costs).
    ``guidance`` (fastddim/guidance.py; None: one conditional call per step) with the
    unconditional half's kwargs, split like model_kwargs (``uncond_shared``, ``uncond_per_sample``).
    """

    model: Callable
    plan: Plan
    schedule: Schedule | None
    backend: str
    shape: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    seed: int
    n: int
    first_index: int
    step: Step
    shared_kwargs: dict
    per_sample_kwargs: dict
    learned_variance: bool
    check_finite: bool
    compile_mode: str | None
    memory_format: Any
    pad: bool
    t_dev: torch.Tensor = field(init=False)
    flags: FiniteFlags = field(init=False)
    step_names: list = field(init=False)
    compile_seconds: float = 0.0
    capture_seconds: float = 0.0
    layout: copies.Layout | None = None  # the memory format and why (copies.choose_layout)
    copy_bytes: int = 0  # what the model's converted copy costs; 0 when called as given
    graph_replays: int = 0  # batches served by a replayed CUDA graph (graph.py): what info() reports
    guidance: Guidance | None = None
    uncond_shared: dict = field(default_factory=dict)
    uncond_per_sample: dict = field(default_factory=dict)
    _checked: bool = False

    def __post_init__(self):
        self.t_dev = torch.tensor(self.plan.timesteps, dtype=torch.int64).to(self.device)
        self.flags = FiniteFlags(self.plan.steps, self.device, self.check_finite)
        self.step_names = [f"fastddim.step {j} t={t}" for j, t in enumerate(self.plan.timesteps)]  # NVTX, made once

    # ---- pieces a driver uses
    def kwargs_for(self, start: int, b: int, rows: int | None = None) -> dict:
        """model_kwargs for samples first_index + start .. + b, padded to ``rows`` rows."""
        return _batch_kwargs(self.shared_kwargs, self.per_sample_kwargs, start, b, rows)

    def uncond_for(self, start: int, b: int, rows: int | None = None) -> dict:
        """The unconditional half's kwargs for the same samples ({} for an unguided run)."""
        return _batch_kwargs(self.uncond_shared, self.uncond_per_sample, start, b, rows)

    def guided_kwargs(self, kwargs: dict, uncond: dict, rows: int):
        """What a guided step's call(s) take for a batch of ``rows``, made once per batch: one
        doubled call's kwargs, or the split calls' (uncond, cond) pair; None when unguided."""
        if self.guidance is None:
            return None
        if self.guidance.split:
            return halves_kwargs(uncond, kwargs, rows)
        return doubled_kwargs(uncond, kwargs, rows)

    def model_outputs(self, x: torch.Tensor, t: torch.Tensor, j: int, t_host: int, kwargs: dict, guided
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Model call j on x (B, *shape) at the 0-dim timestep t: (out, out_uncond), both (B, *shape).

        Unguided (or a step outside the guidance interval): the conditional call alone,
        ``out_uncond`` None. Guided: one call on the doubled batch cat([x, x]) with the
        unconditional half first (as the Stable Diffusion pipeline), or two calls when split;
        ``guided`` is ``guided_kwargs``' result.
        """
        b = x.shape[0]
        if self.guidance is None or self.guidance.calls[j] == 1:
            return self.call_model(x, t.expand(b), kwargs, j, t_host), None
        if self.guidance.split:
            u = self.call_model(x, t.expand(b), guided[0], j, t_host)
            return self.call_model(x, t.expand(b), guided[1], j, t_host, first=False), u
        u, c = halves(self.call_model(torch.cat([x, x]), t.expand(2 * b), guided, j, t_host))
        return c, u

    def x_T(self, b: int, first_index: int) -> torch.Tensor:
        """(b, *shape) fp32 initial noise of samples first_index .. + b, by the backend's own kernel."""
        self.step.set_rng(self.seed, first_index)
        return self.step.normal(b, self.shape, 0)

    def call_model(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict, j: int, t_host: int,
                   first: bool = True) -> torch.Tensor:
        """One model call on x (B, *shape) in the run's dtype; checks the first output's shape.
        ``first=False``: step j's second call (split guidance), its finiteness or-ed into the first's."""
        if self.compile_mode is not None and self.compile_seconds == 0.0:
            t0 = time.perf_counter()
            with nvtx_range("fastddim.compile", self.device):
                out = model_output(self.model, x, t, kwargs)
            self.compile_seconds = time.perf_counter() - t0
        else:
            out = model_output(self.model, x, t, kwargs)
        if not self._checked:
            check_output(out, x, t_host, self.learned_variance)
            self._checked = True
        if self.learned_variance:
            out = out[:, : x.shape[1]]
        self.flags.update(out, j, first)
        return out

    def trajectory(self, x: torch.Tensor, first_index: int | None, kwargs: dict, callback=None,
                   uncond: dict | None = None) -> torch.Tensor:
        """The S steps of one batch: x_T (B, *shape) fp32 -> x_0 (B, *shape) fp32.

        ``first_index`` None: the rng buffer already holds it (a CUDA graph sets it before replay).
        kwargs / uncond: the batch's model_kwargs and (guided runs) unconditional kwargs, B rows.
        """
        if first_index is not None:
            self.step.set_rng(self.seed, first_index)
        b, low = x.shape[0], self.dtype != torch.float32
        x_in = x.to(self.dtype) if low else x
        guided = self.guided_kwargs(kwargs, uncond or {}, b)
        x0 = None  # DPM-Solver++(2M): each step's x0 is the next one's x0_prev (DDIM ignores it)
        for j, t in enumerate(self.plan.timesteps):
            with nvtx_range(self.step_names[j], self.device):
                out, out_uncond = self.model_outputs(x_in, self.t_dev[j], j, t, kwargs, guided)
                res = self.step(x, out, j, None, x0, out_uncond)
            x, x0 = res[0], res[1]
            x_in = res[2] if low else x
            if callback is not None:
                callback(j, t, x, x0)
        return x

    def check_batch(self, first_index: int) -> None:
        j = self.flags.first_bad()
        if j is not None:
            raise FloatingPointError(
                f"model output is not finite (NaN or inf) at step {j} (t={self.plan.timesteps[j]}) "
                f"of the batch starting at sample {first_index}"
            )

    # ---- the driver
    def sample(self, n: int | None = None, first_index: int | None = None, x_T: torch.Tensor | None = None, *,
               progress: bool | None = None, callback=None, graph: bool | str = False,
               on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """Samples first_index .. first_index + n - 1 as (n, *shape) float32 on the run's device.

        Defaults: the n samples the run was prepared for. ``x_T`` (n, *shape): start from it
        instead of the seeded noise. ``callback(step, t, x_prev, x0)`` runs after every step
        (the eager path only; prepare with need_x0=True for its x0). ``on_batch(b)`` runs after
        each batch of b samples (progress without host work per step). ``graph``: replay a
        captured CUDA graph per batch (graph.py); ``True`` raises if capture fails, ``"auto"``
        falls back to the eager loop with a warning.
        """
        n = self.n if n is None else check_int("n", n, 1)
        first_index = self.first_index if first_index is None else check_int("first_index", first_index, 0)
        self._check_range(n, first_index, x_T)
        result = torch.empty((n, *self.shape), dtype=torch.float32, device=self.device)
        bar = progress_bar(n, progress, "fastddim", "img")
        replay = None
        if graph:
            from . import graph as graph_mod

            replay = graph_mod.captured(self, strict=graph is True)
        try:
            with torch.inference_mode():
                for start in range(0, n, self.batch_size):
                    b = min(self.batch_size, n - start)
                    idx0 = first_index + start
                    x = None if x_T is None else x_T[start:start + b].to(device=self.device, dtype=torch.float32)
                    result[start:start + b] = self._batch(x, b, idx0, callback, replay)
                    if bar is not None:
                        bar.update(b)
                    if on_batch is not None:
                        on_batch(b)
        finally:
            if bar is not None:
                bar.close()
        return result

    def _batch(self, x, b: int, idx0: int, callback, replay) -> torch.Tensor:
        rows = self.batch_size if (self.pad or replay is not None) else b
        kwargs = self.kwargs_for(idx0 - self.first_index, b, rows)
        uncond = self.uncond_for(idx0 - self.first_index, b, rows)
        if replay is not None:
            return replay(x, b, idx0, kwargs, uncond)
        self.flags.reset()
        if x is None:
            x = self.x_T(rows, idx0)
        else:
            x = pad(x, rows)
        out = self.trajectory(x, idx0, kwargs, callback, uncond)
        self.check_batch(idx0)
        return out[:b]

    def _check_range(self, n: int, first_index: int, x_T) -> None:
        if first_index + n > 2**32:  # the noise counter holds the sample index in 32 bits
            raise ValueError(f"first_index + n must be <= 2**32, got {first_index + n}")
        if (self.per_sample_kwargs or self.uncond_per_sample) and not (self.first_index <= first_index and first_index + n <= self.first_index + self.n):
            raise ValueError(
                f"samples {first_index}..{first_index + n - 1} lie outside the {self.n} rows of the per-sample "
                f"model_kwargs prepared for samples {self.first_index}..{self.first_index + self.n - 1}"
            )
        if x_T is not None:
            if not isinstance(x_T, torch.Tensor):
                raise TypeError(f"x_T must be a tensor, got {type(x_T).__name__}")
            if tuple(x_T.shape) != (n, *self.shape):
                raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected (n, *shape) = {(n, *self.shape)}")


def _batch_kwargs(shared: dict, per_sample: dict, start: int, b: int, rows: int | None) -> dict:
    """shared, plus per_sample's rows start .. start + b padded to ``rows`` (default b)."""
    rows = b if rows is None else rows
    kw = dict(shared)
    for k, v in per_sample.items():
        kw[k] = pad(v[start:start + b], rows)
    return kw


def progress_bar(total: int, progress, desc: str, unit: str):
    """A tqdm bar (default: when stderr is a terminal), or None."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False)


_PLANS: "weakref.WeakKeyDictionary[Schedule, OrderedDict]" = weakref.WeakKeyDictionary()
PLANS_PER_SCHEDULE = 32


def plan_for(schedule: Schedule, steps: int, eta, spacing, plan_kwargs: dict, solver: str = "ddim") -> Plan:
    """``make_plan`` (or ``make_dpm_plan`` for solver "dpm++2m"), cached per schedule: at n = 1 the
    plan was half the cost of a 20-step call."""
    spacing_key = spacing if spacing is None or isinstance(spacing, str) else repr(list(spacing))
    key = (solver, steps, repr(eta), spacing_key, repr(sorted(plan_kwargs.items())), schedule.alphas_cumprod._version)
    plans = _PLANS.setdefault(schedule, OrderedDict())
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = _make_plan(schedule, steps, eta, spacing, check_plan_kwargs(plan_kwargs, solver), solver)
        if len(plans) > PLANS_PER_SCHEDULE:
            plans.popitem(last=False)
    else:
        plans.move_to_end(key)
    return plan


def _make_plan(schedule: Schedule, steps: int, eta, spacing, plan_kwargs: dict, solver: str) -> Plan:
    if solver == "ddim":
        return make_plan(schedule, steps, eta=eta, spacing=spacing, **plan_kwargs)
    return make_dpm_plan(schedule, steps, spacing=spacing, **plan_kwargs)


def check_solver(solver, eta=0.0) -> str:
    """``solver`` is one of SOLVERS; eta (DDIM's noise) must be 0 for the deterministic DPM solver."""
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver != "ddim" and not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and eta == 0):
        raise ValueError(f"eta={eta!r}: eta is a DDIM option; solver={solver!r} is deterministic (leave eta at 0)")
    return solver


def check_plan_kwargs(kwargs: dict, solver: str = "ddim") -> dict:
    """The plan options ``solver``'s plan maker takes; another solver's option is named as such."""
    own, other = (PLAN_KWARGS, DPM_PLAN_KWARGS) if solver == "ddim" else (DPM_PLAN_KWARGS, PLAN_KWARGS)
    foreign = sorted((set(kwargs) - set(own)) & set(other))
    if foreign:
        whose = "a DPM-Solver++ option (solver='dpm++2m')" if solver == "ddim" else "a DDIM option"
        raise ValueError(f"{', '.join(foreign)}: not an option of solver={solver!r}: {whose}")
    unknown = set(kwargs) - set(own)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    return kwargs


def step_needs_x0(plan: Plan, need_x0: bool = False) -> bool:
    """Whether the step writes x0: asked for (a callback), or the solver reads it back (DPM-Solver++)."""
    return need_x0 or plan.solver != "ddim"


def prepare(
    model: Callable,
    n: int = 1,
    steps: int = 50,
    *,
    eta: float | str = 0.0,
    schedule: Schedule | None = None,
    spacing: str | Sequence[int] | None = None,
    shape: Sequence[int] | None = None,
    seed: int = 0,
    first_index: int = 0,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    model_kwargs: dict | None = None,
    backend: str = "auto",
    compile: bool | str = False,
    memory_format: Any = "auto",
    learned_variance: bool = False,
    check_finite: bool = True,
    need_x0: bool = False,
    solver: str = "ddim",
    uncond_kwargs: dict | None = None,
    guidance_scale: float | Sequence[float] = 1.0,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
    guidance: str = "cfg",
    guidance_split: bool = False,
    pad: bool | None = None,
    x_like: torch.Tensor | None = None,
    plan: Plan | None = None,
    **plan_kwargs,
) -> Run:
    """Check everything and build a ``Run`` for samples first_index .. first_index + n - 1.

    Arguments as in ``fastddim.sample``. ``need_x0``: the step also writes the x0 prediction (for
    a callback). ``pad``: pad a partial last batch to ``batch_size`` rows (default: when the
    model is compiled, so every call has one shape). ``x_like``: a tensor whose shape/device
    fill in ``shape``/``device`` when the model does not say. ``plan``: use this plan as is
    (``steps``, ``eta``, ``spacing``, ``solver`` and plan options are then ignored).
    ``solver``: ``"ddim"`` or ``"dpm++2m"`` (DPM-Solver++(2M), ``plan.make_dpm_plan``'s options in
    ``plan_kwargs``; eta must stay 0). Guidance (``uncond_kwargs``, ``guidance_*``): see
    ``fastddim.sample``; checked by ``guidance.make_guidance`` against the plan's timesteps.
    """
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    n = check_int("n", n, 1)
    seed = check_seed(seed)
    first_index = check_int("first_index", first_index, 0)
    dtype = check_dtype("dtype", dtype)
    if not isinstance(learned_variance, bool):
        raise TypeError(f"learned_variance must be a bool, got {type(learned_variance).__name__}")
    shape = resolve_shape(model, shape, x_like)
    dev = resolve_device(model, device, x_like)
    if plan is None:
        schedule = resolve_schedule(model, schedule)
        check_int("steps", steps, 1)
        solver = check_solver(solver, eta)
        with nvtx_range("fastddim.plan", dev):
            plan = plan_for(schedule, steps, eta, spacing, plan_kwargs, solver)
    gd = _check_guidance(plan, n, model_kwargs, uncond_kwargs, guidance_scale, guidance_rescale, guidance_interval,
                         guidance, guidance_split)
    if batch_size is None:  # a doubled call holds twice the samples: the same elements per model call
        batch_size = default_batch_size(dev, n, shape) // (2 if gd is not None and not gd.split else 1) or 1
    batch_size = min(check_int("batch_size", batch_size, 1), n)
    shared, per_sample = split_model_kwargs(model_kwargs, n, dev, dtype)
    u_shared, u_per_sample = split_model_kwargs(gd.uncond_kwargs if gd else None, n, dev, dtype)
    backend_name = resolve_backend(backend, dev)
    mode = _check_compile(compile, dev)
    copies.check_memory_format(memory_format)
    low = dtype if dtype != torch.float32 else None
    step = make_step(backend_name, plan, seed, need_x0=step_needs_x0(plan, need_x0), device=dev, low_dtype=low,
                     guidance=gd)
    # the layout probe times the model as the run calls it: a doubled guided call holds 2 batches
    doubled = gd is not None and not gd.split
    rows = batch_size * (2 if doubled else 1)
    calls = (plan.steps + (gd.uncond_steps if gd is not None and gd.split else 0)) * math.ceil(n / batch_size)
    probe = lambda: _probe_inputs(  # noqa: E731
        batch_size, shape, dtype, dev, plan.timesteps[0], _batch_kwargs(shared, per_sample, 0, batch_size, None),
        _batch_kwargs(u_shared, u_per_sample, 0, batch_size, None) if doubled else None)
    layout = copies.choose_layout(memory_format, model, shape, backend_name, dtype, rows, calls, dev, probe)
    called = copies.model_as_called(model, dtype, layout.memory_format, mode)
    return Run(
        model=called, plan=plan, schedule=schedule if isinstance(schedule, Schedule) else None, backend=backend_name, shape=shape, device=dev, dtype=dtype, batch_size=batch_size,
        seed=seed, n=n, first_index=first_index, step=step, shared_kwargs=shared, per_sample_kwargs=per_sample,
        learned_variance=learned_variance, check_finite=bool(check_finite), compile_mode=mode,
        memory_format=layout.memory_format, pad=mode is not None if pad is None else bool(pad), layout=layout,
        copy_bytes=copies.copy_bytes(model, dtype, layout.memory_format), guidance=gd, uncond_shared=u_shared,
        uncond_per_sample=u_per_sample,
    )


def _check_guidance(plan: Plan, n: int, model_kwargs, uncond_kwargs, scale, rescale, interval, method,
                    split) -> Guidance | None:
    """The run's guidance (make_guidance's checks, before any model call), or None when no step
    calls the unconditional half (w = 1 everywhere: the conditional model alone, as before)."""
    if not isinstance(split, bool):
        raise TypeError(f"guidance_split must be a bool, got {type(split).__name__}")
    gd = make_guidance(plan.timesteps, scale, rescale, interval, method, uncond_kwargs, model_kwargs, n, split)
    if gd.method == "cfg++":
        if plan.solver != "ddim":
            raise ValueError(f"guidance='cfg++' is a DDIM update (its direction is the unconditional eps): "
                             f"not with solver={plan.solver!r}")
        if plan.use_clipped_model_output or plan.sigma_hat:
            what = "use_clipped_model_output" if plan.use_clipped_model_output else "eta='sigma_hat'"
            raise ValueError(f"guidance='cfg++' takes the direction's eps from the unconditional output: not with {what}")
    return gd if gd.active else None


def _probe_inputs(b: int, shape: tuple, dtype: torch.dtype, device: torch.device, t: int, kwargs: dict,
                  uncond: dict | None) -> tuple:
    """What the layout probe calls the model with: x (b, *shape) in dtype, t (b,), the first batch's
    kwargs; with ``uncond`` (a doubled guided call), 2b rows and the doubled kwargs."""
    gen = torch.Generator(device).manual_seed(0)  # the global RNG is the user's: leave it alone
    if uncond is not None:
        kwargs, b = doubled_kwargs(uncond, kwargs, b), 2 * b
    x = torch.randn((b, *shape), generator=gen, device=device).to(dtype)
    return x, torch.full((b,), t, dtype=torch.int64, device=device), kwargs
