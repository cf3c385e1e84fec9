"""The counter-based noise specification (fastddim/noise.py), on the torch reference."""
import math

import pytest
import torch

from fastddim.noise import normal, philox4x32, uniform_from_bits


def _philox(ctr, key):
    out = philox4x32(*[torch.tensor([c], dtype=torch.int64) for c in ctr], *key)
    return [int(o) for o in out]


@pytest.mark.parametrize("ctr,key,expected", [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
])
def test_philox_known_answers(ctr, key, expected):
    """Random123's known-answer vectors for Philox-4x32-10."""
    assert _philox(ctr, key) == expected


def test_uniform_mapping_bounds_and_exactness():
    x = torch.tensor([0, 1 << 9, 0xFFFFFFFF, 0x80000000], dtype=torch.int64)
    u = uniform_from_bits(x)
    assert u.dtype == torch.float32
    assert u[0].item() == 2.0**-24
    assert u[2].item() == 1 - 2.0**-24
    assert u[3].item() == 0.5 + 2.0**-24
    assert (u > 0).all() and (u < 1).all()


def test_normal_is_a_pure_function_of_index():
    full = normal(123, 0, 16, 4, (3, 5, 7))
    part = normal(123, 9, 4, 4, (3, 5, 7))
    assert torch.equal(full[9:13], part)


def test_normal_depends_on_seed_step_and_index():
    a = normal(1, 0, 2, 1, (64,))
    assert not torch.equal(a, normal(2, 0, 2, 1, (64,)))
    assert not torch.equal(a, normal(1, 0, 2, 2, (64,)))
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(normal(1 << 40, 0, 1, 1, (64,)), normal(0, 0, 1, 1, (64,)))  # high seed bits count


def test_normal_lanes_follow_the_spec():
    """Element e takes lane e % 4 of Philox(e // 4, index, step, 0): check one by hand."""
    seed, idx, step = 0x1234_5678_9ABC, 5, 3
    z = normal(seed, idx, 1, step, (10,))[0]
    words = _philox([2, idx, step, 0], [seed & 0xFFFFFFFF, seed >> 32])
    u = [uniform_from_bits(torch.tensor(w, dtype=torch.int64)).item() for w in words]
    r = math.sqrt(-2 * math.log(u[0]))
    assert z[8].item() == pytest.approx(r * math.cos(6.2831855 * u[1]), rel=1e-6, abs=1e-6)
    assert z[9].item() == pytest.approx(r * math.sin(6.2831855 * u[1]), rel=1e-6, abs=1e-6)


def test_normal_statistics():
    z = normal(0, 0, 64, 1, (3, 32, 32)).flatten().double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * n)
    # tails: P(|z| > 3) = 0.0027
    assert abs((z.abs() > 3).double().mean().item() - 0.0027) < 0.001


def _spec_normal(seed, first_index, n, step, shape):
    """The spec transcribed literally (whole tensors, 16-bit-split products, torch.stack): the
    oracle for the reference's chunked, in-place implementation."""
    def mulhilo(a, m):
        p = (a & 0xFFFF) * (m & 0xFFFF) + (((a >> 16) * (m & 0xFFFF) + (a & 0xFFFF) * (m >> 16)) << 16)
        return ((a >> 16) * (m >> 16) + (p >> 32)) & 0xFFFFFFFF, p & 0xFFFFFFFF

    numel = math.prod(shape)
    groups = (numel + 3) // 4
    c0 = torch.arange(groups, dtype=torch.int64).repeat(n, 1)
    c1 = ((torch.arange(n, dtype=torch.int64) + first_index) & 0xFFFFFFFF).view(n, 1).expand(n, groups)
    c2, c3 = torch.full_like(c0, step & 0xFFFFFFFF), torch.zeros_like(c0)
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    for _ in range(10):
        (hi0, lo0), (hi1, lo1) = mulhilo(c0, 0xD2511F53), mulhilo(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    z = []
    for a, b in ((c0, c1), (c2, c3)):
        r = torch.sqrt(-2.0 * torch.log(uniform_from_bits(a)))
        theta = uniform_from_bits(b) * 6.2831855
        z += [r * torch.cos(theta), r * torch.sin(theta)]
    return torch.stack(z, dim=-1).reshape(n, groups * 4)[:, :numel].reshape(n, *shape).contiguous()


@pytest.mark.parametrize("chunk", [None, 7, 4096], ids=["default", "7", "4096"])
@pytest.mark.parametrize("threads", [1, 2])
def test_normal_bit_identical_to_the_literal_spec(monkeypatch, chunk, threads):
    """The reference's passes (any size, a partial last one, one or two threads) change nothing:
    same integers, same float ops, same bits as the spec written out on whole tensors."""
    import fastddim.noise as noise

    if chunk is not None:
        monkeypatch.setattr(noise, "_CPU_CHUNK", chunk)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for args in ((0, 0, 5, 0, (3, 37, 37)), (2**64 - 1, 2**32 - 3, 6, 7, (5, 7)), (2**63 + 5, 9, 1, 2**32 + 1, (2,)),
                     (123456789, 1000, 3, 1, (1,)), (7, 3, 2, 4, (2, 40, 41))):
            got, want = normal(*args), _spec_normal(*args)
            assert got.shape == want.shape and got.is_contiguous()
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), args
    finally:
        torch.set_num_threads(saved)


def test_normal_of_nothing():
    assert normal(1, 0, 0, 1, (3, 4)).shape == (0, 3, 4)
    assert normal(1, 0, 2, 1, (0,)).shape == (2, 0)
