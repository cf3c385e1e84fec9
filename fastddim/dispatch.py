"""Backend dispatch: which implementation of the step runs, and a record of what ran.

``auto`` never hides a choice: the backend it picked is in ``fastddim.info()["last_run"]``
and logged on the ``fastddim`` logger. A backend asked for by name that is not available is an
error with the reason, never a silent fallback.

Backends: ``torch`` (fastddim.reference, any device), ``triton`` (kernels/ddim_step.py: a CUDA
device, or CPU tensors under TRITON_INTERPRET=1 for tests), ``cpp`` (fastddim._C on the CPU),
``cuda`` (fastddim._C built with CUDA, on a CUDA device). The fused ones all go through the
custom op ``torch.ops.fastddim.ddim_step`` (fastddim/_ops.py).
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os

import torch

from . import reference
from ._ops import (  # the kernels' codes, one home
    CLIP_NONE, CLIP_RANGE, CLIP_THRESHOLD, GUIDE_CFG, GUIDE_CFGPP, GUIDE_NONE, PRED_CODES, SOLVER_DDIM, SOLVER_DPM1,
    SOLVER_DPM2, rng_state, seed_bits,
)
from .guidance import Guidance, cfgpp_outputs, combine, guide
from .noise import normal, normal_like_batch
from .plan import Plan

__all__ = ["BACKENDS", "Step", "resolve_backend", "make_step", "available_backends", "threshold_scale"]

log = logging.getLogger("fastddim")

BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")
LOW_DTYPES = (torch.bfloat16, torch.float16)



def _triton_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None  # the interpreter runs the kernel on CPU tensors (slow: for tests)
    return f"needs a CUDA device (or TRITON_INTERPRET=1 with CPU tensors, for tests), not {device.type}"


def _extension_reason(device: torch.device, want: str) -> str | None:
    from ._ops import extension, extension_error

    err = extension_error()
    if err is not None:
        return err
    if want == "cpp":
        return None if device.type == "cpu" else f"the C++ kernel runs on the CPU, not {device.type}"
    if not extension().cuda:
        return "fastddim._C was built without CUDA (needs nvcc and a CUDA build of torch at build time, and FASTDDIM_SKIP_CUDA_BUILD unset)"
    return None if device.type == "cuda" else f"the CUDA kernel needs a CUDA device, not {device.type}"


def available_backends(device: torch.device) -> dict[str, str | None]:
    """Each backend name -> None if usable on ``device``, else the reason it is not."""
    device = torch.device(device)
    return {
        "torch": None,
        "triton": _triton_reason(device),
        "cpp": _extension_reason(device, "cpp"),
        "cuda": _extension_reason(device, "cuda"),
    }


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


def threshold_scale(x: torch.Tensor, out: torch.Tensor, table: torch.Tensor, j: int, plan: Plan) -> torch.Tensor:
    """Dynamic thresholding's per-sample s (B,) for step j, as reference.threshold computes it.

    x: (B, *shape) fp32, out: the model output (B, *shape). The quantile needs all of a sample's
    x0 before any element can be clipped, so it is a separate reduction; the fused kernel then
    recomputes x0 and applies clamp(x0, -s, s) / s. The scalars are 0-dim views of the device
    table (no sync) and round as the Python floats do. Columns 0 and 1 are (sqrt_a, sqrt_1ma) in
    both solvers' tables.
    """
    x0 = reference.predict_x0(x, out.float(), table[j, 0], table[j, 1], plan.prediction_type)
    flat = x0.reshape(x0.shape[0], -1).abs()
    return row_quantile(flat, plan.dynamic_thresholding_ratio).clamp(min=1, max=plan.sample_max_value)


def row_quantile(flat: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(flat, q, dim=1)`` (linear interpolation) bit for bit, and traceable.

    flat: (B, N) float32; q: a Python float in [0, 1]. Returns (B,) float32.
    torch.quantile checks q's range with a device comparison (aten.equal), which
    ``torch.compile(fullgraph=True)`` cannot trace on CPU tensors on torch 2.11, whether q is a
    float or a 0-dim tensor. q and N are fixed per run, so the rank is host arithmetic, in float32
    as torch does it: rank = float32(q) * (N - 1), weight = rank - trunc(rank), then the lerp of the
    two sorted neighbours with a weight tensor on contiguous (B, 1) rows (torch's own lerp kernel
    and layout: its vectorised path uses FMA, so a strided or scalar-weight lerp could round
    differently). A row holding a NaN gives NaN, as torch's (it sorts NaN last and moves the rank there).
    """
    n = flat.shape[1]
    rank = _float32(_float32(q) * _float32(n - 1))  # the exact product of two float32s, rounded once
    below, above = int(rank), math.ceil(rank)
    weight = rank - below  # exact: the fraction bits of a float32
    s = torch.sort(flat, dim=1).values
    lo = s[:, below:below + 1].contiguous()
    hi = s[:, above:above + 1].contiguous()
    res = torch.lerp(lo, hi, torch.full_like(lo, weight))
    last = s[:, n - 1:n]
    return torch.where(last.isnan(), last, res).squeeze(1)


def _float32(x: float) -> float:
    """x >= 0 rounded to the nearest float32 (ties to even), in Python arithmetic that dynamo
    folds at trace time (numpy scalars there become traced ops that return no tensor)."""
    _, e = math.frexp(x)
    e = max(e, -125)  # float32 subnormals: a fixed 2**-149 step
    return math.ldexp(round(math.ldexp(x, 24 - e)), e - 24)


def _clip_mode(plan: Plan) -> tuple[int, float]:
    # Same precedence as reference._clip: thresholding, then clip_sample, then sigma_hat's [-1, 1].
    if plan.thresholding:
        return CLIP_THRESHOLD, 1.0
    if plan.clip_sample:
        return CLIP_RANGE, plan.clip_sample_range
    if plan.sigma_hat:
        return CLIP_RANGE, 1.0
    return CLIP_NONE, 1.0


class Step:
    """The step of one plan on one backend, with its static device buffers.

    ``step(x, out, j, first_index) -> (x_prev, x0)`` (or ``(x_prev, x0, x_low)`` with
    ``low_dtype``): x (B, *shape) fp32, out the model output (B, *shape). The plan table and the rng
    state (seed bits, first_index) live in device tensors made once
    and updated in place (``set_rng``: ``fill_``), never re-created per batch, so a CUDA graph that
    captured them replays with new values. ``first_index=None``: use what the rng buffer holds.

    ``guidance`` (fastddim/guidance.py): a guided step j (``guidance.calls[j] == 2``) takes both
    halves of the model output, ``out`` the conditional and ``out_uncond`` the unconditional one,
    and combines them inside the step (the fused kernels read each once; the rescale adds one
    per-sample reduction pass, ``torch.ops.fastddim.rescale_ratio``).
    """

    def __init__(self, backend: str, plan: Plan, seed: int, *, need_x0: bool, device: torch.device,
                 low_dtype: torch.dtype | None, guidance: Guidance | None = None):
        if low_dtype is not None and low_dtype not in LOW_DTYPES:
            raise ValueError(f"low_dtype must be one of {LOW_DTYPES} or None, got {low_dtype!r}")
        if backend not in ("torch", "triton", "cpp", "cuda"):
            raise RuntimeError(f"backend {backend!r} has no step implementation")
        if plan.solver == "dpm++2m" and not need_x0:
            # the step's x0 is the next step's x0_prev: a run that drops it cannot go on
            raise ValueError("need_x0 must be True for a 'dpm++2m' plan: each step's x0 is the next step's x0_prev")
        self.backend, self.plan, self.need_x0, self.low_dtype = backend, plan, need_x0, low_dtype
        self.guidance = guidance
        self.device = torch.device(device)
        self.seed, self.first_index = seed, 0
        self.rng = rng_state(seed, 0, self.device)
        if backend != "torch":
            from . import _ops  # registers torch.ops.fastddim.ddim_step

            self._ops = _ops
            self.table = plan.table.to(self.device)
            self.pred = PRED_CODES[plan.prediction_type]
            self.clip, self.clip_range = _clip_mode(plan)

    def set_rng(self, seed: int, first_index: int) -> None:
        """Point the noise at (seed, first_index) in place (no allocation, no host sync)."""
        if seed != self.seed:
            self.rng[0].fill_(seed_bits(seed))
            self.seed = seed
        if first_index != self.first_index:
            self.rng[1].fill_(first_index)
            self.first_index = first_index

    def normal(self, b: int, shape: tuple[int, ...], step: int) -> torch.Tensor:
        """(b, *shape) fp32 noise of samples first_index .. + b at ``step``, by this backend's kernel."""
        if self.backend == "torch":
            return normal(self.seed, self.first_index, b, step, shape, self.device)
        return self.normal_into(torch.empty((b, *shape), dtype=torch.float32, device=self.device), step)

    def normal_into(self, res: torch.Tensor, step: int) -> torch.Tensor:
        """Fill res (B, *shape) fp32 in place with the noise of samples first_index .. + B at ``step``.

        The fused backends' kernels read the seed and index from the rng buffer (graph-safe).
        """
        if self.backend == "torch":
            return res.copy_(normal(self.seed, self.first_index, res.shape[0], step, tuple(res.shape[1:]), self.device))
        self._ops.normal_(self.backend, res, self.rng, step)
        return res

    def __call__(self, x: torch.Tensor, out: torch.Tensor, j: int, first_index: int | None = None,
                 x0_prev: torch.Tensor | None = None, out_uncond: torch.Tensor | None = None):
        """Step j: x (B, *shape) fp32 and out (B, *shape) -> (x_next, x0[, x_low]).

        x0_prev: (B, *shape) fp32, the x0 the previous step returned; read by a 'dpm++2m' plan's
        second-order steps (``plan.orders[j] == 2``), ignored otherwise. out_uncond: (B, *shape),
        out's dtype, the unconditional output of a guided step (required exactly there).
        """
        if first_index is not None:
            self.set_rng(self.seed, first_index)
        solver = self._solver(j, x0_prev)
        guide_code = self._guide(j, out_uncond)
        if self.backend == "torch":
            return self._reference(x, out, j, x0_prev, out_uncond)
        if out.dtype not in (torch.float32, *LOW_DTYPES):
            out = out.float()
            out_uncond = out_uncond.float() if out_uncond is not None else None
        x, out = x.float().contiguous(), out.contiguous()
        plan = self.plan
        w, phi, ratio = self._guide_args(j, guide_code, out, out_uncond)
        s = self._threshold(x, out, out_uncond, j, guide_code, w) if self.clip == CLIP_THRESHOLD else None
        # Eagerly, call the op's implementation directly: the dispatcher round trip costs more
        # than the whole kernel at small sizes. Under torch.compile, the registered op.
        op = torch.ops.fastddim.ddim_step if torch.compiler.is_compiling() else self._ops.ddim_step
        prev, x0, low = op(
            x, out, self.table, j, self.rng, s, self.backend, self.pred, self.clip, self.clip_range,
            plan.use_clipped_model_output, plan.sigma_hat, plan.noise[j], self.need_x0, self.low_dtype,
            x0_prev if solver == SOLVER_DPM2 else None, solver, out_uncond, guide_code, w, phi, ratio,
        )
        x0 = x0 if self.need_x0 else None
        return (prev, x0) if self.low_dtype is None else (prev, x0, low)

    def _solver(self, j: int, x0_prev: torch.Tensor | None) -> int:
        """Step j's solver code (the plan's host data: no sync); a second-order step needs x0_prev."""
        if self.plan.solver != "dpm++2m":
            return SOLVER_DDIM
        if self.plan.orders[j] == 1:
            return SOLVER_DPM1
        if x0_prev is None:
            raise ValueError(f"step {j} of the 'dpm++2m' plan is second order: pass x0_prev, the x0 step {j - 1} returned")
        return SOLVER_DPM2

    def _guide(self, j: int, out_uncond: torch.Tensor | None) -> int:
        """Step j's guide code (the guidance's host table: no sync); out_uncond given exactly when guided."""
        guided = self.guidance is not None and self.guidance.calls[j] == 2
        if guided != (out_uncond is not None):
            raise ValueError(f"step {j} is {'' if guided else 'not '}guided: out_uncond must be "
                             f"{'the unconditional output' if guided else 'None'}")
        if not guided:
            return GUIDE_NONE
        return GUIDE_CFGPP if self.guidance.method == "cfg++" else GUIDE_CFG

    def _guide_args(self, j: int, code: int, out: torch.Tensor, out_uncond: torch.Tensor | None):
        """(w, phi, ratio) of the op: the rescale's per-sample ratio is the one reduction pass."""
        if code == GUIDE_NONE:
            return 1.0, 0.0, None
        w, phi = self.guidance.weights[j], self.guidance.rescale
        if code != GUIDE_CFG or phi == 0:
            return w, 0.0, None
        out_uncond = out_uncond.contiguous()
        op = torch.ops.fastddim.rescale_ratio if torch.compiler.is_compiling() else self._ops.rescale_ratio
        return w, phi, op(out_uncond, out, w, self.backend)

    def _threshold(self, x, out, out_uncond, j: int, code: int, w: float) -> torch.Tensor:
        """Thresholding's s (B,) from the x0 of the output the step forms x0 from (guided: the
        combined one, rescaled for "cfg"), computed here in torch (a reduction the kernel cannot fuse)."""
        if code == GUIDE_CFG:
            out = guide(out_uncond.float(), out.float(), w, self.guidance.rescale)
        elif code == GUIDE_CFGPP:
            out = combine(out_uncond.float(), out.float(), w)
        return threshold_scale(x, out, self.table, j, self.plan)

    def _reference(self, x: torch.Tensor, out: torch.Tensor, j: int, x0_prev: torch.Tensor | None,
                   out_uncond: torch.Tensor | None):
        out_eps = None
        if out_uncond is not None:  # op for op as the Stable Diffusion pipeline, in the output's dtype
            w = self.guidance.weights[j]
            if self.guidance.method == "cfg++":
                out, out_eps = cfgpp_outputs(out_uncond, out, w)
            else:
                out = guide(out_uncond, out, w, self.guidance.rescale)
        if self.plan.solver == "dpm++2m":
            prev, x0 = reference.dpm_solver_step(x, out, x0_prev if self.plan.orders[j] == 2 else None, self.plan, j)
        else:
            z = normal_like_batch(x, self.seed, self.first_index, j + 1) if self.plan.noise[j] else None
            prev, x0 = reference.ddim_step(x, out, self.plan, j, z, out_eps)
        x0 = x0 if self.need_x0 else None
        return (prev, x0) if self.low_dtype is None else (prev, x0, prev.to(self.low_dtype))


def make_step(
    backend: str, plan: Plan, seed: int, *, need_x0: bool = True, device: torch.device | None = None,
    low_dtype: torch.dtype | None = None, guidance: Guidance | None = None,
) -> Step:
    """The step of ``plan`` for a resolved backend, with its noise drawn for (seed, index, step).

    Returns a ``Step``: ``step(x, out, j, first_index) -> (x_prev, x0)`` with x (B, *shape) fp32
    and out the model output (B, *shape). ``need_x0=False`` lets the fused kernels skip writing
    x0 (x0 is then None). ``device``: where the static buffers live (default: the CPU).
    ``low_dtype`` (bf16/fp16): the step returns (x_prev, x0, x_prev in low_dtype), the copy made in
    the same pass, for a model that runs in low precision. ``guidance``: the run's (see ``Step``).
    """
    return Step(backend, plan, seed, need_x0=need_x0, device=device if device is not None else torch.device("cpu"),
                low_dtype=low_dtype, guidance=guidance)
