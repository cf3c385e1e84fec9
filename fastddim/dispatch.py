"""Backend dispatch: which implementation of the step runs, and a record of what ran.

``auto`` never hides a choice: the backend it picked is in ``fastddim.info()["last_run"]``
and logged on the ``fastddim`` logger. A backend asked for by name that is not available is an
error with the reason, never a silent fallback.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from . import reference
from .noise import normal_like_batch
from .plan import Plan

__all__ = ["BACKENDS", "resolve_backend", "make_step", "available_backends"]

log = logging.getLogger("fastddim")

BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")

# A step function: (x, out, j, first_index) -> (x_prev, x0); x, out: (B, *shape).
StepFn = Callable[[torch.Tensor, torch.Tensor, int, int], "tuple[torch.Tensor, torch.Tensor]"]


def available_backends(device: torch.device) -> dict[str, str | None]:
    """Each backend name -> None if usable on ``device``, else the reason it is not."""
    return {"torch": None}


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` on ``device``; raises if a named one is unavailable."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    avail = available_backends(device)
    if backend == "auto":
        order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpp", "torch")
        return next(b for b in order if b in avail and avail[b] is None)
    reason = avail.get(backend, f"backend {backend!r} is not implemented yet")
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is not available on {device}: {reason}")
    return backend


def make_step(backend: str, plan: Plan, seed: int) -> StepFn:
    """The step of ``plan`` for a resolved backend, with its noise drawn for (seed, index, step)."""
    if backend == "torch":

        def step(x: torch.Tensor, out: torch.Tensor, j: int, first_index: int):
            z = normal_like_batch(x, seed, first_index, j + 1) if plan.noise[j] else None
            return reference.ddim_step(x, out, plan, j, z)

        return step
    raise RuntimeError(f"backend {backend!r} has no step implementation")
