"""The guided Triton step (GUIDE_CFG with and without the rescale, GUIDE_CFGPP) and the rescale's
reduction (``fastddim.kernels.ddim_step.rescale_ratio``) against the contract's oracles, under the
interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET=1 without a GPU), on small shapes:
a sample size that is not a multiple of 4 nor 16, and one that is a multiple of 16. The step's
parity over every prediction type, clip mode, dtype, solver and output lives in
tests/test_guided_step.py (cpp and triton, on the helpers defined here); this file holds the cases
it leaves out and the reduction's.

Oracles (issue 18, fastddim/_ops.py): CFG ``reference.ddim_step(x, guidance.guide(u, c, w, phi), ...)``
(``reference.dpm_solver_step`` for a DPM plan); CFG++ ``reference.ddim_step(x, g, ..., out_eps=u)``
with ``g, u = guidance.cfgpp_outputs(u, c, lam)``. Thresholding's s is the caller's, from the guided
output (``dispatch.threshold_scale``). The rescale's ratio is the torch formula's here, so that the
step is tested alone; the reduction has its own tests below.
"""
from __future__ import annotations

import pytest
import torch

from fastddim import _ops, guidance, reference
from fastddim.dispatch import available_backends, threshold_scale
from fastddim.noise import normal_like_batch
from fastddim.plan import make_plan

from test_ddim_step import PREDS, SCHEDULE, S, assert_close  # one home for these



@pytest.fixture(autouse=True)
def _triton_on_the_cpu(request):
    """The CPU cases need the interpreter (a GPU machine runs the `gpu` ones, at the end, instead)."""
    reason = available_backends(torch.device("cpu"))["triton"]
    if reason is not None and "gpu" not in request.keywords:
        pytest.skip(reason)

SHAPES = [(3, 2, 5, 7), (2, 3, 4, 4)]  # 70 elements per sample (not a multiple of 4), 48 (of 16)
W, PHI, LAM = 7.5, 0.7, 0.6  # a large w: the guided x0 leaves [-1, 1], so the clip modes bite
# clip name -> (plan options, the kernel's clip code, clip range): every clip mode of the step.
CLIPS = {
    "none": ({}, _ops.CLIP_NONE, 1.0),
    "range": ({"clip_sample": True, "clip_sample_range": 1.5}, _ops.CLIP_RANGE, 1.5),
    "threshold": ({"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 3.0},
                  _ops.CLIP_THRESHOLD, 1.0),
}
# Model-output dtype -> (atol, rtol), as test_ddim_step's TOLS: the interpreter rounds each op in
# float32 as torch does; what remains is the noise's libm ulps times sigma.
TOLS = [pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"), pytest.param(torch.bfloat16, 1e-5, 1e-5, id="bf16")]


def outputs(shape, dtype, seed=0, device="cpu"):
    """x (fp32), u, c (dtype) on ``device``: the conditional output with a mean of its own, as a real model's."""
    g = torch.Generator().manual_seed(seed)
    x, u, c = (torch.randn(shape, generator=g) for _ in range(3))
    return x.to(device), u.to(device, dtype), (c + 0.5).to(device, dtype)


def fused(plan, x, u, c, j, guide, w, *, phi=0.0, ratio=None, seed=11, first=5, need_x0=True, low_dtype=None,
          x0_prev=None, solver=_ops.SOLVER_DDIM, s_from=None, clip="none"):
    """The Triton op on plan's step j with guidance; s (thresholding) from the guided output ``s_from``.
    clip: a name in CLIPS (matching the plan's options), or the kernel's (code, range)."""
    code, clip_range = CLIPS[clip][1:] if isinstance(clip, str) else clip
    s = threshold_scale(x, s_from, plan.table.to(x.device), j, plan) if code == _ops.CLIP_THRESHOLD else None
    ddim = solver == _ops.SOLVER_DDIM
    return _ops.ddim_step(  # the table and rng on x's device, as dispatch.Step keeps them
        x, c, plan.table.to(x.device), j, _ops.rng_state(seed, first, x.device), s, "triton", _ops.PRED_CODES[plan.prediction_type],
        code, clip_range, ddim and plan.use_clipped_model_output, ddim and plan.sigma_hat, ddim and plan.noise[j],
        need_x0, low_dtype, x0_prev, solver, out_uncond=u, guide=guide, w=w, phi=phi, ratio=ratio,
    )


def noise(plan, x, j, seed=11, first=5):
    return normal_like_batch(x, seed, first, j + 1) if plan.noise[j] else None


def check(got, want, atol, rtol, what):
    assert_close(got[1], want[1], atol, rtol, what + " x0")
    assert_close(got[0], want[0], atol, rtol, what + " x_prev")


# The guided step's parity on every prediction type, clip mode, dtype, solver and output is
# tests/test_guided_step.py's, parametrized over cpp and triton (it imports the helpers above). Here:
# what it does not cover, on the Triton kernel.
@pytest.mark.parametrize("eta", [0.0, 1.0], ids=str)
@pytest.mark.parametrize("pred", PREDS)
def test_cfg_with_eps_from_the_clipped_x0_matches_reference(pred, eta):
    """use_clipped_model_output: the direction's eps re-derived from the clipped guided x0."""
    plan = make_plan(SCHEDULE, S, eta=eta, prediction_type=pred, **CLIPS["range"][0], use_clipped_model_output=True)
    for shape in SHAPES:
        x, u, c = outputs(shape, torch.bfloat16)
        g = guidance.guide(u.float(), c.float(), W, PHI)
        ratio = guidance.rescale_ratio_torch(u, c, W)
        for j in (0, S - 1):  # the first step and the last (to a_prev = 1), as test_ddim_step's Triton cases
            got = fused(plan, x, u, c, j, _ops.GUIDE_CFG, W, phi=PHI, ratio=ratio, clip="range")
            check(got, reference.ddim_step(x, g, plan, j, noise(plan, x, j)), 1e-5, 1e-5,
                  f"cfg clipped_eps {pred} eta={eta} {shape} j={j}")


def test_cfg_sigma_hat_matches_reference():
    """sigma_hat: the larger-variance DDPM update, x0 clamped to [-1, 1] (a range clip of 1)."""
    plan = make_plan(SCHEDULE, S, eta="sigma_hat", prediction_type="epsilon")
    x, u, c = outputs(SHAPES[0], torch.float32)
    g = guidance.guide(u, c, W, PHI)
    for j in (0, S - 1):
        got = fused(plan, x, u, c, j, _ops.GUIDE_CFG, W, phi=PHI, ratio=guidance.rescale_ratio_torch(u, c, W),
                    clip=(_ops.CLIP_RANGE, 1.0))
        check(got, reference.ddim_step(x, g, plan, j, noise(plan, x, j)), 1e-5, 1e-5, f"cfg sigma_hat j={j}")


@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("pred", PREDS)
def test_cfgpp_with_thresholding_matches_reference(pred, dtype, atol, rtol):
    """CFG++ thresholded by the s of its guided x0 (the caller's), with noise; the direction is u's."""
    plan = make_plan(SCHEDULE, S, eta=1.0, prediction_type=pred, **CLIPS["threshold"][0])
    for shape in SHAPES:
        x, u, c = outputs(shape, dtype)
        g, u_ref = guidance.cfgpp_outputs(u.float(), c.float(), LAM)
        for j in (0, S - 1):
            got = fused(plan, x, u, c, j, _ops.GUIDE_CFGPP, LAM, s_from=g, clip="threshold")
            want = reference.ddim_step(x, g, plan, j, noise(plan, x, j), out_eps=u_ref)
            check(got, want, atol, rtol, f"cfg++ threshold {pred} {dtype} {shape} j={j}")


# ------------------------------------------------------------------------------- rescale_ratio
def rescale_inputs(shape, dtype, mean=0.0, seed=0, device="cpu"):
    """u, c (B, ...) with means of their own (c's differs per sample), on ``device``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=g) + mean
    c = 0.8 * torch.randn(shape, generator=g) + mean + torch.arange(shape[0]).view(-1, *[1] * (len(shape) - 1))
    return u.to(device, dtype), c.to(device, dtype)


def triton_ratio(u, c, w):
    from fastddim.kernels import ddim_step as triton_step

    return triton_step.rescale_ratio(u, c, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 2, 5, 7), (2, 3, 40, 37), (1, 16)], ids=["small", "two-chunks", "one-row"])
def test_rescale_ratio_matches_torch(shape, dtype):
    """Samples with a nonzero mean (a different one each), numel not a multiple of the block (4096
    under the interpreter; 4440 spans two chunks)."""
    u, c = rescale_inputs(shape, dtype, mean=3.0)
    for w in (W, 1.0, 0.0, 3):
        got, want = triton_ratio(u, c, w), guidance.rescale_ratio_torch(u, c, w)
        assert got.shape == (shape[0],) and got.dtype == torch.float32
        assert_close(got, want, 0.0, 1e-5, f"rescale_ratio {shape} {dtype} w={w}")


def test_rescale_ratio_past_64_chunks():
    """More than 64 partial sums per sample (65 chunks of the interpreter's 4096): the finishing
    kernel's second pass over them (ITERS = 2) counts every one."""
    u, c = rescale_inputs((2, 65 * 4096 - 7), torch.float32, mean=2.0)
    assert_close(triton_ratio(u, c, W), guidance.rescale_ratio_torch(u, c, W), 0.0, 1e-5, "rescale_ratio, 65 chunks")
    c[1, -5:] += 50.0  # the last chunk moves the ratio: a finish that stopped at 64 chunks would miss it
    assert_close(triton_ratio(u, c, W), guidance.rescale_ratio_torch(u, c, W), 0.0, 1e-5, "rescale_ratio, last chunk")


def test_rescale_ratio_is_well_conditioned():
    """A mean 1000 times the spread: float32 sums of squares would lose every digit; the kernel's
    shifted float64 sums stay within 1e-6 of the float64 truth (of the same float32 g)."""
    u, c = rescale_inputs((2, 3, 11, 13), torch.float32, mean=1000.0)
    g = guidance.combine(u, c, W)  # float32, as the kernel forms it
    std = lambda t: t.double().flatten(1).std(dim=1)  # noqa: E731
    assert_close(triton_ratio(u, c, W).double(), (std(c) / std(g)), 0.0, 1e-6, "rescale_ratio, mean 1000")


def test_rescale_ratio_degenerate_samples_as_torch():
    """One element per sample: the unbiased std is 0/0 = nan, as torch's."""
    u, c = rescale_inputs((3, 1), torch.float32)
    assert torch.isnan(triton_ratio(u, c, W)).all() and torch.isnan(guidance.rescale_ratio_torch(u, c, W)).all()


def test_rescale_op_runs_the_triton_kernel(monkeypatch):
    """torch.ops.fastddim.rescale_ratio(..., "triton") on CPU tensors (the interpreter) is the kernel's
    result, not the torch formula's; strided inputs are made contiguous first."""
    from fastddim.kernels import ddim_step as triton_step

    calls = []
    real = triton_step.rescale_ratio
    monkeypatch.setattr(triton_step, "rescale_ratio", lambda u, c, w: calls.append(w) or real(u, c, w))
    u, c = rescale_inputs((2, 3, 6, 5), torch.bfloat16, mean=1.0)
    u_cl, c_cl = (t.to(memory_format=torch.channels_last) for t in (u, c))
    got = torch.ops.fastddim.rescale_ratio(u_cl, c_cl, W, "triton")
    assert calls == [W]
    assert torch.equal(got, real(u, c, W))
    assert_close(got, guidance.rescale_ratio_torch(u, c, W), 0.0, 1e-5, "op rescale_ratio")


def test_guided_step_with_the_kernels_ratio():
    """The two passes together, as the engine runs them: the op's ratio, then the rescaled step."""
    plan = make_plan(SCHEDULE, S, eta=1.0, prediction_type="v_prediction", thresholding=True, sample_max_value=3.0)
    x, u, c = outputs(SHAPES[1], torch.bfloat16)
    ratio = torch.ops.fastddim.rescale_ratio(u, c, W, "triton")
    g = guidance.guide(u.float(), c.float(), W, PHI)
    got = fused(plan, x, u, c, 3, _ops.GUIDE_CFG, W, phi=PHI, ratio=ratio, s_from=g, clip="threshold")
    check(got, reference.ddim_step(x, g, plan, 3, noise(plan, x, 3)), 1e-5, 1e-5, "cfg+rescale, kernel ratio")


def test_guided_op_fake_and_schema():
    """The guided call's keyword arguments through the registered op and its fake (torch.compile)."""
    plan = make_plan(SCHEDULE, S, eta=1.0)
    x, u, c = outputs(SHAPES[0], torch.bfloat16)
    args = (x, c, plan.table, 1, _ops.rng_state(3, 0, "cpu"), None, "triton", 0, 0, 1.0, False, False, True, True,
            torch.bfloat16, None, _ops.SOLVER_DDIM, u, _ops.GUIDE_CFG, W, PHI, guidance.rescale_ratio_torch(u, c, W))
    torch.library.opcheck(torch.ops.fastddim.ddim_step.default, args, test_utils=("test_schema", "test_faketensor"))


# -------------------------------------------------------------------------------- GPU
# Complements test_guided_step.py's GPU cases (clip range, the torch ratio): thresholding, and the
# ratio from the op's Triton reduction on the device, fp32 every prediction type, on a size that is
# not a multiple of 16 and one that is (each a compilation, GPU.md). Tolerances as test_ddim_step's
# GPU cases (FMA contraction on values up to ~100).
GPU_SHAPES = [(1, 3, 37, 37), (64, 3, 32, 32)]
GPU_TRITON = pytest.mark.skipif(available_backends(torch.device("cuda"))["triton"] is not None,
                                reason=str(available_backends(torch.device("cuda"))["triton"]))


@pytest.mark.gpu
@GPU_TRITON
@pytest.mark.parametrize("method", ["cfg+rescale", "cfg++"])
@pytest.mark.parametrize("pred", PREDS)
def test_gpu_guided_step_matches_reference(pred, method):
    plan = make_plan(SCHEDULE, S, eta=1.0, prediction_type=pred, **CLIPS["threshold"][0])
    for shape in GPU_SHAPES:
        x, u, c = outputs(shape, torch.float32, device="cuda")
        if method == "cfg++":
            g, u_ref = guidance.cfgpp_outputs(u, c, LAM)
            kw = dict(guide=_ops.GUIDE_CFGPP, w=LAM)
        else:
            g, u_ref = guidance.guide(u, c, W, PHI), None
            kw = dict(guide=_ops.GUIDE_CFG, w=W, phi=PHI, ratio=torch.ops.fastddim.rescale_ratio(u, c, W, "triton"))
        for j in range(S):
            got = fused(plan, x, u, c, j, s_from=g, clip="threshold", **kw)
            want = reference.ddim_step(x, g, plan, j, noise(plan, x, j), out_eps=u_ref)
            check(got, want, 4e-5, 4e-5, f"gpu {method} {pred} {shape} j={j}")
