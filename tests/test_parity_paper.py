"""Parity with the paper code's semantics (ermongroup/ddim, functions/denoising.py), from FACTS.md 2.

The paper code is re-typed here as the oracle: betas from a float64 linspace cast to float32,
a_t = cumprod(1 - cat([0], betas))[t + 1] (so t = -1 gives 1), skip types uniform and quad,
and generalized_steps at eta = 0. fastddim must agree to float32 rounding.
"""
import numpy as np
import pytest
import torch

import fastddim

T = 1000


def paper_betas():
    return torch.from_numpy(np.linspace(1e-4, 0.02, T, dtype=np.float64)).float()


def compute_alpha(beta, t):
    beta = torch.cat([torch.zeros(1), beta], dim=0)
    return (1 - beta).cumprod(dim=0).index_select(0, t + 1).view(-1, 1, 1, 1)


def paper_seq(skip_type, S):
    if skip_type == "uniform":
        return list(range(0, T, T // S))
    return [int(s) for s in list(np.linspace(0, np.sqrt(T * 0.8), S) ** 2)]


def generalized_steps(x, seq, model, b, eta=0.0):
    n = x.size(0)
    seq_next = [-1] + list(seq[:-1])
    xt = x
    for i, j in zip(reversed(seq), reversed(seq_next)):
        t = torch.ones(n) * i
        next_t = torch.ones(n) * j
        at = compute_alpha(b, t.long())
        at_next = compute_alpha(b, next_t.long())
        et = model(xt, t)
        x0_t = (xt - et * (1 - at).sqrt()) / at.sqrt()
        c1 = eta * ((1 - at / at_next) * (1 - at_next) / (1 - at)).sqrt()
        c2 = ((1 - at_next) - c1**2).sqrt()
        xt = at_next.sqrt() * x0_t + c1 * torch.randn_like(x) + c2 * et
    return xt


def smooth_model(x, t):
    """A smooth, x- and t-dependent stand-in for a trained eps network."""
    t = torch.as_tensor(t, dtype=torch.float32).view(-1, 1, 1, 1)
    return torch.tanh(0.7 * x) * (0.5 + t / 2000) + 0.05 * torch.sin(3 * x)


def test_schedule_is_the_papers():
    assert torch.equal(fastddim.Schedule.linear().betas, paper_betas())
    ac = compute_alpha(paper_betas(), torch.arange(-1, T)).flatten()
    assert ac[0] == 1.0
    assert torch.equal(fastddim.Schedule.linear().alphas_cumprod, ac[1:])


@pytest.mark.parametrize("skip_type,S", [("uniform", 10), ("uniform", 20), ("uniform", 50), ("uniform", 100),
                                         ("quad", 10), ("quad", 20)])
def test_generalized_steps_eta0(skip_type, S):
    seq = paper_seq(skip_type, S)
    plan = fastddim.plan.make_plan(fastddim.Schedule.linear(), S, spacing=skip_type)
    assert list(plan.timesteps) == sorted(seq, reverse=True)
    x_T = fastddim.noise.normal(3, 0, 4, 0, (3, 8, 8))
    ref = generalized_steps(x_T, seq, smooth_model, paper_betas())
    got = fastddim.sample(smooth_model, n=4, steps=S, spacing=skip_type, x_T=x_T, shape=(3, 8, 8),
                          schedule=fastddim.Schedule.linear(), backend="torch", progress=False)
    # Same maths, different rounding order (the paper forms c2 and x0 differently): float32 ulps per step.
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_quad_ten_steps_values():
    plan = fastddim.plan.make_plan(fastddim.Schedule.linear(), 10, spacing="quad")
    assert plan.timesteps == (800, 632, 483, 355, 246, 158, 88, 39, 9, 0)


@pytest.mark.parametrize("S", [30, 50, 100])
def test_quad_duplicates_are_moved_up(S):
    """The paper code repeats timesteps for large S; fastddim keeps S distinct ones."""
    paper = paper_seq("quad", S)
    plan = fastddim.plan.make_plan(fastddim.Schedule.linear(), S, spacing="quad")
    assert len(set(paper)) < S
    assert len(set(plan.timesteps)) == S
    assert max(plan.timesteps) == max(paper)


# ------------------------------------------------------------------ fastddim.paper_timesteps (the paper's own list)
@pytest.mark.parametrize("skip_type,S", [("uniform", 10), ("uniform", 30), ("uniform", 7), ("uniform", 1000),
                                         ("quad", 10), ("quad", 30), ("quad", 50), ("quad", 100), ("quad", 1)])
def test_paper_timesteps_are_the_papers_list(skip_type, S):
    seq = paper_seq(skip_type, S)
    ts = fastddim.paper_timesteps(skip_type, S)
    assert ts == sorted(set(seq), reverse=True)
    assert all(a > b for a, b in zip(ts, ts[1:])) and ts[-1] == 0


def test_paper_timesteps_step_counts():
    # uniform keeps the paper's extra step when S does not divide T; quad drops the repeats
    assert len(fastddim.paper_timesteps("uniform", 10)) == 10
    assert len(fastddim.paper_timesteps("uniform", 30)) == 31
    assert fastddim.paper_timesteps("uniform", 30)[:2] == [990, 957]
    assert [len(fastddim.paper_timesteps("quad", S)) for S in (20, 30, 50, 100)] == [20, 29, 49, 96]
    assert fastddim.paper_timesteps("quad", 10, T=500) == sorted({int(s) for s in np.linspace(0, np.sqrt(400), 10) ** 2},
                                                                 reverse=True)


@pytest.mark.parametrize("skip_type,S", [("uniform", 10), ("uniform", 30), ("quad", 10), ("quad", 30), ("quad", 50),
                                         ("quad", 100)])
def test_sampling_paper_timesteps_equals_the_paper_loop(skip_type, S):
    """sample(steps=len(ts), spacing=paper_timesteps(...)) against the paper's generalized_steps over its
    own list, repeats included (S = 30 uniform: 31 steps; quad S >= 30: repeated timesteps)."""
    seq = paper_seq(skip_type, S)
    ts = fastddim.paper_timesteps(skip_type, S)
    x_T = fastddim.noise.normal(5, 0, 4, 0, (3, 8, 8))
    ref = generalized_steps(x_T, seq, smooth_model, paper_betas())
    got = fastddim.sample(smooth_model, n=4, steps=len(ts), spacing=ts, x_T=x_T, shape=(3, 8, 8),
                          schedule=fastddim.Schedule.linear(), backend="torch", progress=False)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("S,exact", [(30, True), (100, True), (200, False)])
def test_a_repeated_timestep_is_an_identity_step(S, exact):
    """The paper's step from t to the same t: a_t == a_next, so sigma is 0 and x_t comes back, up to
    float32 rounding. Dropping the repeats changes nothing (S = 30, 100) or about one ulp per repeat."""
    seq = paper_seq("quad", S)
    assert len(set(seq)) < len(seq)
    at = compute_alpha(paper_betas(), torch.tensor(seq))
    assert all(at[i] == at[i - 1] for i in range(1, len(seq)) if seq[i] == seq[i - 1])
    x_T = fastddim.noise.normal(3, 0, 4, 0, (3, 8, 8))
    with_repeats = generalized_steps(x_T, seq, smooth_model, paper_betas())
    without = generalized_steps(x_T, sorted(set(seq)), smooth_model, paper_betas())
    if exact:
        assert torch.equal(with_repeats, without)
    torch.testing.assert_close(with_repeats, without, rtol=0, atol=1e-5)


@pytest.mark.parametrize("args, err", [(("linear", 10), ValueError), (("quad", 0), ValueError),
                                       (("uniform", 1001), ValueError), (("quad", 10.0), TypeError),
                                       (("uniform", 10, 0), ValueError)])
def test_paper_timesteps_bad_arguments(args, err):
    with pytest.raises(err):
        fastddim.paper_timesteps(*args)
