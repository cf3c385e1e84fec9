"""The fused step (cpp, triton, cuda) against fastddim.reference.ddim_step, the oracle.

On a CPU-only machine: the C++ kernel on every case, the Triton kernel under TRITON_INTERPRET=1
(set by conftest.py) on small shapes. GPU cases carry the `gpu` marker.
"""
from __future__ import annotations

import pytest
import torch

from fastddim import _ops, reference
from fastddim.dispatch import available_backends, make_step, resolve_backend
from fastddim.noise import normal_like_batch
from fastddim.plan import make_dpm_plan, make_plan
from fastddim.schedule import Schedule

SCHEDULE = Schedule.linear()
S = 10
PREDS = ("epsilon", "sample", "v_prediction")
ETAS = (0.0, 0.5, 1.0, "sigma_hat")
CLIPS = {  # name -> plan options
    "none": {},
    "clip": {"clip_sample": True, "clip_sample_range": 1.0},
    "clip2.5+clipped_eps": {"clip_sample": True, "clip_sample_range": 2.5, "use_clipped_model_output": True},
}
# Model-output dtype -> (atol, rtol) on x_prev and x0 against the reference in fp32. Both sides read
# the same rounded model output, so the low-precision inputs need no looser bound; what remains
# is the noise's libm ulps times sigma, one rounding of the sum, and (GPU) FMA contraction on
# values up to ~100 (x0 = x / sqrt(a_t) at the noisiest step).
TOLS = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-5, 1e-5, id="bf16"),
    pytest.param(torch.float16, 1e-5, 1e-5, id="fp16"),
]
# Awkward sizes: a sample size that is not a multiple of 4 (the Philox group) nor of any block,
# batch 1, a 3x37x37 latent, tiny samples.
CPP_SHAPES = [(1, 3, 37, 37), (3, 5, 7), (8, 2), (2, 4, 16, 16)]
TRITON_SHAPES = [(2, 3, 11, 13)]  # the interpreter is slow: small


def backend_param(name: str, device: str = "cpu"):
    reason = available_backends(torch.device(device))[name]
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)), id=name)


CPU_FUSED = [backend_param("cpp"), backend_param("triton")]
# Skipped with the reason where a backend is missing; without a GPU the `gpu` marker skips them all.
GPU_FUSED = [backend_param("triton", "cuda"), backend_param("cuda", "cuda")]


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    """torch.isclose-style check that names the worst element before failing."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    got, want = got.double(), want.double()
    err = (got - want).abs()
    bound = atol + rtol * want.abs()
    bad = ~((err <= bound) | (got == want) | (torch.isnan(got) & torch.isnan(want)))
    if bad.any():
        i = int(torch.argmax(torch.where(bad, err - bound, torch.full_like(err, -1.0))))
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), got.shape))
        pytest.fail(
            f"{what}: {int(bad.sum())} of {got.numel()} elements off; worst at {idx}: got {got[idx].item()!r}, "
            f"want {want[idx].item()!r}, |diff| {err[idx].item():.3g} > {bound[idx].item():.3g} (atol {atol}, rtol {rtol})"
        )


def inputs(shape, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    out = torch.randn(shape, generator=g)
    return x.to(device), out.to(device=device, dtype=dtype)


def reference_step(plan, x, out, j, seed, first_index):
    z = normal_like_batch(x, seed, first_index, j + 1) if plan.noise[j] else None
    return reference.ddim_step(x, out, plan, j, z)


def check_against_reference(backend, plan, shape, dtype, atol, rtol, steps, device="cpu", seed=1234, first_index=7, data=None):
    x, out = data if data is not None else inputs(shape, dtype, device=device)
    step = make_step(backend, plan, seed, device=torch.device(device))  # its table, rng and q on x's device
    for j in steps:
        prev, x0 = step(x, out, j, first_index)
        want_prev, want_x0 = reference_step(plan, x, out, j, seed, first_index)
        what = f"{backend} {plan.prediction_type} eta={plan.eta} {dtype} {shape} j={j}"
        assert_close(x0, want_x0, atol, rtol, what + " x0")
        assert_close(prev, want_prev, atol, rtol, what + " x_prev")


@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("eta", ETAS, ids=str)
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("backend", CPU_FUSED)
def test_step_matches_reference(backend, pred, eta, clip, dtype, atol, rtol):
    plan = make_plan(SCHEDULE, S, eta=eta, prediction_type=pred, **CLIPS[clip])
    if backend == "triton":
        shapes, steps = TRITON_SHAPES, (0, S - 1)
    else:
        shapes, steps = CPP_SHAPES, (0, S // 2, S - 1)
    for shape in shapes:
        check_against_reference(backend, plan, shape, dtype, atol, rtol, steps)


@pytest.mark.parametrize("clipped_eps", [False, True])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("backend", CPU_FUSED)
def test_thresholding_matches_reference(backend, pred, eta, clipped_eps):
    plan = make_plan(
        SCHEDULE, S, eta=eta, prediction_type=pred, thresholding=True, dynamic_thresholding_ratio=0.9,
        sample_max_value=3.0, use_clipped_model_output=clipped_eps,
    )
    shape = TRITON_SHAPES[0] if backend == "triton" else (3, 3, 37, 37)
    check_against_reference(backend, plan, shape, torch.float32, 1e-5, 1e-5, (0, S // 2, S - 1))


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_samples_spanning_several_programs(backend):
    """Samples larger than one Triton program (1024 groups under the interpreter), with a tail."""
    plan = make_plan(SCHEDULE, S, eta=1.0, prediction_type="v_prediction", thresholding=True, sample_max_value=2.0)
    for shape in ((1, 3, 37, 37), (2, 4, 33, 31)):
        check_against_reference(backend, plan, shape, torch.bfloat16, 1e-5, 1e-5, (0, S - 1))


def test_cpp_is_bit_exact_without_noise():
    """Built with -ffp-contract=off, the C++ step rounds op for op as the reference does."""
    if available_backends(torch.device("cpu"))["cpp"] is not None:
        pytest.skip("fastddim._C not built")
    for pred in PREDS:
        plan = make_plan(SCHEDULE, S, eta=0.0, prediction_type=pred, clip_sample=True, use_clipped_model_output=True)
        x, out = inputs((2, 3, 37, 37), torch.bfloat16)
        step = make_step("cpp", plan, 0)
        for j in range(S):
            prev, x0 = step(x, out, j, 0)
            want_prev, want_x0 = reference_step(plan, x, out, j, 0, 0)
            assert torch.equal(prev, want_prev) and torch.equal(x0, want_x0), (pred, j)


@pytest.mark.parametrize("simd", [True, False], ids=["simd", "scalar"])
def test_cpp_step_on_both_noise_paths(simd):
    """The C++ step with noise on its default SIMD path (AVX-512 or AVX2) and on its portable scalar
    one, each against the reference; the two differ only by sigma * ulps."""
    if available_backends(torch.device("cpu"))["cpp"] is not None:
        pytest.skip("fastddim._C not built")
    C = _ops.extension()
    saved = C.cpu_simd()  # the path's name: restored exactly (the default may be avx512)
    try:
        try:
            C.cpu_simd(simd)
        except RuntimeError as e:
            pytest.skip(str(e))
        for pred, eta in (("epsilon", 1.0), ("v_prediction", 0.5)):
            plan = make_plan(SCHEDULE, S, eta=eta, prediction_type=pred, clip_sample=True)
            for shape in ((3, 3, 37, 37), (5, 5, 7)):
                check_against_reference("cpp", plan, shape, torch.float32, 1e-5, 1e-5, (0, S // 2, S - 1))
        plan = make_plan(SCHEDULE, S, eta=1.0)
        x, out = inputs((4, 3, 33, 35), torch.bfloat16)
        prev = make_step("cpp", plan, 9)(x, out, 2, 0)[0]
        C.cpu_simd(not simd)
        other = make_step("cpp", plan, 9)(x, out, 2, 0)[0]
    finally:
        C.cpu_simd(saved)
    # Noise within 8 ulp of each other (each within 4 of the spec), scaled by sigma, plus one rounding.
    sigma = plan.table[2, 5].item()
    assert_close(prev, other, 8 * 2**-23 * 4 * sigma, 2**-23, "avx2 vs scalar step")
    assert not torch.equal(prev, other)  # the paths really differ: both ran


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, under the interpreter
@pytest.mark.parametrize("backend", CPU_FUSED)
def test_nan_and_inf_pass_through_as_in_the_reference(backend):
    for pred in PREDS:
        plan = make_plan(SCHEDULE, S, eta=1.0, prediction_type=pred, clip_sample=True)
        x, out = inputs((2, 3, 4, 5), torch.float32)
        out[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        x[1, 2, 3, 4] = float("nan")
        check_against_reference(backend, plan, tuple(x.shape), torch.float32, 1e-5, 1e-5, (0, S - 1), data=(x, out))


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", [backend_param("torch")] + CPU_FUSED)
def test_low_precision_copy_and_no_x0(backend, low):
    plan = make_plan(SCHEDULE, S, eta=1.0)
    x, out = inputs(TRITON_SHAPES[0], torch.float32)
    prev, x0, x_low = make_step(backend, plan, 3, need_x0=False, low_dtype=low)(x, out, 2, 0)
    assert x0 is None
    assert x_low.dtype == low and torch.equal(x_low, prev.to(low))  # round to nearest even, as torch


def test_table_moved_once_and_no_per_step_copies(monkeypatch):
    """make_step moves the plan's table to the device once; the step itself does no host->device copy."""
    if available_backends(torch.device("cpu"))["cpp"] is not None:
        pytest.skip("fastddim._C not built")
    plan = make_plan(SCHEDULE, S, eta=1.0)
    step = make_step("cpp", plan, 0, device=torch.device("cpu"))
    x, out = inputs((2, 8), torch.float32)
    step(x, out, 0, 0)
    calls = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(a) or real_to(self, *a, **k))
    for j in range(1, S):
        step(x, out, j, 0)
    assert calls == []


# ------------------------------------------------- DPM-Solver++(2M): the same op, solver 1 and 2
DPM_S = 6  # orders (1, 2, 2, 2, 2, 1): the first step, second-order ones, the last (to sigma 0)
DPM_CLIPS = {
    "none": {},
    "clip": {"clip_sample": True, "clip_sample_range": 1.5},
    "threshold": {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 3.0},
}


def dpm_plan(pred="epsilon", clip="none", schedule=SCHEDULE, S=DPM_S, **kw):
    return make_dpm_plan(schedule, S, prediction_type=pred, **DPM_CLIPS[clip], **kw)


def check_dpm_against_reference(backend, plan, shape, dtype, atol, rtol, steps, device="cpu"):
    """The fused step j against reference.dpm_solver_step on the same x, out and x0_prev (an
    independent tensor, so a second-order step that ignored it, or read x0 for it, fails)."""
    x, out = inputs(shape, dtype, device=device)
    x0_prev = inputs(shape, torch.float32, seed=1, device=device)[0]
    step = make_step(backend, plan, 0, device=torch.device(device))
    for j in steps:
        second = plan.orders[j] == 2
        prev, x0 = step(x, out, j, None, x0_prev)
        want_prev, want_x0 = reference.dpm_solver_step(x, out, x0_prev if second else None, plan, j)
        what = f"dpm {backend} {plan.prediction_type} {dtype} {shape} j={j} order={plan.orders[j]}"
        assert_close(x0, want_x0, atol, rtol, what + " x0")
        assert_close(prev, want_prev, atol, rtol, what + " x_next")


@pytest.mark.parametrize("dtype", [t.values[0] for t in TOLS], ids=[t.id for t in TOLS])
@pytest.mark.parametrize("clip", list(DPM_CLIPS))
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("backend", CPU_FUSED)
def test_dpm_step_matches_reference(backend, pred, clip, dtype):
    """Every prediction type, clip mode and output dtype, first- and second-order steps. The C++
    kernel (-ffp-contract=off) and the Triton one under the interpreter (numpy float32) round op for
    op as the reference: bit for bit."""
    plan = dpm_plan(pred, clip)
    assert plan.orders == (1, 2, 2, 2, 2, 1)
    shapes = TRITON_SHAPES if backend == "triton" else CPP_SHAPES
    for shape in shapes:
        check_dpm_against_reference(backend, plan, shape, dtype, 0.0, 0.0, (0, 1, DPM_S // 2, DPM_S - 1))


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_dpm_step_other_plans(backend):
    """Zero-terminal-SNR v-prediction with trailing timesteps (alpha_s = 2**-12 at the first step),
    Karras sigmas, and a run whose last step is second order (sigma_min, S >= 15)."""
    plans = [
        dpm_plan("v_prediction", schedule=Schedule.linear(rescale_zero_terminal_snr=True), spacing="trailing"),
        dpm_plan("epsilon", "threshold", use_karras_sigmas=True, S=8),
        dpm_plan("sample", "clip", S=15, final_sigmas_type="sigma_min"),
    ]
    assert plans[2].orders[-1] == 2
    shape = TRITON_SHAPES[0] if backend == "triton" else (3, 3, 37, 37)
    for plan in plans:
        check_dpm_against_reference(backend, plan, shape, torch.bfloat16, 0.0, 0.0, (0, 1, plan.steps - 1))


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_dpm_samples_spanning_several_programs(backend):
    check_dpm_against_reference(backend, dpm_plan("v_prediction", "threshold"), (2, 4, 33, 31), torch.float16,
                                0.0, 0.0, (1, DPM_S - 1))


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", CPU_FUSED)
def test_dpm_low_precision_copy(backend, low):
    x, out = inputs(TRITON_SHAPES[0], torch.float32)
    prev, x0, x_low = make_step(backend, dpm_plan(), 0, low_dtype=low)(x, out, 2, None, 0.5 * x)
    assert x_low.dtype == low and torch.equal(x_low, prev.to(low))


# ------------------------------------------------------------- the op's boundary: any strides
def strided_cases(device="cpu"):
    """name -> (x, out): the layouts users hand the op, all of logical shape (2, 3, 6, 5)."""
    x, out = inputs((2, 3, 6, 5), torch.bfloat16, seed=3, device=device)
    big_x, big_out = inputs((2, 3, 12, 8), torch.float32, seed=4, device=device)
    cl = torch.channels_last
    return {
        "channels_last out": (x, out.to(memory_format=cl)),  # a channels_last model next to a contiguous x
        "channels_last both": (x.to(memory_format=cl), out.to(memory_format=cl)),
        "sliced": (big_x[:, :, ::2, 1:-2], big_out[:, :, ::2, 1:-2]),
        "transposed": (x.transpose(2, 3).contiguous().transpose(2, 3), out.transpose(2, 3).contiguous().transpose(2, 3)),
        "broadcast out": (x, out[:1].expand_as(out)),
    }


# (pred, clip, solver): epsilon with noise; v_prediction thresholded by a strided s, eps from the
# clipped x0, with noise; the same thresholded v as a second-order DPM step reading a strided x0_prev.
OP_MODES = [(0, _ops.CLIP_NONE, _ops.SOLVER_DDIM), (2, _ops.CLIP_THRESHOLD, _ops.SOLVER_DDIM),
            (2, _ops.CLIP_THRESHOLD, _ops.SOLVER_DPM2)]


def check_op_on_strided_inputs(backend: str, device: str = "cpu") -> None:
    """Both entry points (_ops.ddim_step and the registered op) on every strided case give, bit for
    bit, what they give on contiguous copies, and contiguous outputs."""
    tables = {_ops.SOLVER_DDIM: make_plan(SCHEDULE, S, eta=1.0).table.to(device), _ops.SOLVER_DPM2: dpm_plan().table.to(device)}
    rng = _ops.rng_state(99, 5, device)
    s = torch.tensor([1.5, 9.0, 2.5, 9.0], device=device)[::2]  # not contiguous
    ops = {"_ops.ddim_step": _ops.ddim_step, "torch.ops.fastddim.ddim_step": torch.ops.fastddim.ddim_step}
    for case, (x, out) in strided_cases(device).items():
        assert not (x.is_contiguous() and out.is_contiguous()), case
        x0_prev = (0.5 * x).transpose(2, 3).contiguous().transpose(2, 3)  # never contiguous
        for pred, clip, solver in OP_MODES:
            ddim = solver == _ops.SOLVER_DDIM
            args = (tables[solver], 3, rng, s if clip == _ops.CLIP_THRESHOLD else None, backend, pred, clip, 1.0,
                    ddim and clip == _ops.CLIP_THRESHOLD, False, ddim, True, torch.bfloat16)
            dpm_args, dpm_contiguous = ((), ()) if ddim else ((x0_prev, solver), (x0_prev.contiguous(), solver))
            want = _ops.ddim_step(x.contiguous(), out.contiguous(), *args, *dpm_contiguous)
            for name, op in ops.items():
                got = op(x, out, *args, *dpm_args)
                what = f"{backend} {name} {case} pred={pred} clip={clip} solver={solver}"
                for g, w, part in zip(got, want, ("x_prev", "x0", "x_low")):
                    assert g.is_contiguous() and g.shape == w.shape, f"{what} {part}: {g.shape} {g.stride()}"
                    if not torch.equal(g, w):
                        assert_close(g, w, 0.0, 0.0, f"{what} {part}")


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_op_handles_any_strides(backend):
    check_op_on_strided_inputs(backend)


def test_triton_op_rejects_bad_arguments():
    """The Triton kernel takes raw pointers: the op checks what csrc/bindings.cpp checks for the C++
    one, before anything runs (a wrong shape would read out of bounds, a wrong dtype misread)."""
    if available_backends(torch.device("cpu"))["triton"] is not None:
        pytest.skip(available_backends(torch.device("cpu"))["triton"])
    plan = make_plan(SCHEDULE, S, eta=1.0)
    x, out = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    good = dict(x=x, out=out, table=plan.table, j=0, rng=_ops.rng_state(1, 0, "cpu"), s=None, backend="triton", pred=0,
                clip=0, clip_range=1.0, clipped_eps=False, sigma_hat=False, noise=True, need_x0=True, low_dtype=None)
    _ops.ddim_step(**good)
    bad = [
        (dict(x=x.double()), "x must be a float32"),
        (dict(x=x[0, 0, 0]), "x must be a float32"),
        (dict(out=out[:1]), "out must be float32, bfloat16 or float16 of x's shape"),
        (dict(out=out.int()), "out must be float32, bfloat16 or float16"),
        (dict(out=out.to("meta")), "out is on meta"),
        (dict(table=plan.table[:, :5]), "table must be a float32 .S, 6."),
        (dict(table=plan.table.double()), "table must be a float32"),
        (dict(j=S), "j=10 out of range"),
        (dict(j=-1), "j=-1 out of range"),
        (dict(rng=torch.tensor([1])), "rng must be an int64 .2,."),
        (dict(rng=torch.tensor([1.0, 0.0])), "rng must be an int64"),
        (dict(pred=3), "pred must be"),
        (dict(clip=3), "clip must be"),
        (dict(clip=2), "clip=2 .threshold. needs s"),
        (dict(clip=2, s=torch.ones(3)), "clip=2 .threshold. needs s"),
        (dict(backend="torch"), "backend must be one of"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            _ops.ddim_step(**{**good, **change})


def test_triton_op_rejects_bad_dpm_arguments():
    """The solver code's own arguments, checked as csrc/bindings.cpp's check_solver does."""
    if available_backends(torch.device("cpu"))["triton"] is not None:
        pytest.skip(available_backends(torch.device("cpu"))["triton"])
    x, out = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    good = dict(x=x, out=out, table=dpm_plan().table, j=2, rng=_ops.rng_state(1, 0, "cpu"), s=None, backend="triton",
                pred=0, clip=0, clip_range=1.0, clipped_eps=False, sigma_hat=False, noise=False, need_x0=True,
                low_dtype=None, x0_prev=torch.randn(2, 3, 4), solver=_ops.SOLVER_DPM2)
    _ops.ddim_step(**good)
    bad = [
        (dict(solver=3), "solver must be 0 .ddim., 1 .dpm first order. or 2"),
        (dict(solver=-1), "solver must be"),
        (dict(x0_prev=None), "solver=2 .dpm second order. needs x0_prev"),
        (dict(x0_prev=x[:1]), "needs x0_prev, a float32 tensor of x's shape"),
        (dict(x0_prev=x.bfloat16()), "needs x0_prev, a float32"),
        (dict(x0_prev=x.to("meta")), "needs x0_prev"),
        (dict(need_x0=False), "writes x0: need_x0 must be True"),
        (dict(need_x0=False, solver=_ops.SOLVER_DPM1), "writes x0"),
        (dict(noise=True), "DDIM options"),
        (dict(clipped_eps=True, solver=_ops.SOLVER_DPM1), "DDIM options"),
        (dict(sigma_hat=True), "DDIM options"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            _ops.ddim_step(**{**good, **change})


# ---------------------------------------------------------------------- the C++ boundary
@pytest.fixture
def C():
    if _ops.extension_error() is not None:
        pytest.skip("fastddim._C not built")
    return _ops.extension()


def test_cpp_rejects_bad_arguments(C):
    plan = make_plan(SCHEDULE, S, eta=1.0)
    x, out = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    rng = torch.tensor([1, 0])
    prev = torch.empty_like(x)
    C.ddim_step(x, out, plan.table, 0, rng, prev)  # the good call
    bad = [
        (dict(x=x.double()), "x must be contiguous float32"),
        (dict(x=x.transpose(1, 2)), "x must be contiguous float32"),
        (dict(out=out[:1]), "out has shape"),
        (dict(out=out.int()), "out must be float32, bfloat16 or float16"),
        (dict(out=out.transpose(1, 2).contiguous().transpose(1, 2)), "out must be contiguous"),
        (dict(j=S), "out of range"),
        (dict(j=-1), "out of range"),
        (dict(table=plan.table[:, :5].contiguous()), "table must be"),
        (dict(table=plan.table.double()), "table must be"),
        (dict(rng=torch.tensor([1])), "rng must be"),
        (dict(rng=torch.tensor([1.0, 0.0])), "rng must be"),
        (dict(x_prev=torch.empty(2, 3, 5)), "x_prev has shape"),
        (dict(x_prev=torch.empty_like(x, dtype=torch.bfloat16)), "x_prev must be float32"),
        (dict(x_low=torch.empty_like(x)), "x_low must be bfloat16 or float16"),
        (dict(x_prev=x), "must not alias"),
        (dict(clip=2), "needs s"),
        (dict(clip=2, s=torch.ones(3)), "s must be"),
        (dict(pred=3), "pred must be"),
    ]
    for change, message in bad:
        kw = dict(x=x, out=out, table=plan.table, j=0, rng=rng, x_prev=prev)
        kw.update(change)
        with pytest.raises(RuntimeError, match=message):
            C.ddim_step(**kw)
    assert "table" in C.ddim_step.__doc__


def test_cpp_rejects_bad_dpm_arguments(C):
    x, out = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    rng = torch.tensor([1, 0])
    prev, x0, x0_prev = torch.empty_like(x), torch.empty_like(x), torch.randn(2, 3, 4)
    good = dict(x=x, out=out, table=dpm_plan().table, j=2, rng=rng, x_prev=prev, x0=x0, x0_prev=x0_prev, solver=2)
    C.ddim_step(**good)
    bad = [
        (dict(solver=3), "solver must be 0 .ddim., 1 .dpm first order. or 2"),
        (dict(x0_prev=None), "needs x0_prev"),
        (dict(x0_prev=x0_prev[:1]), "x0_prev has shape"),
        (dict(x0_prev=x0_prev.transpose(1, 2).contiguous().transpose(1, 2)), "x0_prev must be contiguous"),
        (dict(x0_prev=x0_prev.bfloat16()), "x0_prev must be float32"),
        (dict(x0=x0_prev), "must not alias x0_prev"),
        (dict(x0=None), "writes x0: pass x0"),
        (dict(x0=None, solver=1), "writes x0: pass x0"),
        (dict(noise=True), "DDIM options"),
        (dict(clipped_eps=True, solver=1), "DDIM options"),
        (dict(sigma_hat=True), "DDIM options"),
    ]
    for change, message in bad:
        with pytest.raises(RuntimeError, match=message):
            C.ddim_step(**{**good, **change})
    assert "x0_prev" in C.ddim_step.__doc__


def test_missing_extension_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_ops, "extension_error", lambda: "the C++ extension fastddim._C is not built (test); " + _ops.BUILD_HINT)
    for backend in ("cpp", "cuda"):
        with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
            resolve_backend(backend, torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_auto_picks_cpp_on_cpu_when_built(C):
    assert resolve_backend("auto", torch.device("cpu")) == "cpp"


def test_cuda_backend_on_cpu_is_an_error():
    with pytest.raises(RuntimeError, match="backend='cuda' is not available on cpu"):
        resolve_backend("cuda", torch.device("cpu"))


# -------------------------------------------------------------- torch.library / torch.compile
def test_custom_op_compiles_fullgraph(C):
    plan = make_plan(SCHEDULE, S, eta=1.0, thresholding=True)
    step = make_step("cpp", plan, 5)
    x, out = inputs((2, 3, 8, 8), torch.float32)

    def loop(x, out):
        for j in range(3):
            x, _ = step(x, 0.9 * out + 0.1 * x, j, 4)
        return x

    compiled = torch.compile(loop, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, out), loop(x, out))


def test_dpm_custom_op_compiles_fullgraph(C):
    """A DPM-Solver++ run threads x0 from step to step through the op, traced without a break."""
    step = make_step("cpp", dpm_plan(clip="threshold"), 0)
    x, out = inputs((2, 3, 8, 8), torch.float32)

    def loop(x, out):
        x0 = None
        for j in range(DPM_S):
            x, x0 = step(x, 0.9 * out + 0.1 * x, j, None, x0)
        return x, x0

    got, want = torch.compile(loop, fullgraph=True, backend="eager")(x, out), loop(x, out)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_custom_op_opcheck(C):
    plan = make_plan(SCHEDULE, S, eta=1.0)
    x, out = inputs((2, 3, 5), torch.bfloat16)
    args = (x, out, plan.table, 1, _ops.rng_state(2**64 - 1, 3, "cpu"), None, "cpp", 0, 1, 1.0, False, False, True, True, torch.bfloat16)
    torch.library.opcheck(torch.ops.fastddim.ddim_step.default, args, test_utils=("test_schema", "test_faketensor"))
    # channels_last inputs: the fake's outputs have the real op's (contiguous) strides.
    x, out = (t.to(memory_format=torch.channels_last) for t in inputs((2, 3, 4, 5), torch.bfloat16))
    torch.library.opcheck(torch.ops.fastddim.ddim_step.default, (x, out, *args[2:]), test_utils=("test_faketensor",))
    # the DPM solver codes: x0_prev and solver at the end of the schema
    x, out = inputs((2, 3, 5), torch.bfloat16)
    dpm = (x, out, dpm_plan().table, 2, args[4], None, "cpp", 0, 0, 1.0, False, False, False, True, torch.bfloat16)
    x0_prev = torch.randn(2, 3, 5)
    torch.library.opcheck(torch.ops.fastddim.ddim_step.default, (*dpm, x0_prev, _ops.SOLVER_DPM2),
                          test_utils=("test_schema", "test_faketensor"))


# -------------------------------------------------------------------------------- GPU
# The GPU cases cover every kernel variant that decides something, not the whole product: each
# Triton variant (constexprs x block size x numel % 16) is a compilation of 0.3-2.5 s, and the
# full product of the CPU cases (306 variants) would spend ~5 minutes of a 15-minute GPU session.
# fp32: every prediction type x eta class (no noise, noise, sigma_hat) x clip mode on the two
# Triton size classes (a multiple of 16 or not); bf16/fp16: the load path on all three size
# classes (multiple of 16, not, tiny).
GPU_SHAPES = {"not16": (1, 3, 37, 37), "16": (64, 3, 32, 32), "tiny": (8, 2)}


@pytest.mark.gpu
@pytest.mark.parametrize("clip", [*CLIPS, "threshold"])
@pytest.mark.parametrize("eta", [0.0, 1.0, "sigma_hat"], ids=str)
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_step_matches_reference(backend, pred, eta, clip):
    opts = dict(thresholding=True, sample_max_value=3.0) if clip == "threshold" else CLIPS[clip]
    plan = make_plan(SCHEDULE, S, eta=eta, prediction_type=pred, **opts)
    for shape in (GPU_SHAPES["not16"], GPU_SHAPES["16"]):
        check_against_reference(backend, plan, shape, torch.float32, 4e-5, 4e-5, range(S), device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES.values()), ids=list(GPU_SHAPES))
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_step_dtypes_and_sizes(backend, dtype, atol, rtol, shape):
    plan = make_plan(SCHEDULE, S, eta=1.0, prediction_type="v_prediction", clip_sample=True)
    check_against_reference(backend, plan, shape, dtype, 4 * atol, 4 * rtol, range(S), device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_op_handles_any_strides(backend):
    check_op_on_strided_inputs(backend, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_graph_replays_with_new_seed(backend):
    """The seed and first index are read from a device tensor: a captured step replays with new ones."""
    plan = make_plan(SCHEDULE, S, eta=1.0)
    table = plan.table.cuda()
    x, out = inputs((4, 3, 16, 16), torch.float32, device="cuda")
    rng = _ops.rng_state(1, 0, "cuda")

    def run():
        return torch.ops.fastddim.ddim_step(x, out, table, 2, rng, None, backend, 0, 0, 1.0, False, False, True, False, None)[0]

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        run()  # compile / warm up off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for seed, first in ((1, 0), (2**64 - 3, 9), (77, 123)):
        rng.copy_(_ops.rng_state(seed, first, "cuda"))
        graph.replay()
        want, _ = reference_step(plan, x, out, 2, seed, first)
        assert_close(captured.clone(), want, 4e-5, 4e-5, f"graph replay seed={seed} first={first}")


# The DPM-Solver++ variants on the GPU, few of them (each Triton variant is a compilation): fp32,
# every prediction type, both solver codes (every step of the plan) on the two size classes; v with
# thresholding; bf16 on the size that is not a multiple of 16. Tolerances as the DDIM GPU cases
# (FMA contraction on values up to ~100).
@pytest.mark.gpu
@pytest.mark.parametrize("pred,clip", [(p, "none") for p in PREDS] + [("v_prediction", "threshold")])
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_dpm_step_matches_reference(backend, pred, clip):
    plan = dpm_plan(pred, clip)
    for shape in (GPU_SHAPES["not16"], GPU_SHAPES["16"]):
        check_dpm_against_reference(backend, plan, shape, torch.float32, 4e-5, 4e-5, range(DPM_S), device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_dpm_step_bf16(backend):
    check_dpm_against_reference(backend, dpm_plan("epsilon", "clip"), GPU_SHAPES["not16"], torch.bfloat16,
                                4e-5, 4e-5, range(DPM_S), device="cuda")
