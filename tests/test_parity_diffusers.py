"""Bit-exact parity of the reference path with diffusers' DDIMScheduler loop (CPU, float32).

diffusers is only imported here (and in benchmarks), never by fastddim itself.
"""
import itertools

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler  # noqa: E402

import fastddim  # noqa: E402
from fastddim.noise import normal  # noqa: E402

SHAPE = (3, 8, 8)


def dummy_model(x, t):
    """diffusers' own test model: out = x * t / (t + 1)."""
    t = torch.as_tensor(t)
    if t.ndim:
        t = t.view(-1, *([1] * (x.ndim - 1)))
    return x * t / (t + 1)


def dummy_sample():
    """diffusers' dummy sample: arange(768) / 768 as (4, 3, 8, 8)."""
    return (torch.arange(768, dtype=torch.float32) / 768).reshape(3, 8, 8, 4).permute(3, 0, 1, 2).contiguous()


def diffusers_loop(sched: DDIMScheduler, S: int, x: torch.Tensor, eta: float, seed: int = 0, model=dummy_model,
                   use_clipped_model_output: bool = False):
    """The DDIMPipeline loop, fed fastddim's noise for each step so both runs use the same z."""
    sched.set_timesteps(S)
    for j, t in enumerate(sched.timesteps):
        z = normal(seed, 0, x.shape[0], j + 1, tuple(x.shape[1:]))
        out = model(x, t)
        out = getattr(out, "sample", out)
        x = sched.step(out, t, x, eta=eta, variance_noise=z, use_clipped_model_output=use_clipped_model_output).prev_sample
    return x


def fastddim_run(sched: DDIMScheduler, S: int, x: torch.Tensor, eta: float, **kw):
    return fastddim.sample(dummy_model, n=x.shape[0], steps=S, eta=eta, x_T=x, shape=SHAPE, backend="torch",
                           progress=False, **fastddim.from_diffusers(sched), **kw)


def test_golden_values():
    """diffusers' test_full_loop_no_noise: sum 172.0067, mean 0.223967."""
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    x = fastddim_run(sched, 10, dummy_sample(), 0.0)
    assert abs(x.abs().sum().item() - 172.0067) < 1e-2
    assert abs(x.abs().mean().item() - 0.223967) < 1e-3


def test_variance_golden_values():
    sched = fastddim.Schedule.linear(linspace="float32")
    plan = fastddim.plan.make_plan(sched, 1000, eta=1.0)
    table = dict(zip(plan.timesteps, plan.scalars))
    # sigma at (t, t-1) with eta = 1 squares to diffusers' _get_variance(t, t - 1)
    assert table[487][5] ** 2 == pytest.approx(0.00979, abs=1e-5)
    assert table[999][5] ** 2 == pytest.approx(0.02, abs=1e-5)
    plan20 = fastddim.plan.make_plan(sched, 50, eta=1.0)
    table20 = dict(zip(plan20.timesteps, plan20.scalars))
    assert table20[420][5] ** 2 == pytest.approx(0.14771, abs=1e-5)
    assert table20[980][5] ** 2 == pytest.approx(0.32460, abs=1e-5)


def test_steps_offset_timesteps():
    plan = fastddim.plan.make_plan(fastddim.Schedule.linear(), 5, spacing="leading", steps_offset=1)
    assert plan.timesteps == (801, 601, 401, 201, 1)


BETAS = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
]
GRID = [g for g in itertools.product(
    range(len(BETAS)),
    ["epsilon", "sample", "v_prediction"],
    ["leading", "trailing"],
    [1, 10, 25],
    [True, False],            # clip_sample
    [True, False],            # set_alpha_to_one
    [0, 1],                   # steps_offset (leading only)
    [0.0, 1.0],               # eta
) if g[6] == 0 or g[2] == "leading"]  # diffusers applies steps_offset to leading only


@pytest.mark.parametrize("b,pred,spacing,S,clip,alpha1,offset,eta", GRID)
def test_bit_exact_grid(b, pred, spacing, S, clip, alpha1, offset, eta):
    sched = DDIMScheduler(**BETAS[b], prediction_type=pred, timestep_spacing=spacing, clip_sample=clip,
                          set_alpha_to_one=alpha1, steps_offset=offset)
    x = dummy_sample()
    ref = diffusers_loop(sched, S, x, eta)
    got = fastddim_run(sched, S, x, eta)
    if torch.isnan(ref).any():
        # diffusers takes sqrt(1 - a_prev - sigma^2) of a value rounded below 0 (eta = 1, final
        # a_prev = a_0): NaN. fastddim clamps it at 0 (FACTS.md section 1).
        assert eta == 1.0 and not alpha1 and torch.isfinite(got).all()
        return
    assert torch.equal(got, ref), f"max |diff| = {(got - ref).abs().max().item()}"


# 27 (linspace) and 48 (trailing): ties that diffusers' float64 linspace / arange round differently
# from exact arithmetic
@pytest.mark.parametrize("S", [10, 20, 27, 48, 50, 100, 250, 1000])
def test_timesteps_match_diffusers_where_right(S):
    for spacing in ("leading", "trailing", "linspace"):
        sched = DDIMScheduler(timestep_spacing=spacing)
        sched.set_timesteps(S)
        plan = fastddim.plan.make_plan(fastddim.Schedule.linear(), S, spacing=spacing)
        assert list(plan.timesteps) == sched.timesteps.tolist()


@pytest.mark.parametrize("S", [61, 103, 121])
def test_trailing_never_has_extra_step(S):
    """diffusers' float arange gives S + 1 trailing timesteps ending in -1 for these S."""
    sched = DDIMScheduler(timestep_spacing="trailing")
    sched.set_timesteps(S)
    assert len(sched.timesteps) == S + 1 and sched.timesteps[-1] == -1  # the known diffusers bug
    plan = fastddim.plan.make_plan(fastddim.Schedule.linear(), S, spacing="trailing")
    assert len(plan.timesteps) == S and min(plan.timesteps) >= 0


def test_linspace_uses_plan_prev_timestep():
    """For linspace, diffusers' t - T // S is wrong; with the same (correct) timesteps given
    explicitly fastddim steps to the plan's next timestep, and so differs from diffusers."""
    sched = DDIMScheduler(timestep_spacing="linspace", clip_sample=False)
    sched.set_timesteps(10)
    plan = fastddim.plan.make_plan(fastddim.Schedule.linear(linspace="float32"), 10, spacing="linspace")
    assert list(plan.prev_timesteps[:-1]) == sched.timesteps.tolist()[1:]
    wrong = [int(t) - 1000 // 10 for t in sched.timesteps]
    assert sum(a != b for a, b in zip(wrong[:-1], plan.prev_timesteps[:-1])) == 9


@pytest.mark.parametrize("thresh_ratio,max_value", [(0.995, 1.0), (0.9, 1.5)])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_bit_exact_thresholding(thresh_ratio, max_value, pred):
    sched = DDIMScheduler(thresholding=True, dynamic_thresholding_ratio=thresh_ratio, sample_max_value=max_value,
                          prediction_type=pred)
    x = dummy_sample() * 3
    assert torch.equal(fastddim_run(sched, 10, x, 0.5), diffusers_loop(sched, 10, x, 0.5))


@pytest.mark.parametrize("clip_range", [1.0, 0.5])
def test_bit_exact_clipped_model_output(clip_range):
    sched = DDIMScheduler(clip_sample=True, clip_sample_range=clip_range)
    x = dummy_sample() * 2
    got = fastddim_run(sched, 10, x, 0.3, use_clipped_model_output=True)
    assert torch.equal(got, diffusers_loop(sched, 10, x, 0.3, use_clipped_model_output=True))


def test_bit_exact_zero_terminal_snr_v_prediction():
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing",
                          clip_sample=False)
    x = dummy_sample()
    assert torch.equal(fastddim_run(sched, 10, x, 0.0), diffusers_loop(sched, 10, x, 0.0))


def test_from_diffusers_schedule_and_config_dict():
    for kw in BETAS:
        sched = DDIMScheduler(**kw)
        for source in (sched, dict(sched.config)):
            args = fastddim.from_diffusers(source)
            assert torch.equal(args["schedule"].alphas_cumprod, sched.alphas_cumprod)
            assert torch.equal(args["schedule"].betas, sched.betas)
    trained = DDIMScheduler(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist())
    assert torch.equal(fastddim.from_diffusers(trained)["schedule"].alphas_cumprod, trained.alphas_cumprod)


def test_unet2dmodel_unchanged_bit_exact():
    """A diffusers UNet2DModel is a model as it is: shape from its config, .sample unwrapped."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8).eval()
    sched = DDIMScheduler()
    x = normal(7, 0, 2, 0, (3, 8, 8))
    with torch.no_grad():
        ref = diffusers_loop(sched, 5, x.clone(), 0.0, model=unet)
    got = fastddim.sample(unet, n=2, steps=5, x_T=x, progress=False, backend="torch", **fastddim.from_diffusers(sched))
    assert got.shape == (2, 3, 8, 8)
    assert torch.equal(got, ref)
