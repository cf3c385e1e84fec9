"""Schedules: exact construction and clear errors."""
import math

import numpy as np
import pytest
import torch

from fastddim import Schedule


def test_linear_is_float64_linspace_cast_to_float32():
    s = Schedule.linear(1000)
    assert s.betas.dtype == torch.float32
    assert torch.equal(s.betas, torch.from_numpy(np.linspace(1e-4, 0.02, 1000)).float())
    assert torch.equal(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))


def test_cosine_matches_the_formula_and_cap():
    s = Schedule.cosine(1000)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert s.betas[0].item() == pytest.approx(1 - f(1 / 1000) / f(0), rel=1e-6)
    assert s.betas.max().item() == pytest.approx(0.999)


def test_zero_terminal_snr():
    s = Schedule.scaled_linear(rescale_zero_terminal_snr=True)
    assert s.zero_terminal_snr and s.alphas_cumprod[-1] == 0
    assert s.alphas_cumprod[0] == pytest.approx(Schedule.scaled_linear().alphas_cumprod[0].item(), rel=1e-6)


def test_from_alphas_cumprod_round_trip():
    s = Schedule.linear(100)
    t = Schedule.from_alphas_cumprod(s.alphas_cumprod)
    assert torch.equal(t.alphas_cumprod, s.alphas_cumprod)
    torch.testing.assert_close(t.betas, s.betas, rtol=1e-4, atol=1e-7)
    assert t == s and hash(t) == hash(s)


@pytest.mark.parametrize("bad", [[], [0.1, -0.2], [float("nan")], [[0.1]]])
def test_from_betas_rejects_bad(bad):
    with pytest.raises(ValueError, match="betas"):
        Schedule.from_betas(bad)


@pytest.mark.parametrize("bad", [[0.5, 0.9], [1.2], [0.0, 0.0]])
def test_from_alphas_cumprod_rejects_bad(bad):
    with pytest.raises(ValueError, match="alphas_cumprod"):
        Schedule.from_alphas_cumprod(bad)


@pytest.mark.parametrize("T", [0, -3, 2.5, True])
def test_bad_T(T):
    with pytest.raises(ValueError, match="T"):
        Schedule.linear(T)


def test_to_dict_is_jsonable():
    import json

    d = Schedule.cosine(50).to_dict()
    assert json.loads(json.dumps(d)) == d and d["T"] == 50
