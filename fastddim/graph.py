"""CUDA graphs of the whole S-step trajectory, captured once and replayed per batch.

At small n a step costs more in kernel launches (~330 per U-Net forward) than in arithmetic;
one graph replay launches the whole trajectory (S model calls and S fused steps) at once.

What a captured graph owns, made before capture and updated in place between replays (a replay
reads the addresses baked in at capture, FACTS.md section 6):
    x_in (B, *shape) fp32         the batch's x_T: seeded noise drawn by the backend's kernel, or a copy
    the step's rng (2,) int64     (seed bits, first_index), written with fill_ before each replay
    the step's table, quantile q  the plan's scalars
    model_kwargs tensors          copied in per batch (per-sample rows, padded to B)
    the finiteness flags (S,)     read once per batch after the replay
The output lives in the graph's private pool and is cloned out before the next replay. A
partial last batch is padded to B rows (never a second capture). Warm-up runs on a side
stream first, so Triton compilation, cuDNN/cuBLAS set-up and torch.compile all happen before
capture. Graphs are cached per (model and its weights' addresses, batch, shape, plan, dtype,
device, backend, compile mode, memory format, kwargs layout), at most ``MAX_GRAPHS``;
``fastddim.clear_cache()`` frees them. If capture fails, the run falls back to the eager
trajectory with a warning naming the cause.

This module imports the run (engine) and the dispatch, never sampler.py.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from collections import OrderedDict
from typing import Callable

import torch

from .dispatch import Step
from .profiling import nvtx_range

__all__ = ["captured", "clear_cache", "MAX_GRAPHS"]

MAX_GRAPHS = 8
_CACHE: "OrderedDict[tuple, _Graph | None]" = OrderedDict()


def clear_cache() -> None:
    """Free every captured graph (and its memory pool)."""
    _CACHE.clear()


def _kwargs_layout(run) -> tuple:
    shared = tuple(sorted(
        (k, ("tensor", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else ("value", repr(v)))
        for k, v in run.shared_kwargs.items()
    ))
    per_sample = tuple(sorted((k, tuple(v.shape[1:]), v.dtype) for k, v in run.per_sample_kwargs.items()))
    return shared, per_sample


def _key(run) -> tuple:
    weights = ()
    if isinstance(run.model, torch.nn.Module):
        weights = tuple(t.data_ptr() for t in (*run.model.parameters(), *run.model.buffers()))
    plan = run.plan
    return (
        id(run.model), weights, run.batch_size, run.shape, plan.timesteps, plan.table.numpy().tobytes(),
        plan.noise, repr(sorted(plan.describe().items())), run.dtype, run.device, run.backend, run.compile_mode,
        str(run.memory_format), run.learned_variance, run.check_finite, _kwargs_layout(run),
    )


class _Graph:
    """One captured trajectory for batches of ``run.batch_size`` rows."""

    def __init__(self, run):
        B = run.batch_size
        low = run.dtype if run.dtype != torch.float32 else None
        step = Step(run.backend, run.plan, run.seed, need_x0=False, device=run.device, low_dtype=low)
        # A run of our own: its step, flags and timestep tensor are this graph's static buffers.
        self.run = dataclasses.replace(run, step=step)
        self.x_in = torch.zeros((B, *run.shape), dtype=torch.float32, device=run.device)
        self.kwargs = dict(run.shared_kwargs)
        for k, v in run.per_sample_kwargs.items():
            self.kwargs[k] = torch.zeros((B, *v.shape[1:]), dtype=v.dtype, device=run.device)
        for k, v in run.shared_kwargs.items():
            if isinstance(v, torch.Tensor):
                self.kwargs[k] = v.clone()
        self.graph = torch.cuda.CUDAGraph()

    def _body(self) -> torch.Tensor:
        return self.run.trajectory(self.x_in, None, self.kwargs)

    def warm_up(self) -> None:
        """Compile Triton kernels, pick cuDNN algorithms, make cuBLAS handles, run torch.compile and
        check the model's output shape, on a side stream, before capture. A model error raises here."""
        dev = self.run.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with nvtx_range("fastddim.warmup", dev), torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                self._body()
        torch.cuda.current_stream(dev).wait_stream(side)

    def capture(self) -> None:
        dev = self.run.device
        with nvtx_range("fastddim.capture", dev), torch.inference_mode():
            with torch.cuda.graph(self.graph):
                self.out = self._body()

    def replay(self, x: torch.Tensor | None, b: int, first_index: int, kwargs: dict, seed: int) -> torch.Tensor:
        """x_0 of samples first_index .. + b (b <= B): (b, *shape) fp32, cloned out of the pool."""
        r = self.run
        r.step.set_rng(seed, first_index)
        if x is None:
            r.step.normal_into(self.x_in, 0)
        else:
            self.x_in[:b].copy_(x)
            self.x_in[b:].zero_()
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                self.kwargs[k].copy_(v)
        r.flags.reset()
        with nvtx_range("fastddim.replay", r.device):
            self.graph.replay()
        j = r.flags.first_bad()
        if j is not None and j >= 0:
            raise FloatingPointError(
                f"model output is not finite (NaN or inf) at step {j} (t={r.plan.timesteps[j]}) "
                f"of the batch starting at sample {first_index}"
            )
        return self.out[:b].clone()


def captured(run) -> Callable | None:
    """A replay function for ``run``'s batches, capturing the trajectory on first use.

    Returns ``replay(x, b, first_index, kwargs) -> (b, *shape)`` or None when capture failed
    (the run then goes eagerly; a warning says why).
    """
    key = _key(run)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        g = _CACHE[key]
    else:
        t0 = time.perf_counter()
        g = _Graph(run)
        g.warm_up()  # the eager trajectory: a model's own error surfaces here, as without a graph
        try:
            g.capture()
            run.capture_seconds = time.perf_counter() - t0
            run.compile_seconds = g.run.compile_seconds
        except Exception as e:  # capture is an optimisation: never lose the user's run to it
            warnings.warn(f"fastddim: CUDA graph capture failed, running eagerly: {type(e).__name__}: {e}",
                          RuntimeWarning, stacklevel=3)
            torch.cuda.synchronize(run.device)
            g = None
        _CACHE[key] = g
        while len(_CACHE) > MAX_GRAPHS:
            _CACHE.popitem(last=False)
    if g is None:
        return None
    return lambda x, b, first_index, kwargs: g.replay(x, b, first_index, kwargs, run.seed)
