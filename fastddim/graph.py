"""CUDA graphs of the whole S-step trajectory, captured once and replayed per batch.

At small n a step costs more in kernel launches (~330 per U-Net forward) than in arithmetic;
one graph replay launches the whole trajectory (S model calls and S fused steps) at once.

What a captured graph owns, made before capture and updated in place between replays (a replay
reads the addresses baked in at capture, FACTS.md section 6):
    x_in (B, *shape) fp32         the batch's x_T: seeded noise drawn by the backend's kernel, or a copy
    the step's rng (2,) int64     (seed bits, first_index), written with fill_ before each replay
    the step's table (S, k)       the plan's scalars
    (DPM-Solver++: each step's x0, the next step's x0_prev, is made and read inside the graph)
    model_kwargs tensors          copied in per batch (per-sample rows, padded to B)
    the finiteness flags (S,)     read once per batch after the replay
The output lives in the graph's memory pool and is cloned out before the next replay. A partial
last batch is padded to B rows (never a second capture). Warm-up runs on a side stream first, so
Triton compilation, cuDNN/cuBLAS set-up and torch.compile all happen before capture; a model's
own error raises there, as it would without a graph.

Strict or not: ``captured(run, strict=True)`` (``graph=True``) raises ``CaptureError`` from the
cause when capture fails; ``strict=False`` (``graph="auto"``) warns and returns None, and the run
goes eagerly. A failure is cached like a graph, so a later call does not warm up again for it.

The cache (one rule for memory, one for lifetime):
- Graphs are cached per (model and its weights' addresses, batch, shape, plan, dtype, device,
  backend, compile mode, memory format, kwargs layout).
- Memory: the graphs of one model on one device share one memory pool. Their replays run one at
  a time on one stream and each replay's output is copied out before the next, so a graph may
  reuse another's temporaries: a model's graphs cost about its largest trajectory's activations
  plus one output per graph, not the sum of their activations. A graph's cost is counted as the
  growth of the device's reserved memory during its capture. The cache keeps at most
  ``MAX_GRAPHS`` graphs and at most ``MAX_GRAPH_BYTES`` counted bytes per device (default
  ``MEMORY_FRACTION`` of the device's memory), dropping the least recently used first; the graph
  just captured is always kept, whatever its size.
- Lifetime: a graph holds its model's weight tensors (their addresses are baked in) but not the
  model; the cache watches the model through a weak reference and drops the model's graphs when it
  is collected. A callable that cannot be weakly referenced is held until ``clear_cache()``.
``fastddim.clear_cache()`` frees every graph.

This module imports the run (engine) and the dispatch, never sampler.py.
"""
from __future__ import annotations

import dataclasses
import math
import time
import types
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Callable

import torch

from .dispatch import Step
from .engine import step_needs_x0
from .profiling import nvtx_range

__all__ = ["captured", "clear_cache", "CaptureError", "MAX_GRAPHS", "MAX_GRAPH_BYTES", "MEMORY_FRACTION"]

MAX_GRAPHS = 8
MAX_GRAPH_BYTES: int | None = None  # None: MEMORY_FRACTION of the device's total memory
MEMORY_FRACTION = 0.25

_CACHE: "OrderedDict[tuple, _Graph | _Failed]" = OrderedDict()  # least recently used first
_MODELS: "dict[int, _Watch]" = {}  # id(model) -> its weak reference and memory pools
# Models collected while the cache was being walked: forgotten once the walk ends (a weakref
# callback can run at any allocation, and must not change _CACHE under an iteration).
_DEAD: list[int] = []
_WALKING = [False]


class CaptureError(RuntimeError):
    """graph=True and the trajectory could not be captured in a CUDA graph (the cause is chained)."""


@dataclasses.dataclass
class _Failed:
    """A cached failed capture: the next call falls back (or raises) without warming up again."""

    device: torch.device
    cause: str
    bytes: int = 0


@dataclasses.dataclass
class _Watch:
    """A model with cached graphs: a weak reference that evicts them, and their shared pools."""

    ref: Any  # weakref.ref / WeakMethod, or the model itself when it cannot be weakly referenced
    pools: dict = dataclasses.field(default_factory=dict)  # device -> pool handle


def clear_cache() -> None:
    """Free every captured graph (and its memory pool)."""
    _CACHE.clear()
    _MODELS.clear()


def _kwargs_layout(shared: dict, per_sample: dict) -> tuple:
    shared = tuple(sorted(
        (k, ("tensor", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else ("value", repr(v)))
        for k, v in shared.items()
    ))
    per_sample = tuple(sorted((k, tuple(v.shape[1:]), v.dtype) for k, v in per_sample.items()))
    return shared, per_sample


def _static_kwargs(shared: dict, per_sample: dict, rows: int, device: torch.device) -> dict:
    """The graph's own kwargs buffers: per-sample tensors as (rows, ...) zeros (copied into per
    batch), shared tensors cloned, non-tensors as they are."""
    kw = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in shared.items()}
    for k, v in per_sample.items():
        kw[k] = torch.zeros((rows, *v.shape[1:]), dtype=v.dtype, device=device)
    return kw


def _weights(model) -> list[torch.Tensor]:
    if isinstance(model, torch.nn.Module):
        return [*model.parameters(), *model.buffers()]
    return []


def _key(run) -> tuple:
    """The cache key; its first item is id(run.model) (what _forget matches)."""
    plan = run.plan
    return (
        id(run.model), tuple(t.data_ptr() for t in _weights(run.model)), run.batch_size, run.shape, plan.timesteps,
        plan.table.numpy().tobytes(), plan.noise, repr(sorted(plan.describe().items())), run.dtype, run.device,
        run.backend, run.compile_mode, str(run.memory_format), run.learned_variance, run.check_finite,
        _kwargs_layout(run.shared_kwargs, run.per_sample_kwargs), run.guidance,
        _kwargs_layout(run.uncond_shared, run.uncond_per_sample),
    )


class _Graph:
    """One captured trajectory for batches of ``run.batch_size`` rows.

    After capture it keeps only what a replay touches (its static buffers, the step, the flags and
    the model's weight tensors), not the model: the cache can then notice the model's death.
    """

    def __init__(self, run):
        B = run.batch_size
        low = run.dtype if run.dtype != torch.float32 else None
        # x0 only where the solver reads it back (DPM-Solver++: made and consumed inside the graph)
        step = Step(run.backend, run.plan, run.seed, need_x0=step_needs_x0(run.plan), device=run.device, low_dtype=low,
                    guidance=run.guidance)
        # A run of our own: its step, flags and timestep tensor are this graph's static buffers.
        self.run = dataclasses.replace(run, step=step)
        self.device = run.device
        self.x_in = torch.zeros((B, *run.shape), dtype=torch.float32, device=run.device)
        # the guided trajectory's doubled kwargs are made inside the graph from these two
        self.kwargs = _static_kwargs(run.shared_kwargs, run.per_sample_kwargs, B, run.device)
        self.uncond = _static_kwargs(run.uncond_shared, run.uncond_per_sample, B, run.device)
        self.graph = torch.cuda.CUDAGraph()
        self.bytes = 0  # reserved-memory growth during capture (what the cache's memory bound counts)
        self.replays = 0

    def _body(self) -> torch.Tensor:
        return self.run.trajectory(self.x_in, None, self.kwargs, None, self.uncond)

    def warm_up(self) -> None:
        """Compile Triton kernels, pick cuDNN algorithms, make cuBLAS handles, run torch.compile and
        check the model's output shape, on a side stream, before capture. A model error raises here."""
        dev = self.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with nvtx_range("fastddim.warmup", dev), torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                self._body()
        torch.cuda.current_stream(dev).wait_stream(side)

    def capture(self, pool) -> None:
        """Capture into ``pool`` (a handle shared by the model's graphs on this device, or None)."""
        dev = self.device
        before = torch.cuda.memory_reserved(dev)
        try:
            with nvtx_range("fastddim.capture", dev), torch.inference_mode():
                with torch.cuda.graph(self.graph, pool=pool):
                    self.out = self._body()
        except Exception:
            torch.cuda.synchronize(dev)  # let the failed capture's work finish before anything else
            raise
        self.bytes = torch.cuda.memory_reserved(dev) - before
        self._let_go_of_the_model()

    def _let_go_of_the_model(self) -> None:
        self.weights = _weights(self.run.model)  # addresses baked into the graph: keep them valid
        self.run.model = None
        self.run.shared_kwargs, self.run.per_sample_kwargs = {}, {}
        self.run.uncond_shared, self.run.uncond_per_sample = {}, {}
        self.kwargs = {k: v for k, v in self.kwargs.items() if isinstance(v, torch.Tensor)}
        self.uncond = {k: v for k, v in self.uncond.items() if isinstance(v, torch.Tensor)}

    def pool(self):
        return self.graph.pool()

    def replay(self, x: torch.Tensor | None, b: int, first_index: int, kwargs: dict, uncond: dict,
               seed: int) -> torch.Tensor:
        """x_0 of samples first_index .. + b (b <= B): (b, *shape) fp32, cloned out of the pool."""
        r = self.run
        r.step.set_rng(seed, first_index)
        if x is None:
            r.step.normal_into(self.x_in, 0)
        else:
            self.x_in[:b].copy_(x)
            self.x_in[b:].zero_()
        for static, given in ((self.kwargs, kwargs), (self.uncond, uncond)):
            for k, v in given.items():
                if isinstance(v, torch.Tensor):
                    static[k].copy_(v)
        r.flags.reset()
        with nvtx_range("fastddim.replay", r.device):
            self.graph.replay()
        self.replays += 1
        r.check_batch(first_index)
        return self.out[:b].clone()


# ------------------------------------------------------------------------------- the cache
def _watch(model) -> _Watch:
    """The model's record, made with a weak reference whose death drops its graphs."""
    mid = id(model)
    rec = _MODELS.get(mid)
    if rec is None:
        forget = lambda _ref, mid=mid: _died(mid)  # noqa: E731  (must not hold the model)
        try:
            ref = weakref.WeakMethod(model, forget) if isinstance(model, types.MethodType) else weakref.ref(model, forget)
        except TypeError:  # not weakly referenceable: hold it, so its id is never reused
            ref = model
        rec = _MODELS[mid] = _Watch(ref)
    return rec


def _died(mid: int) -> None:
    _DEAD.append(mid)
    _forget_dead()


def _forget_dead() -> None:
    """Drop every graph of the models that were collected (later, if the cache is being walked)."""
    if _WALKING[0]:
        return
    _WALKING[0] = True
    try:
        while _DEAD:
            mid = _DEAD.pop()
            for key in [k for k in _CACHE if k[0] == mid]:
                del _CACHE[key]
            _MODELS.pop(mid, None)
    finally:
        _WALKING[0] = False


def _drop(key: tuple) -> None:
    """Drop one cache entry; the model's record (and pool) goes with its last graph on a device."""
    entry = _CACHE.pop(key)
    mid = key[0]
    rest = [e for k, e in _CACHE.items() if k[0] == mid]
    rec = _MODELS.get(mid)
    if rec is None:
        return
    if not any(e.device == entry.device for e in rest):
        rec.pools.pop(entry.device, None)
    if not rest:
        del _MODELS[mid]


def _budget(device: torch.device) -> float:
    if MAX_GRAPH_BYTES is not None:
        return MAX_GRAPH_BYTES
    if device.type != "cuda":
        return math.inf
    return MEMORY_FRACTION * torch.cuda.get_device_properties(device).total_memory


def _bound(newest: tuple) -> None:
    """Drop least recently used entries until the count and the newest one's device fit."""
    device = _CACHE[newest].device
    while True:
        too_many = len(_CACHE) > MAX_GRAPHS
        too_big = sum(e.bytes for e in _CACHE.values() if e.device == device) > _budget(device)
        victims = [k for k, e in _CACHE.items() if k != newest and (too_many or e.device == device)]
        if not (too_many or too_big) or not victims:
            return
        _drop(victims[0])


def _capture(run, key: tuple, strict: bool):
    """Warm up and capture run's trajectory: a _Graph, or a _Failed (strict: CaptureError)."""
    t0 = time.perf_counter()
    g = _Graph(run)
    g.warm_up()  # the eager trajectory: a model's own error surfaces here, as without a graph
    rec = _watch(run.model)
    try:
        g.capture(rec.pools.get(run.device))
    except Exception as e:  # capture is an optimisation: graph="auto" never loses the user's run to it
        failed = _Failed(run.device, f"{type(e).__name__}: {e}")
        if strict:
            if not any(k[0] == key[0] for k in _CACHE):
                _MODELS.pop(key[0], None)
            raise CaptureError(_failure_message(failed, strict)) from e
        _CACHE[key] = failed
        return failed
    rec.pools.setdefault(run.device, g.pool())
    run.capture_seconds = time.perf_counter() - t0
    run.compile_seconds = g.run.compile_seconds
    _CACHE[key] = g
    return g


def _failure_message(failed: _Failed, strict: bool) -> str:
    if strict:
        return f"fastddim: CUDA graph capture failed (graph=True; graph='auto' falls back to eager): {failed.cause}"
    return f"fastddim: CUDA graph capture failed, running eagerly: {failed.cause}"


def captured(run, strict: bool = False) -> Callable | None:
    """A replay function for ``run``'s batches, capturing the trajectory on first use.

    Returns ``replay(x, b, first_index, kwargs, uncond) -> (b, *shape)`` (each call counts one in
    ``run.graph_replays``), or None when capture failed and ``strict`` is False (the run then goes
    eagerly; a warning says why). ``strict``: raise ``CaptureError`` instead, from the cause.
    """
    key = _key(run)
    _WALKING[0] = True
    try:
        entry = _CACHE.get(key)
        if entry is None:
            entry = _capture(run, key, strict)
            _bound(key)
        else:
            _CACHE.move_to_end(key)
    finally:
        _WALKING[0] = False
        _forget_dead()
    if isinstance(entry, _Failed):
        if strict:
            raise CaptureError(_failure_message(entry, strict) + " (cached from an earlier attempt; "
                               "fastddim.clear_cache() forgets it)")
        warnings.warn(_failure_message(entry, strict), RuntimeWarning, stacklevel=4)
        return None

    def replay(x, b, first_index, kwargs, uncond):
        out = entry.replay(x, b, first_index, kwargs, uncond, run.seed)
        run.graph_replays += 1
        return out

    return replay
