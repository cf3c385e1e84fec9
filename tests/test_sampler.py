"""The public API: sample, invert, interpolate; batch invariance; bad input."""
import math

import pytest
import torch

import fastddim
from fastddim.noise import normal

SHAPE = (2, 6, 5)


class GaussianModel(torch.nn.Module):
    """The exact eps-predictor for data ~ N(mu, s^2 I): the DDIM ODE is then smooth and exact
    inversion is possible, so round-trip errors measure the sampler's discretisation alone.

    E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a).
    """

    def __init__(self, schedule=None, s=0.5):
        super().__init__()
        self.schedule = schedule or fastddim.Schedule.linear()
        self.sample_shape = SHAPE
        g = torch.Generator().manual_seed(0)
        self.register_buffer("mu", torch.rand(SHAPE, generator=g) - 0.5)
        self.s2 = s * s
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        a = self.schedule.alphas_cumprod.to(x.device)[t].view(-1, *([1] * len(SHAPE)))
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s2 + 1 - a)


@pytest.fixture
def model():
    return GaussianModel()


def test_shape_dtype_and_default_n(model):
    x = fastddim.sample(model, steps=5, progress=False)
    assert x.shape == (1, *SHAPE) and x.dtype == torch.float32
    assert fastddim.info()["last_run"]["backend"] in ("torch", "cpp", "triton")


def test_samples_follow_the_data_distribution(model):
    x = fastddim.sample(model, n=256, steps=50, progress=False)
    assert (x.mean(0) - model.mu).abs().max() < 0.25
    assert abs(x.std(0).mean().item() - 0.5) < 0.06


@pytest.mark.parametrize("eta", [0.0, 1.0, "sigma_hat"])
def test_batch_invariance(model, eta):
    a = fastddim.sample(model, n=8, steps=10, eta=eta, seed=11, progress=False)
    b = fastddim.sample(model, n=3, steps=10, eta=eta, seed=11, progress=False)
    assert torch.equal(a[:3], b)
    c = fastddim.sample(model, n=8, steps=10, eta=eta, seed=11, batch_size=3, progress=False)
    assert torch.equal(a, c)
    d = fastddim.sample(model, n=2, steps=10, eta=eta, seed=11, first_index=5, progress=False)
    assert torch.equal(a[5:7], d)


def test_seed_changes_samples_and_x_T_is_the_noise_function(model):
    a = fastddim.sample(model, n=2, steps=4, seed=1, progress=False)
    assert not torch.equal(a, fastddim.sample(model, n=2, steps=4, seed=2, progress=False))
    x_T = normal(1, 0, 2, 0, SHAPE)
    # The torch backend draws x_T with the reference itself; a fused backend with its own kernel,
    # identical to it within the ulps tests/test_noise_backends.py bounds.
    ref = fastddim.sample(model, n=2, steps=4, seed=1, backend="torch", progress=False)
    assert torch.equal(ref, fastddim.sample(model, steps=4, x_T=x_T, backend="torch", progress=False))
    torch.testing.assert_close(a, fastddim.sample(model, steps=4, x_T=x_T, progress=False), atol=1e-5, rtol=1e-5)


def test_eta_zero_is_deterministic_and_eta_changes_result(model):
    x_T = normal(0, 0, 4, 0, SHAPE)
    a = fastddim.sample(model, steps=10, x_T=x_T, eta=0.0, seed=1, progress=False)
    b = fastddim.sample(model, steps=10, x_T=x_T, eta=0.0, seed=2, progress=False)
    assert torch.equal(a, b)
    assert not torch.equal(a, fastddim.sample(model, steps=10, x_T=x_T, eta=0.5, progress=False))


def test_model_return_types():
    class Out:
        def __init__(self, s):
            self.sample = s

    sched = fastddim.Schedule.linear()
    base = dict(n=2, steps=3, shape=SHAPE, schedule=sched, progress=False)
    ref = fastddim.sample(lambda x, t: 0.1 * x, **base)
    assert torch.equal(ref, fastddim.sample(lambda x, t: Out(0.1 * x), **base))
    assert torch.equal(ref, fastddim.sample(lambda x, t: (0.1 * x, None), **base))
    with pytest.raises(TypeError, match="model returned"):
        fastddim.sample(lambda x, t: "nope", **base)


def test_model_gets_int64_t_and_kwargs():
    seen = []

    def m(x, t, scale):
        seen.append((t.dtype, tuple(t.shape), int(t[0]), scale))
        return x * 0

    fastddim.sample(m, n=3, steps=2, shape=SHAPE, schedule=fastddim.Schedule.linear(), model_kwargs={"scale": 7},
                    progress=False)
    assert seen == [(torch.int64, (3,), 500, 7), (torch.int64, (3,), 0, 7)]


def test_callback_sees_every_step(model):
    seen = []
    fastddim.sample(model, n=2, steps=4, batch_size=1, callback=lambda j, t, x, x0: seen.append((j, t, x.shape)),
                    progress=False)
    assert [s[:2] for s in seen] == [(0, 750), (1, 500), (2, 250), (3, 0)] * 2


def test_progress_bar(model, capsys):
    fastddim.sample(model, n=2, steps=3, progress=True)
    assert "fastddim" in capsys.readouterr().err


def test_dtype_runs_model_in_low_precision(model):
    seen = []

    def m(x, t):
        seen.append(x.dtype)
        return model(x.float(), t).to(x.dtype)

    x = fastddim.sample(m, n=2, steps=5, shape=SHAPE, schedule=model.schedule, dtype=torch.bfloat16, progress=False)
    ref = fastddim.sample(model, n=2, steps=5, progress=False)
    assert set(seen) == {torch.bfloat16} and x.dtype == torch.float32
    torch.testing.assert_close(x, ref, atol=0.05, rtol=0.05)


# ------------------------------------------------------------------------------------ inversion
@pytest.mark.parametrize("convention", ["source", "target"])
def test_inversion_round_trip_error_falls_with_steps(model, convention):
    x0 = fastddim.sample(model, n=16, steps=100, seed=3, progress=False)
    errors = []
    for S in (5, 10, 20, 50, 100):
        x_T = fastddim.invert(model, x0, S, convention=convention, progress=False)
        rec = fastddim.sample(model, x_T=x_T, steps=S, progress=False)
        errors.append(((rec - x0) ** 2).mean().item())
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3 and errors[-1] < errors[0] / 10, errors


def test_inversion_recovers_the_latent(model):
    """The encoder inverts the decoder: invert(sample(x_T, S), S) -> x_T as S grows."""
    x_T = normal(4, 0, 32, 0, SHAPE)
    errors = []
    for S in (10, 50, 200):
        x0 = fastddim.sample(model, x_T=x_T, steps=S, progress=False)
        errors.append(((fastddim.invert(model, x0, S, progress=False) - x_T) ** 2).mean().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 2e-3, errors


def test_invert_other_prediction_types():
    """A v-prediction model of the same data inverts as well as the eps one (same ODE)."""
    g = GaussianModel()
    sched = g.schedule

    def v_model(x, t):
        a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = g(x, t)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    x0 = fastddim.sample(g, n=8, steps=50, seed=5, progress=False)
    kw = dict(schedule=sched, shape=SHAPE, prediction_type="v_prediction", progress=False)
    x_T_v = fastddim.invert(v_model, x0, 50, **kw)
    x_T_eps = fastddim.invert(g, x0, 50, progress=False)
    torch.testing.assert_close(x_T_v, x_T_eps, atol=1e-3, rtol=1e-3)
    rec = fastddim.sample(v_model, x_T=x_T_v, steps=50, **kw)
    assert ((rec - x0) ** 2).mean() < 5e-3


class BentModel(GaussianModel):
    """A smooth but nonlinear eps-model: the Euler encoder is no longer the decoder's inverse."""

    def forward(self, x, t):
        return super().forward(x, t) + 0.1 * torch.tanh(2 * x)


@pytest.mark.parametrize("convention", ["source", "target"])
def test_refined_inversion_makes_the_decoder_land_on_the_image(convention):
    """Fixed-point refinement: each iteration shrinks the S-step round trip error; enough of them
    make the decoder reproduce x0 to float32 precision even at S = 5 (where the iteration
    contracts slowly)."""
    m = BentModel()
    x0 = fastddim.sample(GaussianModel(), n=8, steps=50, seed=11, progress=False)
    errors = []
    for refine in (0, 1, 2, 4, 40):
        m.calls = 0
        z = fastddim.invert(m, x0, 5, convention=convention, refine=refine, spacing="uniform", progress=False)
        assert m.calls == 5 * (1 + refine)  # one batch: S calls plus `refine` per step
        assert fastddim.info()["last_run"]["refine"] == refine
        rec = fastddim.sample(m, x_T=z, steps=5, spacing="uniform", progress=False)
        errors.append(((rec - x0) ** 2).mean().item())
    assert errors[0] > 1e-4, errors  # the plain encoder really misses here
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-10, errors


def test_refined_inversion_matches_the_reference_loop():
    m = BentModel()
    x0 = fastddim.sample(GaussianModel(), n=6, steps=20, seed=2, progress=False)
    from fastddim import reference
    from fastddim.plan import make_plan

    plan = make_plan(m.schedule, 7, spacing="trailing")
    want = reference.ddim_invert(m, x0, plan, m.schedule.alphas_cumprod, "source", refine=2)
    got = fastddim.invert(m, x0, 7, spacing="trailing", refine=2, batch_size=4, progress=False)
    assert torch.equal(got, want)
    # refine=0 is the plain encoder, unchanged
    plain = reference.ddim_invert(m, x0, plan, m.schedule.alphas_cumprod, "source")
    assert torch.equal(fastddim.invert(m, x0, 7, spacing="trailing", refine=0, progress=False), plain)


def test_invert_bad_input(model):
    with pytest.raises(ValueError, match="x0"):
        fastddim.invert(model, torch.zeros(2, 1, 6, 5), 10)
    with pytest.raises(ValueError, match="convention"):
        fastddim.invert(model, torch.zeros(2, *SHAPE), 10, convention="middle")
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises((ValueError, TypeError), match="refine"):
            fastddim.invert(model, torch.zeros(2, *SHAPE), 10, refine=bad)
    assert model.calls == 0


# -------------------------------------------------------------------------------- interpolation
def test_interpolation_endpoints_equal_plain_samples(model):
    z = normal(9, 0, 2, 0, SHAPE)
    grid = fastddim.interpolate(model, z[0], z[1], num=7, steps=10, progress=False)
    plain = fastddim.sample(model, x_T=z, steps=10, progress=False)
    assert grid.shape == (7, *SHAPE)
    assert torch.equal(grid[0], plain[0]) and torch.equal(grid[-1], plain[1])


def test_slerp_keeps_norm():
    z0, z1 = normal(1, 0, 2, 0, (1000,))
    zs = fastddim.sampler.slerp(z0, z1, torch.linspace(0, 1, 5))
    norms = zs.norm(dim=1)
    assert (norms - z0.norm()).abs().max() < 0.05 * z0.norm()
    assert torch.equal(zs[0], z0) and torch.equal(zs[-1], z1)


# ---------------------------------------------------------------------------------- bad input
BAD = [
    (dict(n=0), ValueError, "n must be"),
    (dict(n=2.0), TypeError, "n must be an int"),
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=1001), ValueError, "steps"),
    (dict(steps=2.5), TypeError, "steps"),
    (dict(eta=-0.1), ValueError, "eta"),
    (dict(eta=float("nan")), ValueError, "eta"),
    (dict(eta=float("inf")), ValueError, "eta"),
    (dict(eta="ddpm"), ValueError, "eta"),
    (dict(spacing="cubic"), ValueError, "spacing"),
    (dict(spacing=[500, 1000, 2], steps=3), ValueError, "spacing"),
    (dict(spacing=[5, 50, 500], steps=3), ValueError, "strictly decreasing"),
    (dict(spacing=[50, 50, 5], steps=3), ValueError, "repeat"),
    (dict(x_T=torch.zeros(2, 3, 6, 5), n=2), ValueError, "x_T"),
    (dict(x_T=torch.zeros(3, *SHAPE), n=2), ValueError, "x_T"),
    (dict(prediction_type="noise"), ValueError, "prediction_type"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(backend="fortran"), ValueError, "backend"),
    (dict(steps_offset=1, spacing="trailing"), ValueError, "steps_offset"),
    (dict(steps_offset=1, spacing="leading", steps=1000), ValueError, "steps_offset"),
    (dict(shape=(0, 3)), ValueError, "shape"),
    (dict(bogus=1), TypeError, "bogus"),
    (dict(first_index=2**32 - 1), ValueError, "first_index"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD)
def test_bad_input_raises_before_any_model_call(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastddim.sample(model, **{"n": 2, "steps": 10, "progress": False, **kwargs})
    assert model.calls == 0


def test_zero_terminal_snr_with_epsilon_refused():
    m = GaussianModel(schedule=fastddim.Schedule.scaled_linear(rescale_zero_terminal_snr=True))
    with pytest.raises(ValueError, match="zero terminal SNR"):
        fastddim.sample(m, n=1, steps=10, progress=False)
    assert m.calls == 0


def test_no_schedule_no_shape():
    with pytest.raises(ValueError, match="schedule"):
        fastddim.sample(lambda x, t: x, steps=3, shape=SHAPE)
    with pytest.raises(ValueError, match="shape"):
        fastddim.sample(lambda x, t: x, steps=3, schedule=fastddim.Schedule.linear())


def test_model_on_another_device_refused():
    m = GaussianModel().to("meta")
    with pytest.raises(ValueError, match="device"):
        fastddim.sample(m, n=1, steps=3, device="cpu")
    assert m.calls == 0


def test_model_output_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        fastddim.sample(lambda x, t: x[:, :1], n=2, steps=3, shape=SHAPE, schedule=fastddim.Schedule.linear(),
                        progress=False)


def test_non_finite_output_names_the_step():
    def m(x, t):
        return x * float("nan") if int(t[0]) == 250 else x * 0.1

    with pytest.raises(FloatingPointError, match=r"step 2 \(t=250\)"):
        fastddim.sample(m, n=2, steps=4, shape=SHAPE, schedule=fastddim.Schedule.linear(), progress=False)
    out = fastddim.sample(m, n=2, steps=4, shape=SHAPE, schedule=fastddim.Schedule.linear(), progress=False,
                          check_finite=False)
    assert torch.isnan(out).any()
    # the encoder: calls at t = 0, 0, 250, 500 (source convention); with refine=1 every step
    # adds a call at its target: 0, 0 | 0, 250 | 250, 500 | 500, 750
    kw = dict(shape=SHAPE, schedule=fastddim.Schedule.linear(), spacing="uniform", progress=False)
    with pytest.raises(FloatingPointError, match=r"step 2 \(t=250\) of the inversion"):
        fastddim.invert(m, torch.zeros(2, *SHAPE), 4, **kw)
    with pytest.raises(FloatingPointError, match=r"model call 3 \(t=250\) of the inversion"):
        fastddim.invert(m, torch.zeros(2, *SHAPE), 4, refine=1, **kw)


def test_sigma_hat_keeps_samples_in_range(model):
    x = fastddim.sample(model, n=64, steps=20, eta="sigma_hat", progress=False)
    assert torch.isfinite(x).all() and x.abs().max() <= 1.0 + 1e-6 + 0.5  # x0 is clamped to [-1, 1]
    assert math.isfinite(x.std().item())
