"""The guided step (GUIDE_CFG with and without the rescale, GUIDE_CFGPP) on every CPU fused backend
through torch.ops.fastddim.ddim_step, the rescale's reduction (torch.ops.fastddim.rescale_ratio,
fastddim._C.rescale_ratio), and the guide arguments' refusals, from the op and from the extension.

Oracles (issue 18, fastddim/_ops.py): CFG ``reference.ddim_step(x, guidance.guide(u, c, w, phi), ...)``
(``reference.dpm_solver_step`` on a DPM plan); CFG++ ``reference.ddim_step(x, g, ..., out_eps=u)`` with
``g, u = guidance.cfgpp_outputs(u, c, lam)``. The step is tested with the torch formula's ratio
(``rescale_ratio_torch``, what ``guide`` computes), so that it is tested alone; the reduction has its
own tests. The C++ kernel is built with -ffp-contract=off: without noise it is bit for bit the oracle.
GPU cases (the CUDA kernels, built on the device) carry the ``gpu`` marker.
"""
from __future__ import annotations

import pytest
import torch

from fastddim import _ops, guidance, reference
from fastddim.dispatch import available_backends, threshold_scale
from fastddim.plan import make_plan

from test_ddim_step import DPM_CLIPS, DPM_S, PREDS, SCHEDULE, S, assert_close, dpm_plan  # one home for these
from test_guided_triton import (  # the Triton engineer's: the same oracles, one home
    CLIPS, LAM, PHI, TOLS, W, check, noise, outputs, rescale_inputs,
)

# --- guided backends: the CPU backends whose step kernels take the guide arguments (both do since
# 62728c2 and this file's commit). Edit only this block to add or drop one. ---
GUIDED_BACKENDS = ("cpp", "triton")
# --- end of the guided backends block ---
SHAPES = [(3, 2, 5, 7), (2, 3, 4, 4)]  # 70 elements per sample (not a multiple of 4), 48 (of 16)
WS = (0.0, 1.5, 7.5)


def backend_param(name: str, device: str = "cpu"):
    reason = available_backends(torch.device(device))[name]
    if reason is None and device == "cpu" and name not in GUIDED_BACKENDS:
        reason = f"the {name} step kernel has no guidance yet (GUIDED_BACKENDS)"
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)), id=name)


BACKENDS = [backend_param("cpp"), backend_param("triton")]
CPP = available_backends(torch.device("cpu"))["cpp"]
needs_cpp = pytest.mark.skipif(CPP is not None, reason=str(CPP))


def fused(backend, plan, x, u, c, j, guide, w, *, phi=0.0, ratio=None, seed=11, first=5, need_x0=True,
          low_dtype=None, x0_prev=None, solver=_ops.SOLVER_DDIM, s_from=None, clip="none"):
    """torch.ops.fastddim.ddim_step on plan's step j with guidance, on x's device; s (thresholding)
    from the guided output ``s_from``. clip: a name in CLIPS (matching the plan's options), or the
    kernel's (code, range)."""
    code, clip_range = CLIPS[clip][1:] if isinstance(clip, str) else clip
    table = plan.table.to(x.device)
    s = threshold_scale(x, s_from, table, j, plan) if code == _ops.CLIP_THRESHOLD else None
    ddim = solver == _ops.SOLVER_DDIM
    return torch.ops.fastddim.ddim_step(
        x, c, table, j, _ops.rng_state(seed, first, x.device), s, backend, _ops.PRED_CODES[plan.prediction_type],
        code, clip_range, ddim and plan.use_clipped_model_output, ddim and plan.sigma_hat, ddim and plan.noise[j],
        need_x0, low_dtype, x0_prev, solver, out_uncond=u, guide=guide, w=w, phi=phi, ratio=ratio,
    )


def check_cfg(backend, plan, shape, dtype, atol, rtol, steps, *, w, rescale, clip, device="cpu"):
    """The CFG step (optionally rescaled) against reference.ddim_step on guide(u, c, w, phi)."""
    phi = PHI if rescale else 0.0
    x, u, c = (t.to(device) for t in outputs(shape, dtype))
    g = guidance.guide(u.float(), c.float(), w, phi)
    ratio = guidance.rescale_ratio_torch(u, c, w) if rescale else None
    for j in steps:
        got = fused(backend, plan, x, u, c, j, _ops.GUIDE_CFG, w, phi=phi, ratio=ratio, s_from=g, clip=clip)
        want = reference.ddim_step(x, g, plan, j, noise(plan, x, j))
        check(got, want, atol, rtol, f"{backend} cfg {plan.prediction_type} eta={plan.eta} {clip} w={w} phi={phi} "
                                     f"{dtype} {shape} j={j}")


# ------------------------------------------------------------------------------- GUIDE_CFG, DDIM
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("rescale", [False, True], ids=["cfg", "cfg+rescale"])
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cfg_step_matches_reference(backend, pred, clip, rescale, dtype, atol, rtol):
    """Every w of WS (0: u alone; 7.5 takes x0 out of [-1, 1], so the clip modes bite), with and
    without noise, both size classes."""
    for eta in (0.0, 1.0):
        plan = make_plan(SCHEDULE, S, eta=eta, prediction_type=pred, **CLIPS[clip][0])
        for shape in SHAPES:
            for w in WS:
                check_cfg(backend, plan, shape, dtype, atol, rtol, (0, S - 1), w=w, rescale=rescale, clip=clip)


@needs_cpp
@pytest.mark.parametrize("pred", PREDS)
def test_cpp_cfg_is_bit_exact_without_noise(pred):
    """-ffp-contract=off: the combine, the rescale and the step round op for op as the oracle."""
    plan = make_plan(SCHEDULE, S, eta=0.0, prediction_type=pred, clip_sample=True, clip_sample_range=1.5)
    for rescale in (False, True):
        for w in WS:
            check_cfg("cpp", plan, SHAPES[0], torch.bfloat16, 0.0, 0.0, range(S), w=w, rescale=rescale, clip="range")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cfg_at_w_1_is_the_conditional_output(backend):
    """guide(u, c, 1, phi) is c itself (diffusers skips guidance at 1): the guided step at w = 1
    is the unguided step on c, bit for bit (u + 1 * (c - u) is not c to the bit), ratio ignored."""
    plan = make_plan(SCHEDULE, S, eta=1.0, prediction_type="v_prediction")
    x, u, c = outputs(SHAPES[0], torch.float32)
    ratio = guidance.rescale_ratio_torch(u, c, 1.0) * 1.5  # a ratio that would move the result
    got = fused(backend, plan, x, u, c, 2, _ops.GUIDE_CFG, 1.0, phi=PHI, ratio=ratio)
    plain = torch.ops.fastddim.ddim_step(x, c, plan.table, 2, _ops.rng_state(11, 5, "cpu"), None, backend, 2, 0, 1.0,
                                         False, False, True, True, None)
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    assert not torch.equal(guidance.combine(u, c, 1.0), c)  # the shortcut matters on these inputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_cfg_reads_both_outputs_w_phi_and_the_ratio(backend):
    """Each input moves the result: a kernel that ignored u, w, the ratio or phi would fail here."""
    plan = make_plan(SCHEDULE, S, eta=0.0)
    x, u, c = outputs(SHAPES[0], torch.float32)
    ratio = guidance.rescale_ratio_torch(u, c, W)
    base = fused(backend, plan, x, u, c, 2, _ops.GUIDE_CFG, W, phi=PHI, ratio=ratio)[0]
    for change in (dict(u=u + 0.25), dict(w=W + 1.0), dict(ratio=ratio * 1.5), dict(phi=0.2)):
        kw = {**dict(u=u, w=W, ratio=ratio, phi=PHI), **change}
        other = fused(backend, plan, x, kw["u"], c, 2, _ops.GUIDE_CFG, kw["w"], phi=kw["phi"], ratio=kw["ratio"])[0]
        assert not torch.equal(other, base), change


# ---------------------------------------------------------------------------- GUIDE_CFGPP, DDIM
def check_cfgpp(backend, plan, shape, dtype, atol, rtol, steps, *, lam, clip, device="cpu"):
    x, u, c = (t.to(device) for t in outputs(shape, dtype))
    g, u_ref = guidance.cfgpp_outputs(u.float(), c.float(), lam)
    for j in steps:
        got = fused(backend, plan, x, u, c, j, _ops.GUIDE_CFGPP, lam, s_from=g, clip=clip)
        want = reference.ddim_step(x, g, plan, j, noise(plan, x, j), out_eps=u_ref)
        check(got, want, atol, rtol, f"{backend} cfg++ {plan.prediction_type} eta={plan.eta} {clip} lam={lam} "
                                     f"{dtype} {shape} j={j}")
        if j < S - 1:  # the direction is u's: the plain guided step (eps from g) differs
            plain = fused(backend, plan, x, u, c, j, _ops.GUIDE_CFG, lam, s_from=g, clip=clip)[0]
            assert not torch.equal(got[0], plain), (plan.prediction_type, clip, j)


@pytest.mark.parametrize("clip", ["none", "range"])
@pytest.mark.parametrize("eta", [0.0, 1.0], ids=str)
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cfgpp_step_matches_reference(backend, pred, eta, clip):
    plan = make_plan(SCHEDULE, S, eta=eta, prediction_type=pred, **CLIPS[clip][0])
    for dtype, lam in ((torch.float32, LAM), (torch.bfloat16, 1.0)):  # lam = 1 is still CFG++ (eps from u)
        for shape in SHAPES:
            check_cfgpp(backend, plan, shape, dtype, 1e-5, 1e-5, (0, S // 2), lam=lam, clip=clip)


# ------------------------------------------------------------------- GUIDE_CFG, DPM-Solver++(2M)
def check_cfg_dpm(backend, plan, shape, dtype, atol, rtol, steps, *, rescale, clip, device="cpu"):
    phi = PHI if rescale else 0.0
    x, u, c = (t.to(device) for t in outputs(shape, dtype))
    x0_prev = outputs(shape, torch.float32, seed=1)[0].to(device)
    g = guidance.guide(u.float(), c.float(), W, phi)
    ratio = guidance.rescale_ratio_torch(u, c, W) if rescale else None
    for j in steps:
        second = plan.orders[j] == 2
        got = fused(backend, plan, x, u, c, j, _ops.GUIDE_CFG, W, phi=phi, ratio=ratio, s_from=g,
                    x0_prev=x0_prev if second else None, solver=_ops.SOLVER_DPM2 if second else _ops.SOLVER_DPM1,
                    clip=clip.replace("clip", "range"))
        want = reference.dpm_solver_step(x, g, x0_prev if second else None, plan, j)
        check(got, want, atol, rtol, f"{backend} dpm cfg {plan.prediction_type} {clip} phi={phi} {dtype} {shape} j={j}")


@pytest.mark.parametrize("rescale", [False, True], ids=["cfg", "cfg+rescale"])
@pytest.mark.parametrize("clip", list(DPM_CLIPS))
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cfg_dpm_step_matches_reference(backend, pred, clip, rescale):
    """First- (j = 0, the last) and second-order (j = 1) steps, bit for bit as the unguided DPM test."""
    plan = dpm_plan(pred, clip)
    assert plan.orders[0] == 1 and plan.orders[1] == 2
    for dtype in (torch.float32, torch.bfloat16):
        check_cfg_dpm(backend, plan, SHAPES[0], dtype, 0.0, 0.0, (0, 1, DPM_S - 1), rescale=rescale, clip=clip)


# ------------------------------------------------------------------------- the optional outputs
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("guide", [_ops.GUIDE_CFG, _ops.GUIDE_CFGPP])
@pytest.mark.parametrize("backend", BACKENDS)
def test_guided_low_precision_copy_and_no_x0(backend, guide, low):
    plan = make_plan(SCHEDULE, S, eta=1.0, prediction_type="v_prediction")
    x, u, c = outputs(SHAPES[1], torch.bfloat16)
    w, phi = (W, PHI) if guide == _ops.GUIDE_CFG else (LAM, 0.0)
    ratio = guidance.rescale_ratio_torch(u, c, W) if guide == _ops.GUIDE_CFG else None
    prev, x0, x_low = fused(backend, plan, x, u, c, 2, guide, w, phi=phi, ratio=ratio, need_x0=False, low_dtype=low)
    assert x0.numel() == 0
    assert x_low.dtype == low and torch.equal(x_low, prev.to(low))  # round to nearest even, as torch
    assert torch.equal(prev, fused(backend, plan, x, u, c, 2, guide, w, phi=phi, ratio=ratio)[0])


# ---------------------------------------------------------------------- the C++ SIMD noise paths
@needs_cpp
@pytest.mark.parametrize("level", ["scalar", "avx2", "avx512"])
def test_cpp_guided_step_on_every_simd_level(level):
    """The guided C++ step with noise on each noise path the processor has (_C.cpu_simd)."""
    C = _ops.extension()
    saved = C.cpu_simd()
    try:
        try:
            C.cpu_simd(level)
        except RuntimeError as e:
            pytest.skip(str(e))
        for pred in PREDS:
            plan = make_plan(SCHEDULE, S, eta=1.0, prediction_type=pred, clip_sample=True, clip_sample_range=1.5)
            check_cfg("cpp", plan, (3, 4, 8, 8), torch.float32, 1e-5, 1e-5, (0, S // 2), w=W, rescale=True, clip="range")
            check_cfgpp("cpp", plan, (3, 4, 8, 8), torch.float32, 1e-5, 1e-5, (0, S // 2), lam=LAM, clip="range")
    finally:
        C.cpu_simd(saved)


# ------------------------------------------------------------------------------- rescale_ratio
@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 2, 5, 7), (2, 3, 40, 37), (1, 16)], ids=["small", "large", "one-row"])
def test_cpp_rescale_ratio_matches_torch(shape, dtype):
    """Samples with a nonzero mean each (up to +100); numel with and without a tail of the 8 lanes."""
    for mean in (0.0, 100.0):
        u, c = rescale_inputs(shape, dtype, mean=mean)
        for w in (W, 1.0, 0.0, 3):
            got = _ops.extension().rescale_ratio(u, c, w)
            assert got.shape == (shape[0],) and got.dtype == torch.float32
            assert_close(got, guidance.rescale_ratio_torch(u, c, w), 0.0, 1e-5, f"rescale_ratio {shape} {dtype} "
                                                                                f"mean={mean} w={w}")
            assert torch.equal(torch.ops.fastddim.rescale_ratio(u, c, w, "cpp"), got)  # the op runs the kernel


@needs_cpp
def test_cpp_rescale_ratio_is_well_conditioned_and_per_sample():
    """A mean 1000 times the spread (float32 sums of squares would lose every digit): within 1e-6 of
    the float64 truth of the same float32 g; each sample its own (a batch of one gives the same)."""
    u, c = rescale_inputs((3, 3, 11, 13), torch.float32, mean=1000.0)
    g = guidance.combine(u, c, W)  # float32, as the kernel forms it
    std = lambda t: t.double().flatten(1).std(dim=1)  # noqa: E731
    got = _ops.extension().rescale_ratio(u, c, W)
    assert_close(got.double(), std(c) / std(g), 0.0, 1e-6, "rescale_ratio, mean 1000")
    assert torch.equal(got[1:2], _ops.extension().rescale_ratio(u[1:2], c[1:2], W))
    assert torch.isnan(_ops.extension().rescale_ratio(u[:, :1, :1, :1].contiguous(), c[:, :1, :1, :1].contiguous(), W)).all()  # 0/0, as torch


@needs_cpp
def test_cpp_rescale_ratio_refuses_bad_inputs():
    C = _ops.extension()
    u, c = rescale_inputs((2, 3, 4), torch.float32)
    with pytest.raises(ValueError, match="out_uncond must be a contiguous tensor of out's shape"):
        C.rescale_ratio(u.to(torch.bfloat16), c, W)
    with pytest.raises(ValueError, match="out_uncond must be a contiguous tensor of out's shape"):
        C.rescale_ratio(u[:1], c, W)
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        C.rescale_ratio(u.transpose(1, 2), c.transpose(1, 2), W)
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        C.rescale_ratio(u.double(), c.double(), W)


@needs_cpp
def test_cpp_rescaled_step_with_the_kernels_ratio():
    """The two passes together, as the engine runs them: the op's ratio, then the rescaled step."""
    plan = make_plan(SCHEDULE, S, eta=1.0, prediction_type="v_prediction", thresholding=True, sample_max_value=3.0)
    x, u, c = outputs(SHAPES[1], torch.bfloat16)
    ratio = torch.ops.fastddim.rescale_ratio(u, c, W, "cpp")
    g = guidance.guide(u.float(), c.float(), W, PHI)
    got = fused("cpp", plan, x, u, c, 3, _ops.GUIDE_CFG, W, phi=PHI, ratio=ratio, s_from=g, clip="threshold")
    check(got, reference.ddim_step(x, g, plan, 3, noise(plan, x, 3)), 1e-5, 1e-5, "cfg+rescale, kernel ratio")


# ------------------------------------------------------------------------------------ refusals
def refusal_cases(x, u, c):
    """(what, step kwargs, message): each a guide argument the step refuses before any work."""
    ratio = torch.ones(x.shape[0])
    return [
        ("no out_uncond", dict(guide=_ops.GUIDE_CFG, out_uncond=None), "needs out_uncond"),
        ("out_uncond of another dtype", dict(guide=_ops.GUIDE_CFG, out_uncond=u.to(torch.bfloat16)), "out_uncond"),
        ("out_uncond of another shape", dict(guide=_ops.GUIDE_CFG, out_uncond=u[:1]), "out_uncond"),
        ("ratio with cfg++", dict(guide=_ops.GUIDE_CFGPP, ratio=ratio), r"ratio \(the rescale\) needs guide=1"),
        ("ratio of another shape", dict(guide=_ops.GUIDE_CFG, ratio=ratio[:1]), r"ratio \(the rescale\)"),
        ("cfg++ with the dpm solver", dict(guide=_ops.GUIDE_CFGPP, solver=_ops.SOLVER_DPM1), "cfg\\+\\+"),
        ("cfg++ with clipped_eps", dict(guide=_ops.GUIDE_CFGPP, clipped_eps=True), "cfg\\+\\+"),
        ("unknown guide", dict(guide=3), "guide must be 0"),
        ("out_uncond unguided", dict(guide=_ops.GUIDE_NONE), "guided step only"),
    ]


def guided_call(x, u, c, backend, **kw):
    a = dict(out_uncond=u, guide=_ops.GUIDE_CFG, w=W, phi=PHI, ratio=None, solver=_ops.SOLVER_DDIM, clipped_eps=False)
    a.update(kw)
    table = make_plan(SCHEDULE, S, eta=0.0).table
    return torch.ops.fastddim.ddim_step(
        x, c, table, 1, _ops.rng_state(0, 0, "cpu"), None, backend, 0, 0, 1.0, a["clipped_eps"], False, False,
        True, None, None, a["solver"], out_uncond=a["out_uncond"], guide=a["guide"], w=a["w"], phi=a["phi"],
        ratio=a["ratio"],
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_refuses_bad_guide_arguments(backend):
    x, u, c = outputs(SHAPES[0], torch.float32)
    for what, kw, msg in refusal_cases(x, u, c):
        with pytest.raises(ValueError, match=msg):
            guided_call(x, u, c, backend, **kw)
            pytest.fail(f"{backend}: {what} was not refused")


@needs_cpp
def test_extension_refuses_bad_guide_arguments():
    """fastddim._C checks its own arguments (the op passes cpp/cuda calls straight to it)."""
    C = _ops.extension()
    x, u, c = outputs(SHAPES[0], torch.float32)
    table, rng = make_plan(SCHEDULE, S, eta=0.0).table, _ops.rng_state(0, 0, "cpu")
    for what, kw, msg in refusal_cases(x, u, c):
        a = {**dict(out_uncond=u, guide=_ops.GUIDE_CFG, w=W, phi=PHI), **kw}
        prev, x0 = torch.empty_like(x), torch.empty_like(x)
        with pytest.raises(ValueError, match=msg):
            C.ddim_step(x, c, table, 1, rng, prev, x0, None, **a)
            pytest.fail(f"{what} was not refused")
    with pytest.raises(ValueError, match="x_prev must not alias out_uncond"):
        C.ddim_step(x, c, table, 1, rng, u, None, None, out_uncond=u, guide=_ops.GUIDE_CFG, w=W)


# -------------------------------------------------------------------------------------- GPU
# Few cases (each Triton variant is a compilation): fp32 every prediction type, CFG with and without
# the rescale, CFG++, DPM with the rescale, on the size classes of test_ddim_step's GPU cases, with
# its tolerances (FMA contraction in Triton, values up to ~100). Everything is built on the device.
GPU_BACKENDS = [backend_param("cuda", "cuda"), backend_param("triton", "cuda")]
GPU_SHAPES = [(1, 3, 37, 37), (4, 3, 32, 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_guided_steps_match_reference(backend, pred):
    ddim = make_plan(SCHEDULE, S, eta=1.0, prediction_type=pred, clip_sample=True, clip_sample_range=1.5)
    for shape in GPU_SHAPES:
        for rescale in (False, True):
            check_cfg(backend, ddim, shape, torch.float32, 4e-5, 4e-5, range(S), w=W, rescale=rescale, clip="range",
                      device="cuda")
        check_cfgpp(backend, ddim, shape, torch.float32, 4e-5, 4e-5, range(S), lam=LAM, clip="range", device="cuda")
        check_cfg_dpm(backend, dpm_plan(pred, "none"), shape, torch.float32, 4e-5, 4e-5, range(DPM_S), rescale=True,
                      clip="none", device="cuda")
    check_cfg(backend, ddim, GPU_SHAPES[0], torch.bfloat16, 4e-5, 4e-5, (0, S - 1), w=W, rescale=True, clip="range",
              device="cuda")


def device_ratio(backend, u, c, w):
    """The backend's own reduction kernel (for cuda fastddim._C's: _ops.rescale_ratio's "cuda" is the
    torch formula today, which would test nothing here)."""
    if backend == "cuda":
        return _ops.extension().rescale_ratio(u, c, w)
    from fastddim.kernels import ddim_step as triton_step

    return triton_step.rescale_ratio(u, c, w)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_rescale_ratio_matches_torch(backend):
    """The device reduction (cuda: one block per sample) against the torch formula on the device,
    means 0 and 100, a sample larger than one block's stride and one smaller."""
    for shape in ((3, 4, 64, 64), (2, 3, 5, 7)):
        for dtype in (torch.float32, torch.bfloat16):
            for mean in (0.0, 100.0):
                u, c = (t.cuda() for t in rescale_inputs(shape, dtype, mean=mean))
                got = device_ratio(backend, u, c, W)
                assert got.device == u.device and got.shape == (shape[0],)
                assert_close(got.cpu(), guidance.rescale_ratio_torch(u, c, W).cpu(), 0.0, 1e-5,
                             f"{backend} rescale_ratio {shape} {dtype} mean={mean}")
