"""Fused DDIM step in Triton: x_t and the model output -> x_{t-1}, noise made in the kernel.
The SOLVER constexpr makes the same kernel a DPM-Solver++(2M) step (see below).

One pass per step. Per element it reads x_t (4 B, fp32) and the model output (4 or 2 B) and
writes x_{t-1} (4 B): 10-12 B, plus 4 B for the optional x0 and 2 B for the optional bf16/fp16
copy of x_{t-1} (the next model input). The eager step with its noise moves about 80 B.

What it fuses, in the order ``fastddim.reference.ddim_step`` rounds it (mul+add may contract to
FMA on a GPU, so compare with a tolerance): x0/eps from the prediction type, clamp to
+-clip_range or dynamic thresholding by a per-sample s (computed outside, see
``fastddim.dispatch``), eps re-derived from the clipped x0, the DDIM (or sigma_hat) update, and
sigma * z with z from ``fastddim.noise``'s spec: Philox-4x32-10 on (group, sample, step, 0) with
the key from the seed, uniforms from the top 23 bits, Box-Muller on the two pairs. The Philox
rounds are our own (tl.umulhi), not tl.randn, whose float mapping is version dependent.

The seed and the first sample's index are read from a device int64 tensor ``rng`` = (seed as
the int64 bit pattern, first_index; ``fastddim._ops.rng_state``), so a captured CUDA graph
replays with new ones. The per-step scalars are row j of the plan's table on the device (columns
as fastddim.plan.COLUMNS). ``normal_`` writes the same noise alone (x_T): 4 B per element.

SOLVER 1 / 2 (fastddim._ops.SOLVER_DPM1 / _DPM2): a DPM-Solver++(2M) step with a DPM plan's row
(fastddim.plan.DPM_COLUMNS), in the order of ``fastddim.reference.dpm_solver_step``: x0 and its
clipping as above, then ``c_x * x - c_d0 * x0`` and, second order, ``- c_d1 * (r_inv * (x0 -
x0_prev))``. No noise; x0 always written (the next step's x0_prev): 14-16 B per element first
order (x_t, the output, x_{t-1}, x0), 18-20 B second order (one more 4 B read, x0_prev).

Guidance (GUIDE, fastddim._ops.GUIDE_*): the step also reads the unconditional output u (4 or
2 B more per element) and combines it with the conditional one c, in float32, before anything
else: GUIDE_CFG makes g = u + w * (c - u) and, with HAS_RATIO, g = phi * (g * ratio[b]) +
(1 - phi) * g (the rescale; ratio from ``rescale_ratio`` below), then steps on g as on an
unguided output (any solver). GUIDE_CFGPP (DDIM only) forms x0 from g and the direction's eps
from u. w, phi and 1 - phi are runtime floats (a per-step w never recompiles the kernel).
``rescale_ratio`` is the rescale's reduction: std(c) / std(g) per sample, two passes (partial
shifted sums in float64 per chunk of a sample, then one program per sample): it reads u and c
once, 4-8 B per element, and 32 B per chunk of up to 1024 elements of partial sums.

Divisions use div_rn (Triton's ``/`` is approximate on GPU); log/sin/cos come from libdevice
(tl.log may lower to an approximate instruction). Under TRITON_INTERPRET=1 libdevice does not
exist and numpy's float32 functions are used instead.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastddim._ops import CLIP_NONE, GUIDE_CFG, GUIDE_NONE, rng_state  # one home for the codes (PRED_CODES, CLIP_*) and rng

__all__ = ["ddim_step", "rescale_ratio", "normal_", "philox4x32"]

_INTERPRET: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
if not _INTERPRET:
    from triton.language.extra import libdevice


@triton.jit
def _log(x):
    if _INTERPRET:
        return tl.log(x)
    else:
        return libdevice.log(x)


@triton.jit
def _cos(x):
    if _INTERPRET:
        return tl.cos(x)
    else:
        return libdevice.cos(x)


@triton.jit
def _sin(x):
    if _INTERPRET:
        return tl.sin(x)
    else:
        return libdevice.sin(x)


@triton.jit
def _to_low(v, DT: tl.constexpr):
    if _INTERPRET and DT == tl.bfloat16:
        # The interpreter's fp32 -> bf16 cast rounds ties away from zero; the GPU's (and torch's)
        # rounds to nearest even. Do that on the bits so interpreter tests see the GPU's result.
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DT)


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    # Philox-4x32-10 (Random123); the key bump after the last round is unused.
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _uniform(x):
    # Exact in float32: (x >> 9) < 2**23, so the result lies in [2**-24, 1 - 2**-24], never 0.
    return ((x >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def _box_muller(a, b):
    r = tl.sqrt_rn(-2.0 * _log(_uniform(a)))
    theta = _uniform(b) * 6.2831855
    return r * _cos(theta), r * _sin(theta)


@triton.jit
def _noise_tile(g, sample, step, rng_ptr):
    """(BLOCK, 4) normals of Philox groups g (BLOCK,) of global sample index ``sample`` (int64):
    row i is group g[i]'s (z0, z1, z2, z3), the elements 4 g[i] .. 4 g[i] + 3."""
    seed = tl.load(rng_ptr).to(tl.uint64, bitcast=True)
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    zero = tl.zeros_like(g).to(tl.uint32)
    x0, x1, x2, x3 = _philox(g.to(tl.uint32), zero + sample.to(tl.uint32), zero + step.to(tl.uint32), zero, k0, k1)
    z0, z1 = _box_muller(x0, x1)
    z2, z3 = _box_muller(x2, x3)
    # Joined, not picked per lane with tl.where: a (BLOCK, 4) tile built from a lane index lets
    # Triton (3.6, sample sizes not a multiple of 16) give each thread one lane of a group and run
    # Philox 4 times per group; join + reshape keeps a group's 4 normals in the thread that made them.
    # Where the loads cannot be vectorised, Triton then moves the tile to their layout through 4 KB of
    # shared memory (tests/test_triton_sm90.py: 60 registers and 38 mul.hi at 3x37x37, was 139 and 146).
    # (BLOCK, 2, 2) [i, b, a] = (z0, z2)[b] if a == 0 else (z1, z3)[b], i.e. z[2 b + a]: row-major reshape.
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), (g.shape[0], 4))


@triton.jit
def _predict_x0(x, o, sqrt_a, sqrt_1ma, PRED: tl.constexpr):
    """x0 from a model output o, as fastddim.reference.predict_x0."""
    if PRED == 0:  # epsilon
        return tl.math.div_rn(x - sqrt_1ma * o, sqrt_a)
    elif PRED == 1:  # sample
        return o
    else:  # v_prediction
        return sqrt_a * x - sqrt_1ma * o


@triton.jit
def _predict_eps(x, o, sqrt_a, sqrt_1ma, PRED: tl.constexpr):
    """eps from a model output o, as fastddim.reference.predict_x0_eps."""
    if PRED == 0:
        return o
    elif PRED == 1:
        return tl.math.div_rn(x - sqrt_a * o, sqrt_1ma)
    else:
        return sqrt_a * o + sqrt_1ma * x


@triton.jit
def _combine(u, c, w):
    # u + w * (c - u): diffusers' op order (each op rounded in fp32; a GPU may contract to FMA)
    return u + w * (c - u)


# w, phi, one_m_phi: not specialized (a float never is by value, an int 1 would become a constexpr).
@triton.jit(do_not_specialize=["j", "w", "phi", "one_m_phi"])
def _ddim_step_kernel(
    x_ptr, out_ptr, table_ptr, rng_ptr, s_ptr, prev_ptr, x0_ptr, low_ptr, x0_prev_ptr, u_ptr, ratio_ptr,
    j, numel, clip_range, w, phi, one_m_phi,
    PRED: tl.constexpr, CLIP: tl.constexpr, CLIPPED_EPS: tl.constexpr, SIGMA_HAT: tl.constexpr,
    HAS_NOISE: tl.constexpr, WRITE_X0: tl.constexpr, WRITE_LOW: tl.constexpr, BLOCK: tl.constexpr,
    SOLVER: tl.constexpr = 0, GUIDE: tl.constexpr = 0, HAS_RATIO: tl.constexpr = False,
):
    # grid = (B, cdiv(groups, BLOCK)): a program covers BLOCK Philox groups of 4 elements of one sample.
    b = tl.program_id(0)
    g = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    lane = tl.arange(0, 4)
    e = g[:, None] * 4 + lane[None, :]
    mask = e < numel
    off = b.to(tl.int64) * numel + e
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    # Cast before any arithmetic: bf16 mixed with fp32 scalars is wrong under the interpreter.
    o = tl.load(out_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if GUIDE != 0:  # o is the conditional output: the step runs on the guided one
        u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
        o = _combine(u, o, w)
        if HAS_RATIO:
            o = phi * (o * tl.load(ratio_ptr + b)) + one_m_phi * o

    row = table_ptr + j * 6
    sqrt_a = tl.load(row + 0)
    sqrt_1ma = tl.load(row + 1)
    c_x0 = tl.load(row + 2)
    c_eps = tl.load(row + 3)
    c_xt = tl.load(row + 4)
    sigma = tl.load(row + 5)

    x0 = _predict_x0(x, o, sqrt_a, sqrt_1ma, PRED)
    if GUIDE == 2:  # CFG++: the direction is the unconditional output's eps
        eps = _predict_eps(x, u, sqrt_a, sqrt_1ma, PRED)
    else:
        eps = _predict_eps(x, o, sqrt_a, sqrt_1ma, PRED)

    # NaN propagates through the clamp, as in torch.clamp.
    if CLIP == 1:
        x0 = tl.minimum(tl.maximum(x0, -clip_range, tl.PropagateNan.ALL), clip_range, tl.PropagateNan.ALL)
    elif CLIP == 2:
        s = tl.load(s_ptr + b)
        x0 = tl.minimum(tl.maximum(x0, -s, tl.PropagateNan.ALL), s, tl.PropagateNan.ALL)
        x0 = tl.math.div_rn(x0, s)
    if SOLVER == 0:
        if CLIPPED_EPS:
            eps = tl.math.div_rn(x - sqrt_a * x0, sqrt_1ma)

        if SIGMA_HAT:
            prev = c_x0 * x0 + c_xt * x
        else:
            prev = c_x0 * x0 + c_eps * eps
        if HAS_NOISE:
            first = tl.load(rng_ptr + 1)
            prev = prev + sigma * _noise_tile(g, first + b, j + 1, rng_ptr)
    else:  # DPM-Solver++(2M): columns 2-5 are DPM_COLUMNS' c_x, c_d0, c_d1, r_inv (eps above is unused)
        prev = tl.load(row + 2) * x - tl.load(row + 3) * x0
        if SOLVER == 2:
            x0_prev = tl.load(x0_prev_ptr + off, mask=mask, other=0.0)
            prev = prev - tl.load(row + 4) * (tl.load(row + 5) * (x0 - x0_prev))

    tl.store(prev_ptr + off, prev, mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + off, x0, mask=mask)
    if WRITE_LOW:
        tl.store(low_ptr + off, _to_low(prev, low_ptr.dtype.element_ty), mask=mask)


def _block(groups: int) -> int:
    # Heuristic, not autotune (which needs a GPU driver): 256 groups = 1024 elements per program,
    # fewer for tiny samples. The interpreter pays per program, so it gets larger blocks.
    return max(16, min(1024 if _INTERPRET else 256, triton.next_power_of_2(groups)))


def ddim_step(
    x: torch.Tensor, out: torch.Tensor, table: torch.Tensor, j: int, rng: torch.Tensor,
    x_prev: torch.Tensor, x0: torch.Tensor | None = None, x_low: torch.Tensor | None = None, *,
    pred: int, clip: int = CLIP_NONE, clip_range: float = 1.0, s: torch.Tensor | None = None,
    clipped_eps: bool = False, sigma_hat: bool = False, noise: bool = False,
    x0_prev: torch.Tensor | None = None, solver: int = 0,
    out_uncond: torch.Tensor | None = None, guide: int = GUIDE_NONE, w: float = 1.0, phi: float = 0.0,
    ratio: torch.Tensor | None = None,
) -> None:
    """Step j into the preallocated x_prev (and x0, x_low when given). Checks are the caller's.
    solver: fastddim._ops.SOLVER_* (DPM codes: x0 given; x0_prev (B, *shape) contiguous fp32 read
    by SOLVER_DPM2). guide: fastddim._ops.GUIDE_* (out is then the conditional output; out_uncond
    the unconditional one, out's shape and dtype, contiguous; w the scale; ratio (B,) fp32 and phi
    the rescale of GUIDE_CFG, see fastddim._ops.ddim_step; GUIDE_CFG at w == 1 is the unguided step on out).

    x, x_prev, x0: (B, *shape) contiguous fp32; out: (B, *shape) fp32/bf16/fp16; x_low: bf16 or
    fp16; table: (S, 6) fp32; rng: int64 (2,) = (seed bits, first_index); s: (B,) fp32 thresholds
    when clip == CLIP_THRESHOLD. pred, clip: fastddim._ops.PRED_CODES, CLIP_*. All on one device.
    """
    b = x.shape[0]
    numel = x.numel() // b if b else 0
    groups = (numel + 3) // 4
    if b == 0 or numel == 0:
        return
    if guide == GUIDE_CFG and w == 1.0:
        # c alone, as fastddim.guidance.guide and diffusers (u + 1 * (c - u) is not c to the bit; no
        # rescale): the unguided variant, as fastddim._C decides it. w is host data, so no sync.
        guide, out_uncond, ratio = GUIDE_NONE, None, None
    block = _block(groups)
    grid = (b, triton.cdiv(groups, block))
    # Unused pointers get a tensor of the type a used one would have: no extra compiled variants.
    _ddim_step_kernel[grid](
        x, out, table, rng, s if s is not None else x, x_prev,
        x0 if x0 is not None else x_prev, x_low if x_low is not None else x_prev,
        x0_prev if x0_prev is not None else x, out_uncond if out_uncond is not None else out,
        ratio if ratio is not None else x,
        # floats always (an int would be specialized); 1 - phi in double, rounded to fp32 as torch does
        j, numel, float(clip_range), float(w), float(phi), 1.0 - float(phi),
        PRED=pred, CLIP=clip, CLIPPED_EPS=clipped_eps, SIGMA_HAT=sigma_hat, HAS_NOISE=noise,
        WRITE_X0=x0 is not None, WRITE_LOW=x_low is not None, BLOCK=block, SOLVER=solver,
        GUIDE=guide, HAS_RATIO=ratio is not None,
    )


# ------------------------------------------------------------------ the rescale's reduction
@triton.jit(do_not_specialize=["w"])
def _rescale_partial_kernel(u_ptr, c_ptr, part_ptr, numel, chunks, w, BLOCK: tl.constexpr):
    # grid = (B, chunks): sums of (c - c[0]), its square, (g - g[0]) and its square over one chunk of
    # a sample, in float64. The shift by the sample's first element keeps sum(d^2) - sum(d)^2 / n
    # well conditioned for a sample whose mean is large against its spread.
    b = tl.program_id(0)
    k = tl.program_id(1)
    base = b.to(tl.int64) * numel
    e = k * BLOCK + tl.arange(0, BLOCK)
    mask = e < numel
    c = tl.load(c_ptr + base + e, mask=mask, other=0.0).to(tl.float32)
    g = _combine(tl.load(u_ptr + base + e, mask=mask, other=0.0).to(tl.float32), c, w)
    c0 = tl.load(c_ptr + base).to(tl.float32)
    g0 = _combine(tl.load(u_ptr + base).to(tl.float32), c0, w)
    dc = tl.where(mask, c.to(tl.float64) - c0.to(tl.float64), 0.0)
    dg = tl.where(mask, g.to(tl.float64) - g0.to(tl.float64), 0.0)
    row = part_ptr + (b.to(tl.int64) * chunks + k) * 4
    tl.store(row + 0, tl.sum(dc, axis=0))
    tl.store(row + 1, tl.sum(dc * dc, axis=0))
    tl.store(row + 2, tl.sum(dg, axis=0))
    tl.store(row + 3, tl.sum(dg * dg, axis=0))


@triton.jit
def _std(s1, s2, n):
    # unbiased std from shifted sums. float64 '/' and sqrt are correctly rounded on the GPU (only
    # float32's are approximate; div_rn takes no float64). Rounding may leave a tiny negative variance: 0.
    var = (s2 - s1 * s1 / n) / (n - 1.0)
    return tl.sqrt(tl.maximum(var, 0.0, tl.PropagateNan.ALL))


@triton.jit
def _rescale_finish_kernel(part_ptr, ratio_ptr, numel, chunks, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # grid = (B,): add a sample's chunk sums (in a fixed order: deterministic), std(c) / std(g).
    # ITERS = cdiv(chunks, BLOCK) is a constexpr: Triton 3.6's interpreter cannot range() over a
    # runtime argument (it is an array there), and it is 1 for up to 64 chunks (64K elements).
    b = tl.program_id(0)
    acc = tl.zeros((BLOCK, 4), dtype=tl.float64)
    for i in tl.static_range(ITERS):
        k = i * BLOCK + tl.arange(0, BLOCK)
        ptr = part_ptr + (b.to(tl.int64) * chunks + k[:, None]) * 4 + tl.arange(0, 4)[None, :]
        acc += tl.load(ptr, mask=k[:, None] < chunks, other=0.0)
    s = tl.sum(acc, axis=0)
    col = tl.arange(0, 4)
    s1c = tl.sum(tl.where(col == 0, s, 0.0), axis=0)
    s2c = tl.sum(tl.where(col == 1, s, 0.0), axis=0)
    s1g = tl.sum(tl.where(col == 2, s, 0.0), axis=0)
    s2g = tl.sum(tl.where(col == 3, s, 0.0), axis=0)
    n = numel.to(tl.float64)
    ratio = _std(s1c, s2c, n) / _std(s1g, s2g, n)
    tl.store(ratio_ptr + b, ratio.to(tl.float32))


def rescale_ratio(u: torch.Tensor, c: torch.Tensor, w: float) -> torch.Tensor:
    """std(c) / std(g) per sample, g = u + w * (c - u) in float32, unbiased std over every non-batch
    element (``fastddim.guidance.rescale_ratio_torch``'s result, from float64 sums). Checks are the
    caller's (``fastddim._ops.rescale_ratio``).

    u, c: (B, ...) contiguous, one dtype (fp32/bf16/fp16), on one device. Returns (B,) fp32 on it.
    """
    b = c.shape[0]
    numel = c.numel() // b if b else 0
    ratio = torch.empty(b, dtype=torch.float32, device=c.device)
    if b == 0 or numel == 0:
        return ratio.fill_(float("nan"))  # torch's std of no elements
    block = max(16, min(4096 if _INTERPRET else 1024, triton.next_power_of_2(numel)))
    chunks = triton.cdiv(numel, block)
    part = torch.empty((b, chunks, 4), dtype=torch.float64, device=c.device)
    _rescale_partial_kernel[(b, chunks)](u, c, part, numel, chunks, float(w), BLOCK=block)
    _rescale_finish_kernel[(b,)](part, ratio, numel, chunks, BLOCK=64, ITERS=triton.cdiv(chunks, 64))
    return ratio


# ------------------------------------------------------------------ the noise alone
@triton.jit
def _philox_kernel(ctr_ptr, res_ptr, rng_ptr, m, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < m
    c0 = tl.load(ctr_ptr + i * 4 + 0, mask=mask, other=0).to(tl.uint32)
    c1 = tl.load(ctr_ptr + i * 4 + 1, mask=mask, other=0).to(tl.uint32)
    c2 = tl.load(ctr_ptr + i * 4 + 2, mask=mask, other=0).to(tl.uint32)
    c3 = tl.load(ctr_ptr + i * 4 + 3, mask=mask, other=0).to(tl.uint32)
    seed = tl.load(rng_ptr).to(tl.uint64, bitcast=True)
    r0, r1, r2, r3 = _philox(c0, c1, c2, c3, seed.to(tl.uint32), (seed >> 32).to(tl.uint32))
    tl.store(res_ptr + i * 4 + 0, r0.to(tl.int64), mask=mask)
    tl.store(res_ptr + i * 4 + 1, r1.to(tl.int64), mask=mask)
    tl.store(res_ptr + i * 4 + 2, r2.to(tl.int64), mask=mask)
    tl.store(res_ptr + i * 4 + 3, r3.to(tl.int64), mask=mask)


@triton.jit(do_not_specialize=["step"])
def _normal_kernel(res_ptr, rng_ptr, step, numel, BLOCK: tl.constexpr):
    # grid = (n, cdiv(groups, BLOCK)), as the step kernel's; rng is read here, on the device.
    b = tl.program_id(0)
    g = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    lane = tl.arange(0, 4)
    e = g[:, None] * 4 + lane[None, :]
    first = tl.load(rng_ptr + 1)
    z = _noise_tile(g, first + b, step, rng_ptr)
    tl.store(res_ptr + b.to(tl.int64) * numel + e, z, mask=e < numel)


def normal_(res: torch.Tensor, rng: torch.Tensor, step: int) -> None:
    """Fill the preallocated res (n, *shape) contiguous fp32 with ``fastddim.noise.normal``'s noise
    of samples rng[1] .. rng[1] + n - 1 at ``step``; rng: int64 (2,) = (seed bits, first_index) on
    res's device. Checks are the caller's (``fastddim._ops.normal_``)."""
    n = res.shape[0]
    numel = res.numel() // n if n else 0
    if n == 0 or numel == 0:
        return
    groups = (numel + 3) // 4
    block = _block(groups)
    _normal_kernel[(n, triton.cdiv(groups, block))](res, rng, step, numel, BLOCK=block)


def philox4x32(ctr: torch.Tensor, seed: int) -> torch.Tensor:
    """Raw Philox-4x32-10 outputs: ctr (M, 4) int64 holding uint32 -> (M, 4) int64 (for tests)."""
    ctr = ctr.contiguous()
    res = torch.empty_like(ctr)
    m = ctr.shape[0]
    block = 1024 if _INTERPRET else 128
    _philox_kernel[(triton.cdiv(m, block),)](ctr, res, rng_state(seed, 0, ctr.device), m, BLOCK=block)
    return res
