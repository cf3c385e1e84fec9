"""Counter-based Gaussian noise: one pure function of (seed, sample index, step, element).

Every random number fastddim uses comes from here, so that sample i is the same whatever the
batch size, the number of samples, the number of processes or the backend. The Triton, C++ and
CUDA kernels reproduce this function bit for bit in its integer part and to within an ulp of
their log/sqrt/cos/sin in its float part.

The specification (all integers are uint32, arithmetic modulo 2**32):

1. Philox-4x32-10 (Salmon et al., SC'11, as in Random123 and curand):
   round:  (hi0, lo0) = mulhilo(0xD2511F53, c0);  (hi1, lo1) = mulhilo(0xCD9E8D57, c2)
           c = (hi1 ^ c1 ^ k0,  lo1,  hi0 ^ c3 ^ k1,  lo0)
   10 rounds; between rounds the key is bumped: k0 += 0x9E3779B9, k1 += 0xBB67AE85.
2. Counter and key for element e (flat C-order index inside one sample) of sample i at step s:
       c = (e // 4,  i mod 2**32,  s,  0)        k = (seed mod 2**32,  seed // 2**32 mod 2**32)
   Step s = 0 is the initial noise x_T; s = j + 1 is the noise of the j-th sampling step
   (j = 0 for the first, noisiest step).
3. Integers to uniforms: u = (float(x >> 9) + 0.5) * 2**-23, in float32. Every u is exactly
   representable, lies in [2**-24, 1 - 2**-24], and is never 0, so log(u) is finite.
4. Box-Muller on the two pairs of one Philox output (x0, x1, x2, x3):
       r = sqrt(-2 * log(u_a)),  theta = 6.2831855f * u_b  (float32 2*pi)
       lane 0 = r01 * cos(theta01), lane 1 = r01 * sin(theta01)   with (u_a, u_b) = (u(x0), u(x1))
       lane 2 = r23 * cos(theta23), lane 3 = r23 * sin(theta23)   with (u_a, u_b) = (u(x2), u(x3))
   Element e takes lane e % 4 of its counter's output. All float arithmetic is float32.

This file is the reference implementation, in plain torch on int64 tensors, so it runs on any
device. It is not fast; the fused kernels make the same numbers inside the step.
"""
from __future__ import annotations

import math

import torch

from .checks import check_seed  # noqa: F401  (re-exported: the seed check lives in checks)

__all__ = ["philox4x32", "uniform_from_bits", "normal", "normal_like_batch", "PHILOX_ROUNDS"]

PHILOX_ROUNDS = 10
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
TWO_PI_F32 = 6.2831855  # float32(2*pi); used as a float32 constant everywhere


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product of uint32 ``a`` (held in int64) and ``m``.

    int64 cannot hold a 64-bit unsigned product, so split both factors in 16-bit halves:
    a*m = a1*m1 * 2**32 + p with p = a0*m0 + (a1*m0 + a0*m1) * 2**16 < 2**50.
    """
    m0, m1 = m & 0xFFFF, m >> 16
    a0, a1 = a & 0xFFFF, a >> 16
    p = a0 * m0 + ((a1 * m0 + a0 * m1) << 16)
    lo = p & MASK32
    hi = (a1 * m1 + (p >> 32)) & MASK32
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = PHILOX_ROUNDS):
    """Philox-4x32-``rounds`` on int64 tensors holding uint32 values (broadcastable).

    Returns the four output words as int64 tensors with values in [0, 2**32).
    """
    k0 &= MASK32
    k1 &= MASK32
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uniform_from_bits(x: torch.Tensor) -> torch.Tensor:
    """uint32 (held in int64) -> float32 uniform in [2**-24, 1 - 2**-24], exactly (spec step 3)."""
    return ((x >> 9).to(torch.float32) + 0.5) * (2.0**-23)


def _box_muller(ua: torch.Tensor, ub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.sqrt(-2.0 * torch.log(ua))
    theta = ub * TWO_PI_F32
    return r * torch.cos(theta), r * torch.sin(theta)


def normal(
    seed: int,
    first_index: int,
    n: int,
    step: int,
    shape: tuple[int, ...],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normal noise for samples ``first_index .. first_index + n - 1`` at ``step``.

    Returns a float32 tensor of shape (n, *shape) on ``device``. Row j is the same tensor for
    sample ``first_index + j`` whatever ``first_index`` and ``n`` are (the batch invariance the
    sampler relies on). ``step`` follows the module's convention: 0 for x_T, j + 1 for the j-th
    sampling step.
    """
    numel = math.prod(shape)
    groups = (numel + 3) // 4
    dev = torch.device(device) if device is not None else torch.device("cpu")
    g = torch.arange(groups, dtype=torch.int64, device=dev).view(1, groups)
    idx = ((torch.arange(n, dtype=torch.int64, device=dev) + first_index) & MASK32).view(n, 1)
    x0, x1, x2, x3 = philox4x32(
        g.expand(n, groups), idx.expand(n, groups), torch.full_like(g, step & MASK32).expand(n, groups),
        torch.zeros_like(g).expand(n, groups), seed & MASK32, (seed >> 32) & MASK32,
    )
    z0, z1 = _box_muller(uniform_from_bits(x0), uniform_from_bits(x1))
    z2, z3 = _box_muller(uniform_from_bits(x2), uniform_from_bits(x3))
    z = torch.stack([z0, z1, z2, z3], dim=-1).reshape(n, groups * 4)[:, :numel]
    return z.reshape(n, *shape).contiguous()


def normal_like_batch(x: torch.Tensor, seed: int, first_index: int, step: int) -> torch.Tensor:
    """``normal`` shaped like the batch ``x`` (B, *shape), on x's device."""
    return normal(seed, first_index, x.shape[0], step, tuple(x.shape[1:]), x.device)
