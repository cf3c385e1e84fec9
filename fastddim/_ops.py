"""The fused backends' entry points: the step as a torch.library custom op, and their noise.

``torch.ops.fastddim.ddim_step``: one op for every fused backend (``triton``, ``cpp``, ``cuda``)
and both solvers (``solver``: DDIM, or DPM-Solver++(2M) first/second order, SOLVER_*),
so ``torch.compile(fullgraph=True)`` sees a single opaque node with a fake implementation instead
of a graph break, and a CUDA graph captures one launch per step. ``normal_``: a backend's own
noise kernel into a preallocated tensor (x_T). Both read the seed and first sample index from
the device tensor ``rng_state`` makes, so a captured graph replays with new ones. The codes the
kernels take (``PRED_CODES``, ``CLIP_*``) live here, once. The C++ extension is imported here,
inside try/except: a missing build is an error only when a backend that needs it is asked for.
"""
from __future__ import annotations

import torch

__all__ = [
    "ddim_step", "normal_", "rng_state", "seed_bits", "extension", "extension_error", "BUILD_HINT",
    "PRED_CODES", "CLIP_NONE", "CLIP_RANGE", "CLIP_THRESHOLD", "SOLVER_DDIM", "SOLVER_DPM1", "SOLVER_DPM2",
    "GUIDE_NONE", "GUIDE_CFG", "GUIDE_CFGPP", "rescale_ratio",
]

# The kernels' codes, as csrc/ddim_step.h's Pred and Clip enums (kernels/ddim_step.py uses these).
PRED_CODES = {"epsilon": 0, "sample": 1, "v_prediction": 2}
CLIP_NONE, CLIP_RANGE, CLIP_THRESHOLD = 0, 1, 2
# csrc/ddim_step.h's Solver: DDIM; DPM-Solver++(2M) first order; second order (reads x0_prev).
SOLVER_DDIM, SOLVER_DPM1, SOLVER_DPM2 = 0, 1, 2
# csrc/ddim_step.h's Guide: no guidance; classifier-free guidance (combine, optional rescale by a
# per-sample ratio); CFG++ (x0 from the combined output, eps from the unconditional one).
GUIDE_NONE, GUIDE_CFG, GUIDE_CFGPP = 0, 1, 2
FUSED_BACKENDS = ("triton", "cpp", "cuda")

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


def rng_state(seed: int, first_index: int, device) -> torch.Tensor:
    """The int64 (2,) tensor the kernels read: (the uint64 seed's bits as an int64, first_index).

    Made once per run on ``device``; later batches update it in place, so that a captured CUDA
    graph, which baked in its address, sees the new values.
    """
    return torch.tensor([seed_bits(seed), first_index], dtype=torch.int64).to(device)


def seed_bits(seed: int) -> int:
    """The uint64 seed's bit pattern as an int64 (what rng[0] holds)."""
    return seed - 2**64 if seed >= 2**63 else seed


def normal_(backend: str, res: torch.Tensor, rng: torch.Tensor, step: int) -> torch.Tensor:
    """Fill ``res`` in place with ``fastddim.noise.normal(seed, first_index, n, step, shape)``.

    res: (n, *shape) fp32 on the backend's device, any strides (a strided res is filled through a
    contiguous temporary: the same numbers, one copy more); rng: int64 (2,) = (seed bits,
    first_index) on the same device (``rng_state``), read by the kernel, not here: nothing syncs,
    and a captured CUDA graph replays with whatever rng holds then. step: 0 for x_T, j + 1 for
    step j's noise (fastddim.noise's convention). backend: "cpp" (CPU), "cuda" or "triton" (a
    CUDA device, or CPU tensors under TRITON_INTERPRET=1). Returns res. The Philox integers are
    the spec's bit for bit; the normals are within a few ulp of it (each backend's log/sin/cos).
    """
    if backend not in FUSED_BACKENDS:
        raise ValueError(f"normal_: backend must be one of {FUSED_BACKENDS}, got {backend!r}")
    want = {"cpp": "cpu", "cuda": "cuda"}.get(backend)
    if want is not None and res.device.type != want:
        raise ValueError(f"normal_: backend {backend!r} fills {want} tensors, res is on {res.device}")
    if res.dim() < 1 or res.dtype != torch.float32:
        raise ValueError(f"normal_: res must be a float32 (n, *shape) tensor, got {res.dtype} {tuple(res.shape)}")
    _check_rng(rng, res, "normal_", "res")
    rng = rng.contiguous()  # a strided rng: a copy (under capture, a copy kernel reading it at replay)
    if not res.is_contiguous():
        # The kernels write element i of a sample at offset i: fill a contiguous tensor (the same
        # noise, element for element in res's logical order) and copy it into res's layout.
        return res.copy_(normal_(backend, torch.empty(res.shape, dtype=res.dtype, device=res.device), rng, step))
    if backend == "triton":
        from fastddim.kernels import ddim_step as triton_step

        triton_step.normal_(res, rng, step)
    else:
        extension().normal_(res, rng, step)
    return res


def _check_rng(rng: torch.Tensor, like: torch.Tensor, op: str, name: str) -> None:
    """rng must be int64 (2,) on ``like``'s device (any strides: the callers make it contiguous)."""
    if rng.device != like.device or rng.dtype != torch.int64 or rng.shape != (2,):
        raise ValueError(
            f"{op}: rng must be an int64 (2,) tensor (seed bits, first_index) on {name}'s device ({like.device}), "
            f"got {rng.dtype} {tuple(rng.shape)} on {rng.device}"
        )


def _check_triton_step(x, out, table, j, rng, s, pred, clip, x0_prev, solver, need_x0, ddim_options) -> None:
    """The checks fastddim._C makes at its boundary (csrc/bindings.cpp), for the Triton kernel,
    which takes raw pointers and would read out of bounds or misread dtypes without them."""
    if x.dim() < 1 or x.dtype != torch.float32:
        raise ValueError(f"ddim_step: x must be a float32 (B, *shape) tensor, got {x.dtype} {tuple(x.shape)}")
    for name, t in (("out", out), ("table", table), ("s", s)):
        if t is not None and t.device != x.device:
            raise ValueError(f"ddim_step: {name} is on {t.device}, x on {x.device}")
    if out.shape != x.shape or out.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"ddim_step: out must be float32, bfloat16 or float16 of x's shape {tuple(x.shape)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    if table.dtype != torch.float32 or table.dim() != 2 or table.shape[1] != 6:
        raise ValueError(f"ddim_step: table must be a float32 (S, 6) tensor, got {table.dtype} {tuple(table.shape)}")
    if not 0 <= j < table.shape[0]:
        raise ValueError(f"ddim_step: j={j} out of range for a table of {table.shape[0]} steps")
    _check_rng(rng, x, "ddim_step", "x")
    if pred not in PRED_CODES.values():
        raise ValueError(f"ddim_step: pred must be 0 (epsilon), 1 (sample) or 2 (v_prediction), got {pred}")
    if clip not in (CLIP_NONE, CLIP_RANGE, CLIP_THRESHOLD):
        raise ValueError(f"ddim_step: clip must be 0 (none), 1 (range) or 2 (threshold), got {clip}")
    if clip == CLIP_THRESHOLD and (s is None or s.dtype != torch.float32 or s.shape != x.shape[:1]):
        raise ValueError(f"ddim_step: clip=2 (threshold) needs s, a float32 ({x.shape[0]},) tensor, got "
                         f"{None if s is None else (s.dtype, tuple(s.shape))}")
    _check_solver(x, x0_prev, solver, need_x0, ddim_options)


def _check_solver(x, x0_prev, solver, need_x0, ddim_options) -> None:
    """The solver code's own arguments, as csrc/bindings.cpp's check_solver: DPM-Solver++ writes x0
    (the next step's x0_prev), takes none of DDIM's options (clipped_eps, sigma_hat, noise), and its
    second order reads x0_prev, a float32 tensor of x's shape on x's device."""
    if solver not in (SOLVER_DDIM, SOLVER_DPM1, SOLVER_DPM2):
        raise ValueError(f"ddim_step: solver must be 0 (ddim), 1 (dpm first order) or 2 (dpm second order), got {solver}")
    if solver == SOLVER_DDIM:
        return
    if not need_x0:
        raise ValueError(f"ddim_step: solver={solver} (dpm) writes x0: need_x0 must be True")
    if any(ddim_options):
        raise ValueError(f"ddim_step: clipped_eps, sigma_hat and noise are DDIM options: must be False with solver={solver}")
    if solver == SOLVER_DPM2 and (
        x0_prev is None or x0_prev.dtype != torch.float32 or x0_prev.shape != x.shape or x0_prev.device != x.device
    ):
        raise ValueError(f"ddim_step: solver=2 (dpm second order) needs x0_prev, a float32 tensor of x's shape "
                         f"{tuple(x.shape)} on {x.device}, got "
                         f"{None if x0_prev is None else (x0_prev.dtype, tuple(x0_prev.shape), str(x0_prev.device))}")


def _check_guide(x, out, out_uncond, guide, ratio, solver, clipped_eps, sigma_hat) -> None:
    """The guidance arguments, as csrc/bindings.cpp's check_guide: a guided step reads out_uncond
    (out's shape, dtype and device); ratio (B,) fp32 (the rescale) with GUIDE_CFG only; CFG++ is a
    DDIM update whose direction is the unconditional eps (no clipped_eps, no sigma_hat)."""
    if guide not in (GUIDE_NONE, GUIDE_CFG, GUIDE_CFGPP):
        raise ValueError(f"ddim_step: guide must be 0 (none), 1 (cfg) or 2 (cfg++), got {guide}")
    if guide == GUIDE_NONE:
        if out_uncond is not None or ratio is not None:
            raise ValueError("ddim_step: out_uncond and ratio are read by a guided step only (guide=0)")
        return
    if out_uncond is None or out_uncond.shape != out.shape or out_uncond.dtype != out.dtype \
            or out_uncond.device != out.device:
        raise ValueError(f"ddim_step: guide={guide} needs out_uncond, a tensor of out's shape, dtype and device "
                         f"({tuple(out.shape)}, {out.dtype}, {out.device}), got "
                         f"{None if out_uncond is None else (tuple(out_uncond.shape), out_uncond.dtype, str(out_uncond.device))}")
    if ratio is not None and (guide != GUIDE_CFG or ratio.dtype != torch.float32 or ratio.shape != x.shape[:1]
                              or ratio.device != x.device):
        raise ValueError(f"ddim_step: ratio (the rescale) needs guide=1 and a float32 ({x.shape[0]},) tensor on "
                         f"{x.device}, got guide={guide}, {(ratio.dtype, tuple(ratio.shape), str(ratio.device))}")
    if guide == GUIDE_CFGPP and (solver != SOLVER_DDIM or clipped_eps or sigma_hat):
        raise ValueError("ddim_step: guide=2 (cfg++) is a DDIM update (solver=0) with the unconditional eps as its "
                         "direction: clipped_eps and sigma_hat must be False")


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


def _outputs(x: torch.Tensor, need_x0: bool, low_dtype: torch.dtype | None):
    """The op's (x_prev, x0, x_low): contiguous (B, *shape) whatever x's layout (the kernels write
    element i of a sample at offset i); x0 / x_low empty (0,) when not asked for. Shared by the op
    and its fake, so that their strides agree."""
    # empty_like, not torch.empty(shape, dtype, device): a third of the overhead, per step.
    x_prev = torch.empty_like(x, memory_format=torch.contiguous_format)
    x0 = torch.empty_like(x_prev) if need_x0 else _empty(x)
    x_low = torch.empty_like(x_prev, dtype=low_dtype) if low_dtype is not None else _empty(x)
    return x_prev, x0, x_low


# Defined with the low-level Library API rather than torch.library.custom_op: the latter imports
# torch._dynamo on the first call (seconds) and adds Python overhead to every call.
_lib = torch.library.Library("fastddim", "DEF")
_lib.define(
    "ddim_step(Tensor x, Tensor out, Tensor table, int j, Tensor rng, Tensor? s, str backend, int pred, "
    "int clip, float clip_range, bool clipped_eps, bool sigma_hat, bool noise, bool need_x0, "
    "ScalarType? low_dtype, Tensor? x0_prev=None, int solver=0, Tensor? out_uncond=None, int guide=0, "
    "float w=1.0, float phi=0.0, Tensor? ratio=None) -> (Tensor, Tensor, Tensor)"
)
_lib.define("rescale_ratio(Tensor out_uncond, Tensor out, float w, str backend) -> Tensor")


def ddim_step(
    x: torch.Tensor, out: torch.Tensor, table: torch.Tensor, j: int, rng: torch.Tensor,
    s: torch.Tensor | None, backend: str, pred: int, clip: int, clip_range: float,
    clipped_eps: bool, sigma_hat: bool, noise: bool, need_x0: bool, low_dtype: torch.dtype | None,
    x0_prev: torch.Tensor | None = None, solver: int = SOLVER_DDIM, out_uncond: torch.Tensor | None = None,
    guide: int = GUIDE_NONE, w: float = 1.0, phi: float = 0.0, ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused step j: returns (x_prev, x0, x_low); x0 / x_low are empty (0,) when not asked for.

    solver: SOLVER_DDIM (table: fastddim.plan.COLUMNS), or SOLVER_DPM1 / SOLVER_DPM2, a
    DPM-Solver++(2M) step of first / second order (table: DPM_COLUMNS; need_x0 True and
    clipped_eps, sigma_hat, noise False): x0_prev (B, *shape) fp32 is read by SOLVER_DPM2 only,
    and the returned x0 is the next step's x0_prev (a fresh tensor: no input is written).

    guide: GUIDE_NONE, or a guided step that reads both halves of the model output, out (the
    conditional one, c) and out_uncond (u, same shape and dtype), in one pass, in float32:
      GUIDE_CFG:   g = u + w * (c - u), then with ratio (B,) fp32 (``rescale_ratio``: std(c) / std(g)
                   per sample) g = phi * (g * ratio) + (1 - phi) * g; the step uses g as its model
                   output (any solver).
      GUIDE_CFGPP: x0 from g = u + w * (c - u), the direction's eps from u (CFG++; DDIM only).

    x: (B, *shape) fp32; out: same shape, fp32/bf16/fp16; table: the plan's (S, 6) fp32 table on
    x's device; rng: int64 (2,) = (seed bits, first_index) on x's device; s: (B,) fp32 thresholds
    (clip=2); backend: "triton", "cpp" or "cuda". pred, clip: PRED_CODES, CLIP_*. Any strides
    (channels_last, slices, transposes): the kernels index a sample linearly, so the inputs are
    made contiguous here (a no-op when they are) and the outputs are contiguous. Bad arguments
    raise before any work (the C++ extension's own checks, or the same ones here for Triton).
    Call it as torch.ops.fastddim.ddim_step(...).
    """
    if backend not in FUSED_BACKENDS:
        raise ValueError(f"fastddim::ddim_step: backend must be one of {FUSED_BACKENDS}, got {backend!r}")
    if backend == "triton":  # fastddim._C checks its own arguments (a few us less per step here)
        _check_triton_step(x, out, table, j, rng, s, pred, clip, x0_prev, solver, need_x0, (clipped_eps, sigma_hat, noise))
        _check_guide(x, out, out_uncond, guide, ratio, solver, clipped_eps, sigma_hat)
    # A strided rng becomes a copy: under CUDA graph capture, a copy kernel reading it at replay.
    x, out, table, rng = x.contiguous(), out.contiguous(), table.contiguous(), rng.contiguous()
    s = s.contiguous() if s is not None else None
    x0_prev = x0_prev.contiguous() if solver == SOLVER_DPM2 and x0_prev is not None else None
    out_uncond = out_uncond.contiguous() if out_uncond is not None else None
    ratio = ratio.contiguous() if ratio is not None else None
    outputs = x_prev, x0, x_low = _outputs(x, need_x0, low_dtype)
    x0, x_low = x0 if need_x0 else None, x_low if low_dtype is not None else None
    kw = dict(pred=pred, clip=clip, clip_range=clip_range, s=s, clipped_eps=clipped_eps, sigma_hat=sigma_hat, noise=noise,
              x0_prev=x0_prev, solver=solver)
    if guide != GUIDE_NONE or out_uncond is not None or ratio is not None:  # else: the unguided call, fewer args
        kw.update(out_uncond=out_uncond, guide=guide, w=float(w), phi=float(phi), ratio=ratio)
    if backend == "triton":
        from fastddim.kernels import ddim_step as triton_step

        triton_step.ddim_step(x, out, table, j, rng, x_prev, x0, x_low, **kw)
    else:
        extension().ddim_step(x, out, table, j, rng, x_prev, x0, x_low, **kw)
    return outputs


_lib.impl("ddim_step", ddim_step, "CompositeExplicitAutograd")


@torch.library.register_fake("fastddim::ddim_step", lib=_lib)
def _(x, out, table, j, rng, s, backend, pred, clip, clip_range, clipped_eps, sigma_hat, noise, need_x0, low_dtype,
      x0_prev=None, solver=SOLVER_DDIM, out_uncond=None, guide=GUIDE_NONE, w=1.0, phi=0.0, ratio=None):
    return _outputs(x, need_x0, low_dtype)


def rescale_ratio(out_uncond: torch.Tensor, out: torch.Tensor, w: float, backend: str) -> torch.Tensor:
    """The per-sample ratio std(c) / std(g) of ``rescale_noise_cfg``, g = u + w * (c - u): the
    reduction pass of a rescaled guided step (the step pass then applies it, fused).

    out_uncond (u), out (c): (B, *shape) float32/bf16/fp16 of one dtype, any strides; w: the
    step's scale. Returns (B,) float32: the unbiased std over every non-batch element of c and of
    g (formed in float32 after loading), by the backend's own kernel with float64 accumulators:
    ``cpp``/``cuda`` fastddim._C.rescale_ratio, ``triton`` kernels/ddim_step.py's (the formula:
    ``fastddim.guidance.rescale_ratio_torch``). Call it as torch.ops.fastddim.rescale_ratio(...).
    """
    if backend not in FUSED_BACKENDS:
        raise ValueError(f"fastddim::rescale_ratio: backend must be one of {FUSED_BACKENDS}, got {backend!r}")
    if out_uncond.shape != out.shape or out_uncond.dtype != out.dtype or out_uncond.device != out.device \
            or out.dim() < 2:
        raise ValueError(f"rescale_ratio: out_uncond and out must be (B, ...) tensors of one shape, dtype and device, "
                         f"got {tuple(out_uncond.shape)} {out_uncond.dtype} and {tuple(out.shape)} {out.dtype}")
    u, c = out_uncond.contiguous(), out.contiguous()
    if backend == "triton":  # a CUDA device, or CPU tensors under TRITON_INTERPRET=1 (as the step op)
        from fastddim.kernels import ddim_step as triton_step

        return triton_step.rescale_ratio(u, c, float(w))
    return extension().rescale_ratio(u, c, float(w))  # cpp: the CPU loop; cuda: one block per sample


_lib.impl("rescale_ratio", rescale_ratio, "CompositeExplicitAutograd")


@torch.library.register_fake("fastddim::rescale_ratio", lib=_lib)
def _(out_uncond, out, w, backend):
    return out.new_empty((out.shape[0],), dtype=torch.float32)
