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
