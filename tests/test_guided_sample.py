"""Classifier-free guidance through the engine (fastddim.sample / invert with uncond_kwargs).

- Parity with diffusers: a tiny random ``UNet2DConditionModel`` (cross-attention on
  ``encoder_hidden_states``) called by fastddim as it is, against the Stable Diffusion pipeline's
  CFG loop written out here (doubled batch, chunk, combine, ``rescale_noise_cfg``,
  ``DDIMScheduler.step``): bit for bit on ``backend="torch"``, within 1e-4 on the fused CPU
  backends; the same for ``DPMSolverMultistepScheduler`` and for ``invert`` against
  ``DDIMInverseScheduler``. CFG++ against a loop written from the paper's equations.
- The call pattern: 2n rows inside the guidance interval, n outside, none for w = 1; info().
- Per-sample and shared uncond_kwargs; every refusal before any model call.
- Batch invariance, doubled == split, NaN in one half caught, learned variance, the graph layer
  (CPU stand-in; on a GPU a real capture equals the eager run).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMInverseScheduler, DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel,
)
import fastddim  # noqa: E402
from fastddim import engine, graph  # noqa: E402
from fastddim.dispatch import available_backends  # noqa: E402
from fastddim.noise import normal  # noqa: E402
from test_graph import FakeGraph, fake  # noqa: E402,F401  (the CPU stand-in for a CUDA graph, one home)
from test_guidance import _assert_bits as assert_bits, _pipeline_cfg  # noqa: E402  (the SD pipeline's CFG lines)
from test_inverse_diffusers import check as assert_rel  # noqa: E402  (relative to the latent's scale)

gpu = pytest.mark.gpu

SHAPE = (4, 8, 8)  # the UNet's latents
SEQ, DIM = 5, 16   # the "prompt": 5 tokens of 16 channels (cross_attention_dim)
N = 2
CPU_FUSED = [b for b in ("cpp", "triton") if available_backends(torch.device("cpu"))[b] is None]

# The two scheduler settings: Stable Diffusion 1.x, and zero-terminal-SNR v-prediction (SD 2.x style).
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
          timestep_spacing="leading", set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon")
ZSNR = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
            timestep_spacing="trailing", prediction_type="v_prediction", clip_sample=False)
CONFIGS = {"sd-w7.5": (SD, 7.5, 0.0), "zsnr-v-w5-rescale0.7": (ZSNR, 5.0, 0.7)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny U-Net is 10x slower on two threads of a shared 2-core machine than on one."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def make_unet(device="cpu") -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=DIM, attention_head_dim=8, norm_num_groups=8,
    ).eval().to(device)


@pytest.fixture(scope="module")
def unet():
    return make_unet()


@pytest.fixture(scope="module")
def prompts():
    """(cond (N, SEQ, DIM): one prompt per sample, uncond (1, SEQ, DIM): the shared empty prompt)."""
    g = torch.Generator().manual_seed(3)
    return torch.randn((N, SEQ, DIM), generator=g), torch.randn((1, SEQ, DIM), generator=g)


def x_T(n=N, shape=SHAPE, seed=7):
    return normal(seed, 0, n, 0, shape)


# ------------------------------------------------------------- the diffusers loops, as the pipelines write them
def cfg_output(unet, x, t, cond, uncond, w, phi):
    """One guided model output of the Stable Diffusion pipeline (diffusers 0.42.1,
    pipeline_stable_diffusion.py): the doubled latents, one call on cat([negative, prompt]), then
    the pipeline's combine and rescale_noise_cfg lines (test_guidance._pipeline_cfg)."""
    emb = torch.cat([uncond.expand(x.shape[0], *uncond.shape[1:]), cond])
    return _pipeline_cfg(unet(torch.cat([x] * 2), t, encoder_hidden_states=emb).sample, w, phi)


def sd_loop(unet, sched, S, x, cond, uncond, w, phi=0.0, eta=0.0, seed=0):
    """The SD pipeline's denoising loop with a DDIMScheduler; for eta > 0 fed fastddim's noise for
    (seed, sample, step j + 1) as variance_noise, as tests/test_parity_diffusers.py does."""
    sched.set_timesteps(S)
    x = x * sched.init_noise_sigma
    with torch.no_grad():
        for j, t in enumerate(sched.timesteps):
            out = cfg_output(unet, sched.scale_model_input(x, t), t, cond, uncond, w, phi)
            z = normal(seed, 0, x.shape[0], j + 1, tuple(x.shape[1:])) if eta > 0 else None
            x = sched.step(out, t, x, eta=eta, variance_noise=z).prev_sample
    return x


def dpm_loop(unet, sched, S, x, cond, uncond, w, phi=0.0):
    """The same pipeline loop with a DPMSolverMultistepScheduler."""
    sched.set_timesteps(S)
    x = x * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(cfg_output(unet, sched.scale_model_input(x, t), t, cond, uncond, w, phi), t, x).prev_sample
    return x


def inverse_loop(unet, sched, S, x, cond, uncond, w):
    """Null-text inversion's guided DDIM inversion: DDIMInverseScheduler with the CFG output."""
    sched.set_timesteps(S)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(cfg_output(unet, x, t, cond, uncond, w, 0.0), t, x).prev_sample
    return x


def guided(unet, sched, prompts, w, phi=0.0, **kw):
    cond, uncond = prompts
    return fastddim.sample(unet, n=N, x_T=x_T(), batch_size=N, model_kwargs={"encoder_hidden_states": cond},
                           uncond_kwargs={"encoder_hidden_states": uncond}, guidance_scale=w, guidance_rescale=phi,
                           progress=False, **kw, **fastddim.from_diffusers(sched))


# ------------------------------------------------------------------------------------ 1. parity
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_guided_unet_bit_for_bit_with_the_sd_pipeline_loop(unet, prompts, name, eta):
    cfg, w, phi = CONFIGS[name]
    sched = DDIMScheduler(**cfg)
    want = sd_loop(unet, sched, 5, x_T(), *prompts, w, phi, eta=eta, seed=4)
    got = guided(unet, sched, prompts, w, phi, steps=5, eta=eta, seed=4, backend="torch")
    assert fastddim.info()["last_run"]["guided_steps"] == 5
    assert_bits(got, want)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_guided_unet_on_fused_backends_within_1e4(unet, prompts, name, backend):
    cfg, w, phi = CONFIGS[name]
    sched = DDIMScheduler(**cfg)
    want = sd_loop(unet, sched, 5, x_T(), *prompts, w, phi)
    got = guided(unet, sched, prompts, w, phi, steps=5, backend=backend)
    assert fastddim.info()["last_run"]["backend"] == backend
    assert_rel(got, want, 1e-4)


def test_guidance_changes_the_result(unet, prompts):
    """The parity above is not that of an unguided run: the unconditional half matters."""
    sched = DDIMScheduler(**SD)
    plain = fastddim.sample(unet, n=N, steps=5, x_T=x_T(), model_kwargs={"encoder_hidden_states": prompts[0]},
                            backend="torch", progress=False, **fastddim.from_diffusers(sched))
    assert (guided(unet, sched, prompts, 7.5, steps=5, backend="torch") - plain).abs().max() > 1e-2


# --------------------------------------------------------------------------------- 6. DPM-Solver++(2M)
@pytest.mark.parametrize("cfg,w,phi", [(dict(), 7.5, 0.0),
                                       (dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                             timestep_spacing="trailing", beta_schedule="scaled_linear",
                                             beta_start=0.00085, beta_end=0.012), 5.0, 0.7)])
def test_guided_dpm_solver_bit_for_bit_with_diffusers(unet, prompts, cfg, w, phi):
    sched = DPMSolverMultistepScheduler(**cfg)
    want = dpm_loop(unet, sched, 6, x_T(), *prompts, w, phi)
    got = guided(unet, sched, prompts, w, phi, steps=6, backend="torch")
    assert fastddim.info()["last_run"]["solver"] == "dpm++2m"
    assert_bits(got, want)


# --------------------------------------------------------------------------------------- 7. invert
@pytest.mark.parametrize("cfg", [dict(), dict(prediction_type="v_prediction", timestep_spacing="trailing")])
def test_guided_invert_bit_for_bit_with_ddim_inverse_scheduler(unet, prompts, cfg):
    cond, uncond = prompts
    sched = DDIMInverseScheduler(**cfg)
    x0 = torch.rand((N, *SHAPE), generator=torch.Generator().manual_seed(2)) * 2 - 1
    want = inverse_loop(unet, sched, 5, x0.clone(), cond, uncond, 3.0)
    got = fastddim.invert(unet, x0, 5, convention="target", backend="torch", batch_size=N, progress=False,
                          model_kwargs={"encoder_hidden_states": cond}, uncond_kwargs={"encoder_hidden_states": uncond},
                          guidance_scale=3.0, **fastddim.from_diffusers(sched))
    assert fastddim.info()["last_run"]["guided_steps"] == 5
    assert_bits(got, want)


# ------------------------------------------------------------------------------------- 5. CFG++
def cfgpp_loop(model, ac, timesteps, final, x, y, null, lam, eta=0.0, seed=0):
    """CFG++ DDIM (Chung et al. 2024, Algorithm 1 and its eta form), written from the paper with
    diffusers' scalar arithmetic (0-dim float32 tensors, ``** 0.5``), not through fastddim.guidance:

        eps_lam = u + lam (c - u),  x0 = (x - sqrt(1 - a) eps_lam) / sqrt(a),
        x_prev  = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) u + sigma z."""
    for j, t in enumerate(timesteps):
        tt = torch.full((x.shape[0],), t, dtype=torch.int64)
        u, c = model(x, tt, y=null), model(x, tt, y=y)
        eps_lam = u + lam * (c - u)
        a = ac[t]
        a_prev = ac[timesteps[j + 1]] if j + 1 < len(timesteps) else final
        x0 = (x - (1 - a) ** 0.5 * eps_lam) / a ** 0.5
        std = eta * (((1 - a_prev) / (1 - a)) * (1 - a / a_prev)) ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * u
        if eta > 0:
            x = x + std * normal(seed, 0, x.shape[0], j + 1, tuple(x.shape[1:]))
    return x


def label_model(x, t, y):
    """A per-sample, elementwise eps-model whose output depends on each row's label y (B,) and on t
    (batch invariant: no row sees another)."""
    s = (t.to(torch.float32) / 1000).view(-1, 1, 1, 1)
    return torch.tanh(0.7 * x + 0.1 * y.to(torch.float32).view(-1, 1, 1, 1) - 0.3 * s) + 0.05 * x.roll(1, dims=1)


SMALL = (2, 4, 4)
SCHED = fastddim.Schedule.linear()
NULL = 10


def labels(n=4):
    return {"y": torch.arange(n) % 10}, {"y": torch.tensor([NULL])}


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("lam", [0.4, 1.0])
def test_cfgpp_equals_the_papers_update(eta, lam):
    cond, uncond = labels()
    plan = fastddim.plan.make_plan(SCHED, 6, spacing="uniform")
    ac = SCHED.alphas_cumprod.to(torch.float32)
    want = cfgpp_loop(label_model, ac, plan.timesteps, torch.tensor(1.0), x_T(4, SMALL), cond["y"],
                      uncond["y"], lam, eta=eta, seed=9)
    got = fastddim.sample(label_model, n=4, steps=6, spacing="uniform", schedule=SCHED, shape=SMALL, x_T=x_T(4, SMALL),
                          eta=eta, seed=9, backend="torch", model_kwargs=cond, uncond_kwargs=uncond,
                          guidance="cfg++", guidance_scale=lam, progress=False)
    assert plan.final_alpha_cumprod == 1.0  # the paper's last step goes to a_prev = 1 (the loop's `final`)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    # and it is not plain CFG with the same weight (the direction really is the unconditional eps)
    cfg = fastddim.sample(label_model, n=4, steps=6, spacing="uniform", schedule=SCHED, shape=SMALL, x_T=x_T(4, SMALL),
                          eta=eta, seed=9, backend="torch", model_kwargs=cond, uncond_kwargs=uncond,
                          guidance_scale=lam, progress=False)
    assert (cfg - got).abs().max() > 1e-3


# ------------------------------------------------------------------------- 2. batch invariance, split
SMALL_KW = dict(steps=4, schedule=SCHED, shape=SMALL, progress=False, guidance_scale=3.0)


@pytest.mark.parametrize("backend", ["torch", *CPU_FUSED])
@pytest.mark.parametrize("extra", [dict(eta=1.0), dict(guidance_rescale=0.7, guidance_interval=(300, 800))])
def test_guided_samples_do_not_depend_on_the_batch(backend, extra):
    cond, uncond = labels(8)
    uncond_rows = {"y": torch.full((8,), NULL)}  # per-sample nulls: sliced with the batch too
    kw = dict(SMALL_KW, backend=backend, **extra)
    alone = fastddim.sample(label_model, n=3, first_index=2, model_kwargs={"y": cond["y"][2:5]},
                            uncond_kwargs={"y": uncond_rows["y"][2:5]}, **kw)
    in_one = fastddim.sample(label_model, n=8, batch_size=8, model_kwargs=cond, uncond_kwargs=uncond, **kw)[2:5]
    in_many = fastddim.sample(label_model, n=8, batch_size=3, model_kwargs=cond, uncond_kwargs=uncond_rows, **kw)[2:5]
    split = fastddim.sample(label_model, n=8, batch_size=3, model_kwargs=cond, uncond_kwargs=uncond,
                            guidance_split=True, **kw)[2:5]
    assert fastddim.info()["last_run"]["guidance_split"] is True
    for other in (in_one, in_many, split):
        assert_bits(other, alone)


# ----------------------------------------------------------------------------------- 3. call pattern
class Recorder:
    """label_model that records each call's (rows, timestep, labels)."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        assert t.shape == (x.shape[0],) and y.shape == (x.shape[0],)
        self.calls.append((x.shape[0], int(t[0]), y.tolist()))
        return label_model(x, t, y)


@pytest.mark.parametrize("split", [False, True])
def test_interval_calls_2n_inside_and_n_outside(split):
    m, n, (lo, hi) = Recorder(), 4, (250, 750)
    cond, uncond = labels(n)
    fastddim.sample(m, n=n, batch_size=n, model_kwargs=cond, uncond_kwargs=uncond, guidance_interval=(lo, hi),
                    guidance_split=split, **dict(SMALL_KW, steps=10))
    last = fastddim.info()["last_run"]
    ts = last["timesteps"]
    inside = [t for t in ts if lo <= t <= hi]
    assert 0 < len(inside) < len(ts)  # the interval really cuts the trajectory
    want = []
    for t in ts:
        if lo <= t <= hi:  # unconditional half first: null labels, then the prompt's
            want += [(n, t, [NULL] * n), (n, t, cond["y"].tolist())] if split else \
                    [(2 * n, t, [NULL] * n + cond["y"].tolist())]
        else:
            want.append((n, t, cond["y"].tolist()))
    assert m.calls == want
    assert last["guided_steps"] == len(inside)
    assert last["model_calls_per_sample"] == len(ts) + len(inside)
    assert last["guidance_weights"] == [3.0 if lo <= t <= hi else 1.0 for t in ts]


def test_scale_one_makes_no_unconditional_call():
    m = Recorder()
    cond, uncond = labels()
    out = fastddim.sample(m, n=4, batch_size=4, model_kwargs=cond, uncond_kwargs=uncond,
                          **dict(SMALL_KW, guidance_scale=1.0))
    assert [c[0] for c in m.calls] == [4] * 4 and all(NULL not in c[2] for c in m.calls)
    last = fastddim.info()["last_run"]
    assert last["guidance"] is None and last["model_calls_per_sample"] == 4
    plain = fastddim.sample(label_model, n=4, model_kwargs=cond, **dict(SMALL_KW, guidance_scale=1.0))
    assert_bits(out, plain)


def test_default_batch_halves_for_a_doubled_call():
    m = Recorder()
    cond, uncond = labels(64)
    fastddim.sample(m, n=64, model_kwargs=cond, uncond_kwargs=uncond, **dict(SMALL_KW, steps=1))
    unguided = engine.prepare(label_model, 64, 1, schedule=SCHED, shape=SMALL, model_kwargs=cond).batch_size
    assert fastddim.info()["last_run"]["batch_size"] == unguided // 2
    assert {c[0] for c in m.calls} == {unguided}  # each call holds as many rows as unguided


# -------------------------------------------------------------------------------- 4. uncond_kwargs
def test_per_sample_uncond_rows_are_sliced_per_batch():
    """Sample i with per-sample null labels in batches of 2 equals sample i drawn alone with its own."""
    n = 5
    cond = {"y": torch.tensor([1, 2, 3, 4, 5])}
    nulls = {"y": torch.tensor([10, 11, 12, 13, 14])}  # a different "null" per sample, so a wrong row shows
    kw = dict(SMALL_KW, backend="torch")
    got = fastddim.sample(label_model, n=n, batch_size=2, model_kwargs=cond, uncond_kwargs=nulls, **kw)
    for i in range(n):
        one = fastddim.sample(label_model, n=1, first_index=i, model_kwargs={"y": cond["y"][i:i + 1]},
                              uncond_kwargs={"y": nulls["y"][i:i + 1]}, **kw)
        assert_bits(got[i:i + 1], one)


def test_leading_one_uncond_is_broadcast():
    cond, uncond = labels(5)
    kw = dict(SMALL_KW, backend="torch", n=5, batch_size=2, model_kwargs=cond)
    shared = fastddim.sample(label_model, uncond_kwargs=uncond, **kw)
    assert_bits(shared, fastddim.sample(label_model, uncond_kwargs={"y": uncond["y"].expand(5)}, **kw))
    assert (shared - fastddim.sample(label_model, uncond_kwargs={"y": torch.tensor([9])}, **kw)).abs().max() > 1e-3


def never_called(x, t, **kw):
    raise AssertionError("the model was called before the arguments were checked")


Y4 = {"y": torch.arange(4)}
U1 = {"y": torch.tensor([NULL])}
BAD = [
    (dict(guidance_scale=3.0), ValueError, "needs uncond_kwargs"),
    (dict(guidance="cfg++", guidance_scale=0.5), ValueError, "needs uncond_kwargs"),
    (dict(uncond_kwargs=U1, guidance_scale=-1.0), ValueError, "guidance_scale"),
    (dict(uncond_kwargs=U1, guidance_scale=math.nan), ValueError, "guidance_scale"),
    (dict(uncond_kwargs=U1, guidance_scale=math.inf), ValueError, "guidance_scale"),
    (dict(uncond_kwargs=U1, guidance_scale="7"), TypeError, "guidance_scale"),
    (dict(uncond_kwargs=U1, guidance_scale=[2.0, 3.0]), ValueError, r"guidance_scale.*4 weights"),
    (dict(uncond_kwargs=U1, guidance_scale=[2.0, 3.0, math.nan, 1.0]), ValueError, r"guidance_scale\[2\]"),
    (dict(uncond_kwargs=U1, guidance_scale=3.0, guidance_rescale=1.5), ValueError, "guidance_rescale"),
    (dict(uncond_kwargs=U1, guidance_scale=3.0, guidance_rescale=-0.1), ValueError, "guidance_rescale"),
    (dict(uncond_kwargs=U1, guidance_scale=3.0, guidance_interval=(100,)), ValueError, "guidance_interval"),
    (dict(uncond_kwargs=U1, guidance_scale=3.0, guidance_interval=(800, 100)), ValueError, "t_lo <= t_hi"),
    (dict(uncond_kwargs=U1, guidance_scale=3.0, guidance_interval="ab"), ValueError, "guidance_interval"),
    (dict(uncond_kwargs=U1, guidance_scale=3.0, guidance_interval=(math.nan, 5)), ValueError, "guidance_interval"),
    (dict(uncond_kwargs={"y": torch.full((3,), NULL)}, guidance_scale=3.0), ValueError,
     r"uncond_kwargs\['y'\] has leading dimension 3"),
    (dict(uncond_kwargs={"y": torch.tensor(NULL)}, guidance_scale=3.0), ValueError, "no leading dimension"),
    (dict(uncond_kwargs={}, guidance_scale=3.0), ValueError, r"same keys.*only in model_kwargs \['y'\]"),
    (dict(uncond_kwargs={"y": torch.tensor([NULL]), "z": torch.ones(1)}, guidance_scale=3.0), ValueError, "same keys"),
    (dict(uncond_kwargs={"y": torch.tensor([0.5])}, guidance_scale=3.0), ValueError, "same dtype"),
    (dict(uncond_kwargs=U1, guidance_scale=3.0, guidance="cfgpp"), ValueError, "guidance must be one of"),
    (dict(uncond_kwargs=U1, guidance_scale=3.0, guidance_split=1), TypeError, "guidance_split"),
    (dict(uncond_kwargs=U1, guidance="cfg++", guidance_scale=1.5), ValueError, "guidance_scale"),
    (dict(uncond_kwargs=U1, guidance="cfg++", guidance_scale=0.5, guidance_rescale=0.5), ValueError,
     "guidance_rescale"),
    (dict(uncond_kwargs=U1, guidance="cfg++", guidance_scale=0.5, solver="dpm++2m"), ValueError,
     r"cfg\+\+.*solver='dpm\+\+2m'"),
    (dict(uncond_kwargs=U1, guidance="cfg++", guidance_scale=0.5, eta="sigma_hat"), ValueError,
     r"cfg\+\+.*sigma_hat"),
    (dict(uncond_kwargs=U1, guidance="cfg++", guidance_scale=0.5, use_clipped_model_output=True, clip_sample=True),
     ValueError, r"cfg\+\+.*use_clipped_model_output"),
]


@pytest.mark.parametrize("kw,exc,match", BAD)
def test_bad_guidance_is_refused_before_any_model_call(kw, exc, match):
    with pytest.raises(exc, match=match):
        fastddim.sample(never_called, n=4, steps=4, schedule=SCHED, shape=SMALL, model_kwargs=Y4, progress=False, **kw)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(guidance="cfg++", guidance_scale=0.5), ValueError, r"cfg\+\+"),
    (dict(guidance_scale=[2.0] * 4), TypeError, "guidance_scale"),
    (dict(guidance_scale=2.0, guidance_rescale=2.0), ValueError, "guidance_rescale"),
    (dict(guidance_scale=2.0, uncond_kwargs=None), ValueError, "needs uncond_kwargs"),
])
def test_bad_guided_invert_is_refused_before_any_model_call(kw, exc, match):
    kw = {"uncond_kwargs": U1, **kw}
    with pytest.raises(exc, match=match):
        fastddim.invert(never_called, torch.zeros(4, *SMALL), 4, schedule=SCHED, model_kwargs=Y4, progress=False, **kw)


# ------------------------------------------------------------------------------------ 8. NaN halves
def nan_where(label):
    def model(x, t, y):
        out = label_model(x, t, y)
        return torch.where((y == label).view(-1, 1, 1, 1), torch.full_like(out, math.nan), out)
    return model


@pytest.mark.parametrize("backend", ["torch", *CPU_FUSED[:1]])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("bad", [NULL, 3])  # only the unconditional half; only one conditional row
def test_a_nan_in_one_half_is_caught(backend, split, bad):
    cond, uncond = labels()
    kw = dict(SMALL_KW, n=4, batch_size=4, model_kwargs=cond, uncond_kwargs=uncond, guidance_split=split,
              backend=backend)
    with pytest.raises(FloatingPointError, match=r"not finite.*at step 0"):
        fastddim.sample(nan_where(bad), **kw)
    if bad == NULL:  # the conditional half alone is finite: unguided, the same model samples
        out = fastddim.sample(nan_where(bad), **dict(kw, guidance_scale=1.0))
        assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------ 9. learned variance
def with_variance(x, t, y):
    """label_model's eps and a "variance" half that differs per label (and is huge for the null label)."""
    var = torch.where((y == NULL).view(-1, 1, 1, 1), 1e6, y.to(torch.float32).view(-1, 1, 1, 1)).expand_as(x)
    return torch.cat([label_model(x, t, y), var], dim=1)


@pytest.mark.parametrize("backend", ["torch", *CPU_FUSED])
@pytest.mark.parametrize("extra", [dict(guidance_rescale=0.7), dict(guidance="cfg++", guidance_scale=0.6)])
def test_learned_variance_half_is_ignored_and_guidance_applies_to_eps(backend, extra):
    cond, uncond = labels()
    kw = dict(SMALL_KW, n=4, model_kwargs=cond, uncond_kwargs=uncond, backend=backend, **extra)
    got = fastddim.sample(with_variance, learned_variance=True, **kw)
    assert_bits(got, fastddim.sample(label_model, **kw))
    unguided = fastddim.sample(label_model, **dict(kw, guidance="cfg", guidance_scale=1.0, guidance_rescale=0.0))
    assert (got - unguided).abs().max() > 1e-3


# ------------------------------------------------------------------------------ 10. the graph layer
class RecordingGraph(FakeGraph):
    """The stand-in graph, recording what each replay is given."""

    seen: list = []

    def replay(self, x, b, first_index, kwargs, uncond, seed):
        RecordingGraph.seen.append((b, first_index, {k: v.clone() for k, v in kwargs.items()},
                                    {k: v.clone() for k, v in uncond.items()}))
        return super().replay(x, b, first_index, kwargs, uncond, seed)


def test_uncond_kwargs_reach_the_replay(fake, monkeypatch):
    monkeypatch.setattr(graph, "_Graph", RecordingGraph)
    monkeypatch.setattr(RecordingGraph, "seen", [])
    cond = {"y": torch.tensor([1, 2, 3, 4, 5])}
    nulls = {"y": torch.tensor([10, 11, 12, 13, 14])}
    run = engine.prepare(label_model, 5, 3, schedule=SCHED, shape=SMALL, batch_size=2, device="cpu",
                         model_kwargs=cond, uncond_kwargs=nulls, guidance_scale=4.0)
    run.sample(graph=True)
    got = [(b, i, k["y"].tolist(), u["y"].tolist()) for b, i, k, u in RecordingGraph.seen]
    # batches of 2, 2, 1: every batch padded (last row repeated) to the captured 2 rows, the unconditional
    # rows with them
    assert got == [(2, 0, [1, 2], [10, 11]), (2, 2, [3, 4], [12, 13]), (1, 4, [5, 5], [14, 14])]
    assert run.graph_replays == 3


def test_guidance_is_part_of_the_graph_key(fake):
    cond, uncond = labels(4)
    kw = dict(schedule=SCHED, shape=SMALL, batch_size=4, device="cpu", model_kwargs=cond, uncond_kwargs=uncond)
    for extra in (dict(guidance_scale=4.0), dict(guidance_scale=4.0), dict(guidance_scale=5.0),
                  dict(guidance_scale=4.0, guidance_rescale=0.5), dict(guidance_scale=4.0, guidance_interval=(0, 500)),
                  dict(guidance_scale=4.0, uncond_kwargs={"y": torch.full((4,), NULL)})):
        engine.prepare(label_model, 4, 3, **{**kw, **extra}).sample(graph=True)
    assert len(fake.made) == 5  # the repeat replayed the first graph; every other guidance captured its own


# -------------------------------------------------------------------------------------------- GPU
class LabelConv(torch.nn.Module):
    """A small conv eps-model with a per-class bias (null label NULL = 10 included)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.sample_shape, self.schedule = (3, 16, 16), SCHED
        self.a = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.b = torch.nn.Conv2d(16, 3, 3, padding=1)
        self.emb = torch.nn.Embedding(11, 16)

    def forward(self, x, t, y):
        h = self.a(x) + self.emb(y).view(-1, 16, 1, 1) + (t.to(x.dtype) / 1000).view(-1, 1, 1, 1)
        return self.b(torch.nn.functional.silu(h))


@pytest.fixture
def cuda_setup():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    fastddim.clear_cache()
    yield
    fastddim.clear_cache()
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("split", [False, True])
def test_guided_graph_captures_replays_and_equals_eager(cuda_setup, backend, split):
    m = LabelConv().cuda().eval()
    y = (torch.arange(13) % 10).cuda()  # 2 batches of 8, the last padded
    kw = dict(n=13, steps=8, eta=1.0, batch_size=8, seed=6, backend=backend, progress=False, model_kwargs={"y": y},
              uncond_kwargs={"y": torch.tensor([NULL], device="cuda")}, guidance_scale=5.0, guidance_rescale=0.7,
              guidance_interval=(200, 800), guidance_split=split)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to eager
        g = fastddim.sample(m, graph=True, **kw)
    last = fastddim.info()["last_run"]
    assert last["graph"] is True and last["graph_replays"] == 2 and last["backend"] == backend
    assert 0 < last["guided_steps"] < 8
    graphs = [e for e in graph._CACHE.values() if isinstance(e, graph._Graph)]
    assert len(graphs) == 1 and isinstance(graphs[0].graph, torch.cuda.CUDAGraph) and graphs[0].replays == 2
    e = fastddim.sample(m, graph=False, **kw)
    assert fastddim.info()["last_run"]["graph"] is False
    assert torch.equal(g[:8], e[:8])
    torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)  # the padded batch: another conv algorithm may run
    ref = fastddim.sample(m, graph=False, **dict(kw, backend="torch"))
    assert_rel(g.cpu(), ref.cpu(), 1e-4)
    unguided = fastddim.sample(m, graph=True, **dict(kw, guidance_scale=1.0, guidance_rescale=0.0))
    assert (unguided - g).abs().max() > 1e-3  # the unconditional half reached the captured model call


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_guided_unet_on_cuda_within_1e4_of_the_sd_loop(cuda_setup, prompts, backend):
    """The cross-attention U-Net on the GPU in a strict graph, against the SD loop on the CPU."""
    cond, uncond = prompts
    sched = DDIMScheduler(**ZSNR)
    want = sd_loop(make_unet(), sched, 5, x_T(), cond, uncond, 5.0, 0.7)
    got = fastddim.sample(make_unet("cuda"), n=N, steps=5, x_T=x_T().cuda(), batch_size=N, graph=True, backend=backend,
                          model_kwargs={"encoder_hidden_states": cond.cuda()},
                          uncond_kwargs={"encoder_hidden_states": uncond.cuda()}, guidance_scale=5.0,
                          guidance_rescale=0.7, progress=False, **fastddim.from_diffusers(sched))
    assert fastddim.info()["last_run"]["graph"] is True
    assert_rel(got.cpu(), want, 1e-4)
