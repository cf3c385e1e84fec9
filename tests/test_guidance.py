"""fastddim.guidance: the reference math against diffusers bit for bit, every refusal, the
per-step table (interval weights and calls), and the kwargs of doubled and split calls."""
import math

import pytest
import torch

from fastddim.guidance import (
    Guidance, cfgpp_outputs, combine, doubled_kwargs, guide, halves, halves_kwargs, make_guidance, rescale,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(4, 3, 8, 8), (2, 4, 16), (3, 1, 5, 7)]


def _pair(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=g)
    c = u + 0.3 * torch.randn(shape, generator=g)  # the two predictions are close, as in a real model
    return u.to(dtype), c.to(dtype)


def _assert_bits(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    if not torch.equal(got, want):
        d = (got.float() - want.float()).abs()
        i = int(d.argmax())
        raise AssertionError(f"{int((d > 0).sum())} elements differ; worst at {i}: {got.flatten()[i]} vs "
                             f"{want.flatten()[i]}")


# ------------------------------------------------------------------------------ the math vs diffusers
def _pipeline_cfg(noise_pred, guidance_scale, guidance_rescale):
    """The Stable Diffusion pipeline's lines (diffusers 0.42.1, pipeline_stable_diffusion.py
    1054-1059), as written there, on the doubled call's output."""
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
    if guidance_rescale > 0.0:
        noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=guidance_rescale)
    return noise_pred


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("w, phi", [(7.3, 0.0), (7.3, 0.7), (1.7, 0.3), (5.0, 1.0), (0.4, 0.55)])
def test_guide_equals_the_diffusers_pipeline_bit_for_bit(dtype, shape, w, phi):
    pytest.importorskip("diffusers")
    u, c = _pair(shape, dtype)
    out = torch.cat([u, c])
    u2, c2 = halves(out)
    _assert_bits(guide(u2, c2, w, phi), _pipeline_cfg(out, w, phi))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_combine_and_rescale_equal_diffusers_functions(dtype, phi):
    """The pieces on their own: rescale is diffusers' rescale_noise_cfg; combine then rescale is
    diffusers' ClassifierFreeGuidance guider (same formula, called with w > 1)."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    u, c = _pair((4, 3, 8, 8), dtype, seed=1)
    e = combine(u, c, 6.1)
    _assert_bits(rescale(e, c, phi), rescale_noise_cfg(e, c, guidance_rescale=phi))
    guider = diffusers.ClassifierFreeGuidance(guidance_scale=6.1, guidance_rescale=phi)
    _assert_bits(guide(u, c, 6.1, phi), guider.forward(c, u).pred)


def test_rescale_uses_the_unbiased_std_over_all_non_batch_dims():
    u, c = _pair((2, 3, 4, 4), torch.float64)
    e = combine(u, c, 4.0)
    r = rescale(e, c, 1.0)
    for i in range(2):  # phi = 1: each sample's std becomes the conditional prediction's
        assert math.isclose(float(r[i].std()), float(c[i].std()), rel_tol=1e-12)
        assert math.isclose(float(r[i].std()), float(torch.std(c[i].flatten(), correction=1)), rel_tol=1e-12)
    torch.testing.assert_close(rescale(e, c, 0.0), e, rtol=0, atol=0)


def test_scale_one_is_the_conditional_output_itself():
    u, c = _pair((2, 3, 4, 4), torch.float32)
    assert guide(u, c, 1.0, 0.7) is c  # no arithmetic: u + (c - u) would round differently from c
    _assert_bits(guide(u, c, 0.0), u)  # w = 0: the unconditional prediction


def test_learned_variance_guides_the_eps_half_only():
    u, c = _pair((2, 6, 4, 4), torch.float32)  # C = 3: eps channels 0..2, variance channels 3..5
    g = guide(u, c, 4.0, 0.5, eps_channels=3)
    _assert_bits(g[:, :3], guide(u[:, :3], c[:, :3], 4.0, 0.5))  # the rescale's std is over the eps half
    _assert_bits(g[:, 3:], c[:, 3:])  # the variance is the conditional output's
    x0_out, dir_out = cfgpp_outputs(u, c, 0.6, eps_channels=3)
    _assert_bits(x0_out[:, :3], combine(u[:, :3], c[:, :3], 0.6))
    _assert_bits(dir_out[:, :3], u[:, :3])
    _assert_bits(x0_out[:, 3:], c[:, 3:])
    _assert_bits(dir_out[:, 3:], c[:, 3:])
    _assert_bits(guide(u[:, :3], c[:, :3], 4.0, eps_channels=3), guide(u[:, :3], c[:, :3], 4.0))
    with pytest.raises(ValueError, match="5 channels"):
        guide(u[:, :5], c[:, :5], 4.0, eps_channels=3)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_cfgpp_is_the_papers_ddim_update(eta):
    """Chung et al. 2024, DDIM: x0 from e_u + lam (e_c - e_u), the direction from e_u. Through the
    reference step's own conversions (predict_x0 / predict_x0_eps): bit for bit for an eps-model,
    within rounding for a v-model (x0 and eps are linear in v with weights summing to one)."""
    from fastddim.reference import predict_x0, predict_x0_eps

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 4, 4, generator=g)
    e_u, e_c = torch.randn(2, 3, 2, 4, 4, generator=g).unbind(0)
    a, a_prev, lam = 0.3, 0.6, 0.7
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
    sa, s1a, c_eps = math.sqrt(a), math.sqrt(1 - a), math.sqrt(1 - a_prev - sigma**2)

    e_lam = e_u + lam * (e_c - e_u)
    want = math.sqrt(a_prev) * ((x - s1a * e_lam) / sa) + c_eps * e_u

    def step(out_u, out_c, pred):
        out_x0, out_dir = cfgpp_outputs(out_u, out_c, lam)
        x0 = predict_x0(x, out_x0, sa, s1a, pred)
        eps = predict_x0_eps(x, out_dir, sa, s1a, pred)[1]
        return math.sqrt(a_prev) * x0 + c_eps * eps

    _assert_bits(step(e_u, e_c, "epsilon"), want)
    v = lambda e: (e - s1a * x) / sa  # noqa: E731  the v with that eps: eps = sqrt(a) v + sqrt(1 - a) x
    torch.testing.assert_close(step(v(e_u), v(e_c), "v_prediction"), want, rtol=1e-5, atol=1e-5)
    assert (step(e_u, e_c, "epsilon") - step(e_c, e_c, "epsilon")).abs().max() > 1e-3  # e_u is used


# ------------------------------------------------------------------------------ refusals
TS = [900, 700, 500, 300, 100]
LAB = {"class_labels": torch.tensor([1, 2, 3])}
NULL = {"class_labels": torch.tensor([10])}


def _make(**kw):
    args = dict(timesteps=TS, guidance_scale=3.0, uncond_kwargs=NULL, model_kwargs=LAB, n=3)
    return make_guidance(**{**args, **kw})


@pytest.mark.parametrize("kw, err, match", [
    (dict(uncond_kwargs=None), ValueError, r"guidance_scale 3.0 needs uncond_kwargs"),
    (dict(uncond_kwargs=None, guidance="cfg++", guidance_scale=0.5), ValueError, r"cfg\+\+.*needs uncond_kwargs"),
    (dict(uncond_kwargs=None, guidance_scale=[1.0, 1.0, 2.0, 1.0, 1.0]), ValueError, r"2.0 needs uncond_kwargs"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be a finite number"),
    (dict(guidance_scale=float("inf")), ValueError, "guidance_scale must be a finite number"),
    (dict(guidance_scale=-0.5), ValueError, r"guidance_scale must be a finite number in \[0.0"),
    (dict(guidance_scale="3"), TypeError, "guidance_scale must be a number"),
    (dict(guidance_scale=True), TypeError, "guidance_scale must be a number"),
    (dict(guidance_scale=[2.0, 2.0]), ValueError, r"guidance_scale: a per-step list needs 5 weights"),
    (dict(guidance_scale=[2.0, 2.0, -1.0, 2.0, 2.0]), ValueError, r"guidance_scale\[2\]"),
    (dict(guidance="cfg++", guidance_scale=1.5), ValueError, r"guidance_scale must be a finite number in \[0.0, 1.0\]"),
    (dict(guidance="pag"), ValueError, "guidance must be one of"),
    (dict(guidance_rescale=1.5), ValueError, "guidance_rescale must be a finite number in"),
    (dict(guidance_rescale=-0.1), ValueError, "guidance_rescale"),
    (dict(guidance_rescale=float("nan")), ValueError, "guidance_rescale"),
    (dict(guidance="cfg++", guidance_scale=0.5, guidance_rescale=0.7), ValueError, "guidance_rescale applies to"),
    (dict(guidance_interval=(500,)), ValueError, "guidance_interval must be a pair"),
    (dict(guidance_interval=(1, 2, 3)), ValueError, "guidance_interval must be a pair"),
    (dict(guidance_interval="0,500"), ValueError, "guidance_interval must be a pair"),
    (dict(guidance_interval=500), ValueError, "guidance_interval must be a pair"),
    (dict(guidance_interval=(600, 200)), ValueError, r"t_lo <= t_hi, got \(600.0, 200.0\)"),
    (dict(guidance_interval=(0, float("inf"))), ValueError, r"guidance_interval\[1\] must be a finite number"),
    (dict(guidance_interval=(None, 5)), TypeError, r"guidance_interval\[0\] must be a number"),
    (dict(uncond_kwargs={"class_labels": torch.tensor([10, 10])}), ValueError,
     r"uncond_kwargs\['class_labels'\] has leading dimension 2: .*n = 3"),
    (dict(uncond_kwargs={"class_labels": torch.tensor(10)}), ValueError,
     r"uncond_kwargs\['class_labels'\] has no leading dimension"),
    (dict(model_kwargs={"class_labels": torch.tensor([1, 2])}), ValueError, r"model_kwargs\['class_labels'\]"),
    (dict(uncond_kwargs=[("class_labels", 10)]), TypeError, "uncond_kwargs must be a dict"),
    (dict(model_kwargs=None), ValueError, r"same keys: only in uncond_kwargs \['class_labels'\], only in model_kwargs \[\]"),
    (dict(uncond_kwargs={}), ValueError, r"only in uncond_kwargs \[\], only in model_kwargs \['class_labels'\]"),
    (dict(uncond_kwargs={**NULL, "mask": torch.ones(1, 4)}), ValueError, r"only in uncond_kwargs \['mask'\]"),
    (dict(uncond_kwargs={"class_labels": None}), TypeError, r"uncond_kwargs\['class_labels'\] and model_kwargs.*both"),
    (dict(uncond_kwargs={"class_labels": torch.tensor([10.0])}), ValueError,
     r"uncond_kwargs\['class_labels'\] is torch.float32 .* model_kwargs\['class_labels'\] is torch.int64"),
    (dict(uncond_kwargs={"e": torch.zeros(1, 77, 8)}, model_kwargs={"e": torch.zeros(3, 77, 16)}), ValueError,
     r"same shape after the leading dimension"),
    (dict(uncond_kwargs={"scale": 0.5}, model_kwargs={"scale": 1.0}), ValueError,
     r"uncond_kwargs\['scale'\] = 0.5 differs from model_kwargs\['scale'\] = 1.0"),
    (dict(n=0), ValueError, "n must be"),
])
def test_bad_input_is_refused_naming_the_argument(kw, err, match):
    with pytest.raises(err, match=match):
        _make(**kw)


def test_what_is_accepted():
    # a negative prompt shared by all (leading dimension 1) next to per-sample prompts
    g = _make(uncond_kwargs={"e": torch.zeros(1, 7, 4)}, model_kwargs={"e": torch.ones(3, 7, 4)})
    assert g.calls == (2,) * 5 and g.weights == (3.0,) * 5
    # per-sample negative labels, shared positive label
    _make(uncond_kwargs={"class_labels": torch.tensor([10, 10, 10])}, model_kwargs={"class_labels": torch.tensor([4])})
    # non-tensors: equal for one doubled call; free to differ with split calls
    _make(uncond_kwargs={**NULL, "scale": 1.0}, model_kwargs={**LAB, "scale": 1.0})
    g = _make(uncond_kwargs={**NULL, "scale": 0.5}, model_kwargs={**LAB, "scale": 1.0}, split=True)
    assert g.split
    # w = 1 needs no uncond_kwargs and makes no unconditional call
    g = _make(guidance_scale=1.0, uncond_kwargs=None)
    assert g.calls == (1,) * 5 and not g.active and g.uncond_steps == 0 and g.uncond_kwargs == {}
    # an unguided run's kwargs keep their rules (a 0-dim tensor is shared), whatever guidance needs
    assert not _make(guidance_scale=1.0, uncond_kwargs=None, model_kwargs={"scale": torch.tensor(0.5)}).active
    # an int scale, an int interval
    assert _make(guidance_scale=2, guidance_interval=[100, 500]).weights == (1.0, 1.0, 2.0, 2.0, 2.0)


# ------------------------------------------------------------------------------ the per-step table
@pytest.mark.parametrize("ts, interval, weights, calls", [
    ([900, 700, 500, 300, 100], None, [3.0] * 5, [2] * 5),
    ([900, 700, 500, 300, 100], (300, 700), [1.0, 3.0, 3.0, 3.0, 1.0], [1, 2, 2, 2, 1]),  # inclusive ends
    ([900, 700, 500, 300, 100], (301, 699), [1.0, 1.0, 3.0, 1.0, 1.0], [1, 1, 2, 1, 1]),
    ([999, 749, 499, 249], (0, 1000), [3.0] * 4, [2] * 4),
    ([999, 749, 499, 249], (250, 498.5), [1.0] * 4, [1] * 4),  # no step inside: no unconditional call
    (list(range(950, -1, -50)), (0, 400), [1.0] * 11 + [3.0] * 9, [1] * 11 + [2] * 9),
])
def test_interval_weights_and_calls(ts, interval, weights, calls):
    g = make_guidance(ts, 3.0, guidance_interval=interval, uncond_kwargs=NULL, model_kwargs={"class_labels": torch.tensor([4])}, n=1)
    assert list(g.weights) == weights and list(g.calls) == calls
    assert g.uncond_steps == calls.count(2) and g.active == (2 in calls)


def test_per_step_weights():
    g = _make(guidance_scale=[1.0, 2.5, 0.0, 1.0, 4.0], guidance_interval=(100, 600))
    assert g.weights == (1.0, 1.0, 0.0, 1.0, 4.0)  # 2.5 lies outside the interval
    assert g.calls == (1, 1, 2, 1, 2)  # w = 0 (the unconditional prediction) still needs both halves


def test_cfgpp_calls_inside_the_interval_even_at_lambda_one():
    g = _make(guidance="cfg++", guidance_scale=1.0, guidance_interval=(250, 750))
    assert g.method == "cfg++" and g.weights == (1.0,) * 5
    assert g.calls == (1, 2, 2, 2, 1)  # lambda = 1 still renoises with the unconditional eps


def test_guidance_is_hashable_host_data():
    a = _make(guidance_interval=(200, 800))
    b = _make(guidance_interval=(200, 800), uncond_kwargs={"class_labels": torch.tensor([9])})
    assert isinstance(a, Guidance) and a == b and hash(a) == hash(b)  # kwargs are not part of the table
    assert a != _make(guidance_interval=(200, 900))
    assert a.uncond_kwargs is NULL


# ------------------------------------------------------------------------------ model calls
def test_doubled_kwargs_put_the_unconditional_half_first_and_broadcast():
    u = {"y": torch.tensor([10]), "e": torch.arange(6.0).reshape(3, 2), "scale": 1.0}
    c = {"y": torch.tensor([1, 2, 3]), "e": torch.ones(1, 2), "scale": 1.0}
    d = doubled_kwargs(u, c, 3)
    assert d["y"].tolist() == [10, 10, 10, 1, 2, 3]
    assert torch.equal(d["e"], torch.cat([torch.arange(6.0).reshape(3, 2), torch.ones(3, 2)]))
    assert d["scale"] == 1.0 and d.keys() == c.keys()
    hu, hc = halves_kwargs(u, c, 3)
    assert hu["y"].tolist() == [10, 10, 10] and hc["y"].tolist() == [1, 2, 3]
    assert hc["e"].shape == (3, 2) and hc["e"].data_ptr() == c["e"].data_ptr()  # a view, not a copy
    for k in ("y", "e"):
        assert torch.equal(torch.cat([hu[k], hc[k]]), d[k])  # the split calls see the doubled call's halves
    with pytest.raises(ValueError, match=r"uncond_kwargs\['e'\] has shape \(3, 2\): expected a leading dimension of 1 or 2"):
        doubled_kwargs(u, c, 2)


def test_doubled_call_output_splits_into_its_halves():
    u, c = _pair((2, 3, 4, 4), torch.float32)
    hu, hc = halves(torch.cat([u, c]))
    _assert_bits(hu, u)
    _assert_bits(hc, c)
    with pytest.raises(ValueError, match="even batch"):
        halves(u[:1])
    with pytest.raises(ValueError, match=r"model_kwargs\['y'\] has shape \(\): expected a leading dimension"):
        halves_kwargs({}, {"y": torch.tensor(3)}, 2)
