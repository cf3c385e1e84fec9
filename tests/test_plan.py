"""Timestep plans and the per-step scalar table."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastddim
from fastddim.plan import SPACINGS, make_plan, timesteps


@settings(max_examples=300, deadline=None)
@given(T=st.integers(1, 2000), data=st.data(), spacing=st.sampled_from(SPACINGS))
def test_plans_have_S_strictly_decreasing_entries_in_range(T, data, spacing):
    S = data.draw(st.integers(1, T))
    ts = timesteps(T, S, spacing)
    assert len(ts) == S
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert 0 <= ts[-1] and ts[0] <= T - 1


@settings(max_examples=200, deadline=None)
@given(T=st.integers(2, 2000), data=st.data())
def test_leading_offset_never_past_T(T, data):
    S = data.draw(st.integers(1, T))
    offset = data.draw(st.integers(0, 5))
    try:
        ts = timesteps(T, S, "leading", offset)
    except ValueError as e:
        assert "steps_offset" in str(e)
        assert (S - 1) * (T // S) + offset > T - 1
    else:
        assert ts[0] <= T - 1 and len(ts) == S


def test_uniform_equals_leading_and_papers_range():
    for S in (1, 10, 20, 50, 100, 1000):
        assert timesteps(1000, S, "uniform") == timesteps(1000, S, "leading")
        assert timesteps(1000, S, "uniform") == sorted(range(0, 1000, 1000 // S), reverse=True)


def test_trailing_and_linspace_ends():
    assert timesteps(1000, 10, "trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert timesteps(1000, 4, "linspace") == [999, 666, 333, 0]
    assert timesteps(1000, 1, "linspace") == [0]
    assert timesteps(1000, 1, "trailing") == [999]


def test_prev_timesteps_come_from_the_plan():
    plan = make_plan(fastddim.Schedule.linear(), 7, spacing="trailing")
    assert plan.prev_timesteps == plan.timesteps[1:] + (-1,)


def test_table_is_host_float32_and_matches_the_formulas():
    sched = fastddim.Schedule.cosine()
    plan = make_plan(sched, 10, eta=0.5, set_alpha_to_one=False)
    assert plan.table.dtype == torch.float32 and plan.table.device.type == "cpu"
    assert plan.table.shape == (10, len(fastddim.plan.COLUMNS))
    ac = sched.alphas_cumprod.double()
    for j, (t, tp) in enumerate(zip(plan.timesteps, plan.prev_timesteps)):
        a = ac[t].item()
        ap = ac[tp].item() if tp >= 0 else ac[0].item()
        sigma = 0.5 * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
        sqrt_a, sqrt_1ma, c_x0, c_eps, c_xt, sig = plan.scalars[j]
        assert sqrt_a == pytest.approx(math.sqrt(a), rel=1e-6)
        assert sqrt_1ma == pytest.approx(math.sqrt(1 - a), rel=1e-5)
        assert c_x0 == pytest.approx(math.sqrt(ap), rel=1e-6)
        assert sig == pytest.approx(sigma, rel=1e-4, abs=1e-7)
        assert c_eps == pytest.approx(math.sqrt(max(1 - ap - sigma**2, 0)), rel=1e-4, abs=1e-6)
        assert c_xt == 0


def test_sigma_hat_table():
    sched = fastddim.Schedule.linear()
    plan = make_plan(sched, 10, eta="sigma_hat")
    assert plan.noise == (True,) * 9 + (False,)
    ac = sched.alphas_cumprod.double()
    t, tp = plan.timesteps[0], plan.prev_timesteps[0]
    beta = 1 - ac[t] / ac[tp]
    assert plan.scalars[0][5] == pytest.approx(math.sqrt(beta), rel=1e-5)
    assert plan.scalars[0][2] == pytest.approx((math.sqrt(ac[tp]) * beta / (1 - ac[t])).item(), rel=1e-5)
    assert plan.scalars[0][4] == pytest.approx((math.sqrt(1 - beta) * (1 - ac[tp]) / (1 - ac[t])).item(), rel=1e-5)


def test_eta_one_never_takes_sqrt_of_negative():
    plan = make_plan(fastddim.Schedule.cosine(), 1, eta=1.0, spacing="trailing", set_alpha_to_one=False)
    assert all(math.isfinite(v) for row in plan.scalars for v in row)


@pytest.mark.parametrize("spacing,match", [
    ("cubic", "spacing"), ([5, 7, 1], "strictly decreasing"), ([900, 900, 1], "repeat"),
    ([1000, 500], r"\[0, T"), ([-1], r"\[0, T"), ([], "empty"), ([9.5, 1], "integers"),
])
def test_bad_spacing(spacing, match):
    with pytest.raises(ValueError, match=match):
        timesteps(1000, 3, spacing)


def test_explicit_plan_and_steps_must_agree():
    plan = make_plan(fastddim.Schedule.linear(), 3, spacing=[999, 500, 0])
    assert plan.timesteps == (999, 500, 0)
    with pytest.raises(ValueError, match="steps"):
        make_plan(fastddim.Schedule.linear(), 4, spacing=[999, 500, 0])
