"""The fused step as a torch.library custom op, ``torch.ops.fastddim.ddim_step``.

One op for every fused backend (``triton``, ``cpp``, ``cuda``), so ``torch.compile(fullgraph=True)``
sees a single opaque node with a fake implementation instead of a graph break, and a CUDA graph
captures one launch per step. The C++ extension is imported here, inside try/except: a missing
build is an error only when a backend that needs it is asked for.
"""
from __future__ import annotations

import torch

__all__ = ["ddim_step", "extension", "extension_error", "BUILD_HINT"]

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the fastddim checkout, with torch "
    "installed first (the Makefile's `make install` does this)"
)

try:
    from . import _C
    _C_ERROR: str | None = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    _C_ERROR = f"{type(e).__name__}: {e}"


def extension_error() -> str | None:
    """None if fastddim._C is importable, else why not (with the build hint)."""
    if _C is None:
        return f"the C++ extension fastddim._C is not built ({_C_ERROR}); {BUILD_HINT}"
    return None


def extension():
    """The fastddim._C module; raises RuntimeError with the build hint if it is not built."""
    err = extension_error()
    if err is not None:
        raise RuntimeError(err)
    return _C


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


# Defined with the low-level Library API rather than torch.library.custom_op: the latter imports
# torch._dynamo on the first call (seconds) and adds Python overhead to every call.
_lib = torch.library.Library("fastddim", "DEF")
_lib.define(
    "ddim_step(Tensor x, Tensor out, Tensor table, int j, Tensor rng, Tensor? s, str backend, int pred, "
    "int clip, float clip_range, bool clipped_eps, bool sigma_hat, bool noise, bool need_x0, "
    "ScalarType? low_dtype) -> (Tensor, Tensor, Tensor)"
)


def ddim_step(
    x: torch.Tensor, out: torch.Tensor, table: torch.Tensor, j: int, rng: torch.Tensor,
    s: torch.Tensor | None, backend: str, pred: int, clip: int, clip_range: float,
    clipped_eps: bool, sigma_hat: bool, noise: bool, need_x0: bool, low_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused step j: returns (x_prev, x0, x_low); x0 / x_low are empty (0,) when not asked for.

    x: (B, *shape) contiguous fp32; out: same shape, fp32/bf16/fp16; table: the plan's (S, 6)
    fp32 table on x's device; rng: int64 (2,) = (seed bits, first_index) on x's device; s: (B,)
    fp32 thresholds (clip=2); backend: "triton", "cpp" or "cuda". Codes as in kernels/ddim_step.py.
    Call it as torch.ops.fastddim.ddim_step(...).
    """
    x_prev = torch.empty_like(x)
    x0 = torch.empty_like(x) if need_x0 else None
    x_low = torch.empty_like(x, dtype=low_dtype) if low_dtype is not None else None
    kw = dict(pred=pred, clip=clip, clip_range=clip_range, s=s, clipped_eps=clipped_eps, sigma_hat=sigma_hat, noise=noise)
    if backend == "triton":
        from fastddim.kernels import ddim_step as triton_step

        triton_step.ddim_step(x, out, table, j, rng, x_prev, x0, x_low, **kw)
    elif backend in ("cpp", "cuda"):
        extension().ddim_step(x, out, table, j, rng, x_prev, x0, x_low, **kw)
    else:
        raise ValueError(f"fastddim::ddim_step: backend must be 'triton', 'cpp' or 'cuda', got {backend!r}")
    return x_prev, x0 if x0 is not None else _empty(x), x_low if x_low is not None else _empty(x)


_lib.impl("ddim_step", ddim_step, "CompositeExplicitAutograd")


@torch.library.register_fake("fastddim::ddim_step", lib=_lib)
def _(x, out, table, j, rng, s, backend, pred, clip, clip_range, clipped_eps, sigma_hat, noise, need_x0, low_dtype):
    x_prev = torch.empty_like(x)
    x0 = torch.empty_like(x) if need_x0 else _empty(x)
    x_low = torch.empty_like(x, dtype=low_dtype) if low_dtype is not None else _empty(x)
    return x_prev, x0, x_low
