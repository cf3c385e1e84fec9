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
device: the oracle of the tests and the noise of the ``torch`` backend. It computes the spec
literally (the same float ops, in the same order), in cache-sized passes of in-place ops; the
fused kernels make the same numbers inside the step.
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

    int64 multiplication wraps modulo 2**64, so the product's 64 bits are all there even when it
    reads as negative; the arithmetic shift's low 32 bits are still bits 32..63.
    """
    p = a * m
    return (p >> 32) & MASK32, p & MASK32


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


# Philox groups per pass of ``normal`` on the CPU, per thread: its ~10 int64 and float32 buffers
# (~2 MB) stay in cache, where each torch op runs several times faster than over whole tensors.
_CPU_CHUNK = 1 << 15


def _philox_(c: list[torch.Tensor], p: list[torch.Tensor], k0: int, k1: int) -> None:
    """Philox-4x32-10 in place on the int64 buffers c = [c0, c1, c2, c3]; p: two scratch buffers.

    One multiply per product (see _mulhilo). Words 1 and 3 are left unmasked (the full product:
    correct low 32 bits, garbage above), which only ever meets an xor and a final mask; words 0
    and 2, the next round's factors, are masked. The four words come back in c, words 1 and 3
    unmasked.
    """
    for r in range(PHILOX_ROUNDS):
        torch.mul(c[0], PHILOX_M0, out=p[0])
        torch.mul(c[2], PHILOX_M1, out=p[1])
        torch.bitwise_right_shift(p[1], 32, out=c[0])
        c[0].bitwise_xor_(c[1]).bitwise_xor_(k0).bitwise_and_(MASK32)
        torch.bitwise_right_shift(p[0], 32, out=c[2])
        c[2].bitwise_xor_(c[3]).bitwise_xor_(k1).bitwise_and_(MASK32)
        c[1], p[1] = p[1], c[1]  # lo1 is the product itself: swap buffers rather than copy
        c[3], p[0] = p[0], c[3]
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32


def _uniform_(x: torch.Tensor, tmp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """uniform_from_bits(x & MASK32) into the float32 ``out``, with fewer passes: the spec's
    (float(x >> 9) + 0.5) * 2**-23 equals float(((x >> 8) & 0xFFFFFF) | 1) * 2**-24 exactly
    (an odd integer below 2**24, scaled by a power of 2), so no rounding differs."""
    torch.bitwise_right_shift(x, 8, out=tmp)
    tmp.bitwise_and_(0xFFFFFF).bitwise_or_(1)
    return torch.mul(tmp, 2.0**-24, out=out)


def _box_muller_(ua: torch.Tensor, ub: torch.Tensor, tmp: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor) -> None:
    """z0, z1 = r cos(theta), r sin(theta) with r = sqrt(-2 log(ua)), theta = 2 pi ub (spec step 4),
    the same torch ops in the same order as the plain formula; ua and ub are overwritten. log, cos
    and sin run on contiguous buffers (their vectorised kernels); the products may go to strided
    outputs (a product rounds the same everywhere)."""
    torch.log(ua, out=ua).mul_(-2.0).sqrt_()
    ub.mul_(TWO_PI_F32)
    torch.cos(ub, out=tmp)
    torch.mul(ua, tmp, out=z0)
    torch.sin(ub, out=tmp)
    torch.mul(ua, tmp, out=z1)


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

    Computed as the spec reads, on the n * groups Philox groups in flat order, in passes of a
    few thousand groups on the CPU (in-place ops on buffers that stay in cache), each group's
    four normals written to its four lanes of the output.
    """
    numel = math.prod(shape)
    groups = (numel + 3) // 4
    total = n * groups
    dev = torch.device(device) if device is not None else torch.device("cpu")
    res = torch.empty((total, 4), dtype=torch.float32, device=dev)
    chunk = max(1, min(total, _CPU_CHUNK * torch.get_num_threads() if dev.type == "cpu" else total))
    ints = [torch.empty(chunk, dtype=torch.int64, device=dev) for _ in range(7)]
    floats = [torch.empty(chunk, dtype=torch.float32, device=dev) for _ in range(3)]
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for start in range(0, total, chunk):
        m = min(chunk, total - start)
        c, p, tmp = [t[:m] for t in ints[:4]], [t[:m] for t in ints[4:6]], ints[6][:m]
        fa, fb, ft = (t[:m] for t in floats)
        # Counter (g, sample index mod 2**32, step, 0) of flat group q = sample row * groups + g.
        torch.arange(start, start + m, out=tmp)
        torch.div(tmp, groups, rounding_mode="floor", out=c[1])
        torch.mul(c[1], groups, out=c[0])
        torch.sub(tmp, c[0], out=c[0])
        c[1].add_(first_index).bitwise_and_(MASK32)
        c[2].fill_(step & MASK32)
        c[3].zero_()
        _philox_(c, p, k0, k1)
        z = res[start:start + m]
        _box_muller_(_uniform_(c[0], tmp, fa), _uniform_(c[1], tmp, fb), ft, z[:, 0], z[:, 1])
        _box_muller_(_uniform_(c[2], tmp, fa), _uniform_(c[3], tmp, fb), ft, z[:, 2], z[:, 3])
    z = res.view(n, groups * 4)
    return (z if groups * 4 == numel else z[:, :numel].contiguous()).view(n, *shape)


def normal_like_batch(x: torch.Tensor, seed: int, first_index: int, step: int) -> torch.Tensor:
    """``normal`` shaped like the batch ``x`` (B, *shape), on x's device."""
    return normal(seed, first_index, x.shape[0], step, tuple(x.shape[1:]), x.device)
