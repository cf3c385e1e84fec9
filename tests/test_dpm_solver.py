"""DPM-Solver++(2M): the plan (plan.make_dpm_plan), the torch reference (reference.dpm_solver_step /
dpm_solver_sample) and the diffusers mapping (diffusers_dpm), against diffusers'
DPMSolverMultistepScheduler (CPU, float32).

Every parity check here is bit for bit (torch.equal): the plan's scalars are computed with the
float32 torch ops the scheduler uses and the reference applies them in its tensor-op order, so no
tolerance is needed on the CPU.
"""
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler, UNet2DModel  # noqa: E402

import fastddim  # noqa: E402
from fastddim.diffusers_dpm import dpm_kwargs  # noqa: E402
from fastddim.plan import DPM_COLUMNS, make_dpm_plan, make_plan  # noqa: E402
from fastddim.reference import ddim_step, dpm_solver_sample, dpm_solver_step  # noqa: E402

SHAPE = (3, 8, 8)

# The parity cells (diffusers config of each).
CONFIGS = {
    "eps-linear-linspace": dict(),
    "scaled_linear-leading-offset1": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          timestep_spacing="leading", steps_offset=1),
    "v-zero_snr-trailing": dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    "thresholding": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
    "karras": dict(use_karras_sigmas=True),
}


def plan_for(sched, S):
    """fastddim's plan for a diffusers scheduler, through the mapping."""
    kw = dpm_kwargs(sched.config)
    assert kw.pop("solver") == "dpm++2m"
    return make_dpm_plan(kw.pop("schedule"), S, **kw)


def diffusers_loop(sched, S, x, model):
    """The pipeline loop: x_T * init_noise_sigma, then model and step per timestep."""
    sched.set_timesteps(S)
    x = x * sched.init_noise_sigma
    for t in sched.timesteps:
        out = model(x, t)
        x = sched.step(getattr(out, "sample", out), t, x).prev_sample
    return x


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8).eval()


def cheap_model(x, t):
    """A deterministic stand-in whose output depends on x and t (for checks that need no U-Net)."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x.roll(1, dims=1) * (t / 1000 + 0.5))


@pytest.mark.parametrize("S", [5, 10, 20, 50])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_parity_bit_for_bit(unet, name, S):
    sched = DPMSolverMultistepScheduler(**CONFIGS[name])
    x_T = fastddim.noise.normal(3, 0, 2, 0, SHAPE)
    plan = plan_for(sched, S)
    seen = {}

    def model(x, t):
        # one forward per distinct (x, t): where fastddim's state equals diffusers' bit for bit the
        # second run reuses the output (halving a slow test); any other state is evaluated afresh
        key = (int(torch.as_tensor(t).reshape(-1)[0]), x.numpy().tobytes())
        if key not in seen:
            seen[key] = unet(x, t).sample
        return seen[key]

    with torch.no_grad():
        ref = diffusers_loop(sched, S, x_T.clone(), model)
        got = dpm_solver_sample(model, x_T.clone(), plan)
    assert list(plan.timesteps) == sched.timesteps.tolist()
    assert torch.equal(torch.tensor(plan.sigmas), sched.sigmas)
    assert torch.isfinite(ref).all()
    assert torch.equal(got, ref), f"max |diff| = {(got - ref).abs().max().item()}"


@pytest.mark.parametrize("cfg", [dict(prediction_type="sample"), dict(final_sigmas_type="sigma_min"),
                                 dict(final_sigmas_type="sigma_min", lower_order_final=False), dict(solver_order=1),
                                 dict(use_karras_sigmas=True, beta_schedule="scaled_linear", beta_start=0.00085,
                                      beta_end=0.012, final_sigmas_type="sigma_min")])
@pytest.mark.parametrize("S", [1, 2, 14, 15, 20])
def test_other_settings_bit_for_bit(cfg, S):
    sched = DPMSolverMultistepScheduler(**cfg)
    x_T = fastddim.noise.normal(5, 0, 2, 0, SHAPE)
    ref = diffusers_loop(sched, S, x_T.clone(), cheap_model)
    got = dpm_solver_sample(cheap_model, x_T.clone(), plan_for(sched, S))
    assert torch.equal(got, ref), f"max |diff| = {(got - ref).abs().max().item()}"


def diffusers_orders(sched, S):
    """Which update diffusers' step runs at each step (1: first order, 2: second)."""
    orders = []
    first, second = sched.dpm_solver_first_order_update, sched.multistep_dpm_solver_second_order_update
    sched.dpm_solver_first_order_update = lambda *a, **k: (orders.append(1), first(*a, **k))[1]
    sched.multistep_dpm_solver_second_order_update = lambda *a, **k: (orders.append(2), second(*a, **k))[1]
    diffusers_loop(sched, S, torch.zeros(1, 1, 2, 2), lambda x, t: torch.zeros_like(x))
    return tuple(orders)


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_orders_first_and_last_as_diffusers(final, lower_order_final):
    for S in (1, 2, 3, 5, 14, 15, 16, 25):
        sched = DPMSolverMultistepScheduler(final_sigmas_type=final, lower_order_final=lower_order_final)
        plan = plan_for(sched, S)
        assert plan.orders == diffusers_orders(sched, S), S
        assert plan.orders[0] == 1 and all(o == 2 for o in plan.orders[1:-1])
        if final == "zero" or (lower_order_final and S < 15):
            assert plan.orders[-1] == 1
    plan = plan_for(DPMSolverMultistepScheduler(final_sigmas_type="sigma_min", lower_order_final=False), 5)
    assert plan.orders == (1, 2, 2, 2, 2)


@pytest.mark.parametrize("cfg", [dict(timestep_spacing="linspace"), dict(timestep_spacing="leading", steps_offset=1),
                                 dict(timestep_spacing="trailing"), dict(use_karras_sigmas=True)])
def test_timesteps_and_sigmas_match_diffusers(cfg):
    sched = DPMSolverMultistepScheduler(**cfg)
    for S in list(range(1, 60)) + [100, 250, 998]:
        sched.set_timesteps(S)
        if len(sched.timesteps) != S:  # diffusers' float arange: S + 1 trailing timesteps (below)
            continue
        plan = plan_for(sched, S)
        assert list(plan.timesteps) == sched.timesteps.tolist(), S
        assert torch.equal(torch.tensor(plan.sigmas), sched.sigmas), S


def test_dpm_linspace_is_not_ddims():
    """DPM-Solver spaces S + 1 points and drops t = 0: S = 5 visits 999, 799, ..., 200, never 0."""
    plan = make_dpm_plan(fastddim.Schedule.linear(linspace="float32"), 5)
    assert plan.timesteps == (999, 799, 599, 400, 200)
    assert make_plan(fastddim.Schedule.linear(), 5, spacing="linspace").timesteps[-1] == 0


@pytest.mark.parametrize("S", [61, 103])
def test_trailing_has_exactly_s_steps(S):
    sched = DPMSolverMultistepScheduler(timestep_spacing="trailing")
    sched.set_timesteps(S)
    assert len(sched.timesteps) == S + 1 and sched.timesteps[-1] == -1  # diffusers' known float-arange bug
    plan = plan_for(sched, S)
    assert len(plan.timesteps) == S and plan.timesteps == tuple(sched.timesteps.tolist()[:-1])


def test_karras_calls_the_model_at_rounded_timesteps_but_updates_with_karras_sigmas():
    sched = fastddim.Schedule.linear(linspace="float32")
    plan = make_dpm_plan(sched, 10, use_karras_sigmas=True)
    ac = sched.alphas_cumprod.double()
    schedule_sigmas = [math.sqrt((1 - ac[t]) / ac[t]) for t in plan.timesteps]
    assert plan.sigmas[0] == pytest.approx(schedule_sigmas[0], rel=1e-6)  # sigma_max is the schedule's
    assert any(abs(s - r) / r > 1e-3 for s, r in zip(plan.sigmas[1:-1], schedule_sigmas[1:]))
    assert plan.sigmas[-1] == 0.0 and plan.timesteps[-1] == 0


def test_karras_repeated_first_timestep_refused():
    """Zero-SNR Karras at S = 50 repeats the first timestep: diffusers then starts at the second
    occurrence and runs off the end of its sigmas."""
    sched = DPMSolverMultistepScheduler(use_karras_sigmas=True, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    sched.set_timesteps(50)
    assert sched.timesteps[0] == sched.timesteps[1]
    with pytest.raises(IndexError):
        diffusers_loop(sched, 50, torch.zeros(1, 1, 2, 2), lambda x, t: torch.zeros_like(x))
    with pytest.raises(ValueError, match="repeats the first timestep"):
        plan_for(sched, 50)
    assert plan_for(sched, 20).steps == 20


def test_table_columns_and_first_order_zeros():
    plan = make_dpm_plan(fastddim.Schedule.linear(), 6)
    assert plan.solver == "dpm++2m" and plan.columns == DPM_COLUMNS
    assert plan.table.shape == (6, len(DPM_COLUMNS)) and plan.table.dtype == torch.float32
    assert plan.noise == (False,) * 6 and plan.orders == (1, 2, 2, 2, 2, 1)
    c_d1, r_inv = DPM_COLUMNS.index("c_d1"), DPM_COLUMNS.index("r_inv")
    for j in (0, 5):
        assert plan.scalars[j][c_d1] == 0.0 and plan.scalars[j][r_inv] == 0.0
    for j in range(1, 5):
        assert plan.scalars[j][c_d1] == 0.5 * plan.scalars[j][DPM_COLUMNS.index("c_d0")] and plan.scalars[j][r_inv] > 0
    # the last step goes to sigma 0: c_x = 0 and c_d0 = -1, i.e. it returns its x0
    assert plan.scalars[5][DPM_COLUMNS.index("c_x")] == 0.0 and plan.scalars[5][DPM_COLUMNS.index("c_d0")] == -1.0
    assert plan.describe()["solver"] == "dpm++2m" and plan.describe()["orders"] == list(plan.orders)
    assert make_plan(fastddim.Schedule.linear(), 6).describe()["solver"] == "ddim"


def test_clip_sample_clamps_x0_before_the_update():
    """clip_sample is not a DPMSolverMultistepScheduler option: fastddim's, applied where
    thresholding is (to x0, before it joins the history)."""
    plan = make_dpm_plan(fastddim.Schedule.linear(), 4, clip_sample=True, clip_sample_range=0.5)
    x = fastddim.noise.normal(1, 0, 2, 0, SHAPE) * 3
    out = fastddim.noise.normal(2, 0, 2, 0, SHAPE)
    x_next, x0 = dpm_solver_step(x, out, None, plan, 0)
    alpha_s, sigma_s, c_x, c_d0 = plan.scalars[0][:4]
    raw = (x - sigma_s * out) / alpha_s
    assert raw.abs().max() > 0.5 and torch.equal(x0, raw.clamp(-0.5, 0.5))
    assert torch.equal(x_next, c_x * x - c_d0 * raw.clamp(-0.5, 0.5))


def test_step_needs_prev_x0_and_its_own_plan():
    dpm = make_dpm_plan(fastddim.Schedule.linear(), 4)
    x = torch.zeros(1, *SHAPE)
    with pytest.raises(ValueError, match="prev_x0"):
        dpm_solver_step(x, x, None, dpm, 1)
    with pytest.raises(ValueError, match="solver 'dpm\\+\\+2m', not 'ddim'"):
        ddim_step(x, x, dpm, 0)
    with pytest.raises(ValueError, match="solver 'ddim', not 'dpm\\+\\+2m'"):
        dpm_solver_step(x, x, None, make_plan(fastddim.Schedule.linear(), 4), 0)


@pytest.mark.parametrize("kw,match", [
    (dict(spacing="uniform"), "spacing"),
    (dict(spacing="quad"), "spacing"),
    (dict(use_karras_sigmas=True, spacing="linspace"), "spacing"),
    (dict(use_karras_sigmas=True, steps_offset=1), "steps_offset"),
    (dict(solver_order=3), "solver_order"),
    (dict(final_sigmas_type="sigma_max"), "final_sigmas_type"),
    (dict(prediction_type="flow_prediction"), "prediction_type"),
    (dict(spacing="trailing", steps_offset=1), "steps_offset"),
])
def test_plan_refuses_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        make_dpm_plan(fastddim.Schedule.linear(), 10, **kw)


def test_plan_refuses_steps_out_of_range():
    with pytest.raises(ValueError, match="steps"):
        make_dpm_plan(fastddim.Schedule.linear(), 1000)  # linspace spaces S + 1 points in [0, T - 1]
    assert make_dpm_plan(fastddim.Schedule.linear(), 1000, spacing="trailing").steps == 1000


def test_explicit_timesteps_as_diffusers():
    sched = DPMSolverMultistepScheduler()
    ts = [900, 700, 420, 100, 5]
    sched.set_timesteps(timesteps=ts)
    plan = make_dpm_plan(fastddim.Schedule.linear(linspace="float32"), 5, spacing=ts)
    assert torch.equal(torch.tensor(plan.sigmas), sched.sigmas)
    x_T = fastddim.noise.normal(9, 0, 2, 0, SHAPE)
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(cheap_model(x, t), t, x).prev_sample
    assert torch.equal(dpm_solver_sample(cheap_model, x_T.clone(), plan), x)


def test_mapping_defaults():
    kw = dpm_kwargs(DPMSolverMultistepScheduler().config)
    assert kw["solver"] == "dpm++2m" and kw["spacing"] == "linspace" and kw["steps_offset"] == 0
    assert kw["schedule"] == fastddim.Schedule.linear(linspace="float32")
    assert kw["solver_order"] == 2 and kw["lower_order_final"] and kw["final_sigmas_type"] == "zero"
    karras = dpm_kwargs(DPMSolverMultistepScheduler(use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1).config)
    assert karras["spacing"] is None and karras["steps_offset"] == 0 and karras["use_karras_sigmas"]
    trailing = dpm_kwargs(dict(timestep_spacing="trailing", steps_offset=1))  # diffusers adds it to leading only
    assert trailing["steps_offset"] == 0
    assert "clip_sample" not in dpm_kwargs(dict(clip_sample=True))  # not an option of this scheduler: ignored, as diffusers does


@pytest.mark.parametrize("cfg,name", [
    (dict(algorithm_type="dpmsolver"), "algorithm_type"),
    (dict(algorithm_type="sde-dpmsolver++"), "algorithm_type"),
    (dict(solver_order=3), "solver_order"),
    (dict(solver_type="heun"), "solver_type"),
    (dict(euler_at_final=True, final_sigmas_type="sigma_min"), "euler_at_final"),
    (dict(use_lu_lambdas=True), "use_lu_lambdas"),
    (dict(use_exponential_sigmas=True), "use_exponential_sigmas"),
    (dict(use_beta_sigmas=True), "use_beta_sigmas"),
    (dict(use_flow_sigmas=True), "use_flow_sigmas"),
    (dict(variance_type="learned_range"), "variance_type"),
    (dict(lambda_min_clipped=-5.1), "lambda_min_clipped"),
    (dict(prediction_type="flow_prediction"), "prediction_type"),
    (dict(use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2"), "use_karras_sigmas"),
])
def test_mapping_refuses_what_is_not_reproduced(cfg, name):
    with pytest.raises(ValueError, match=name):
        dpm_kwargs(cfg)


def test_mapping_accepts_settings_without_effect():
    """solver_type matters only at order 2; euler_at_final only before a non-zero final sigma."""
    assert dpm_kwargs(dict(solver_order=1, solver_type="heun"))["solver_order"] == 1
    assert dpm_kwargs(dict(euler_at_final=True))["final_sigmas_type"] == "zero"
