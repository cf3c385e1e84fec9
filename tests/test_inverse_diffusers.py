"""``invert(convention="target")`` against diffusers' ``DDIMInverseScheduler`` loop (CPU, float32).

A small random ``UNet2DModel`` (conftest's ``tiny_unet``) is inverted both ways from the same x0,
configured as users configure diffusers: ``invert(..., convention="target", **fastddim.from_diffusers(inv))``.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMInverseScheduler, UNet2DModel  # noqa: E402

import fastddim  # noqa: E402

SHAPE = (3, 8, 8)
N = 2


@pytest.fixture(scope="module")
def x0():
    g = torch.Generator().manual_seed(1)
    return torch.rand((N, *SHAPE), generator=g) * 2 - 1  # images in the data range [-1, 1]


def diffusers_inverse_loop(sched: DDIMInverseScheduler, S: int, x: torch.Tensor, model) -> torch.Tensor:
    """The loop diffusers' inversion pipelines run: eps at each (increasing) target timestep."""
    sched.set_timesteps(S)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t).sample, t, x).prev_sample
    return x


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: the error relative to the latent's scale."""
    return ((got - want).abs().max() / want.abs().max()).item()


def check(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    assert torch.isfinite(want).all()
    err = rel_err(got, want)
    i = (got - want).abs().argmax()
    assert err <= rtol, f"relative error {err:.3g} > {rtol}: worst element {i}: {got.flatten()[i]} vs {want.flatten()[i]}"


CASES = [pytest.param(p, sp, clip, S, marks=[pytest.mark.slow] if S == 50 else [])
         for p in ("epsilon", "v_prediction") for sp in ("leading", "trailing") for clip in (False, True) for S in (10, 50)]


@pytest.mark.parametrize("prediction_type,spacing,clip_sample,S", CASES)
def test_target_convention_matches_ddim_inverse_scheduler(tiny_unet, x0, prediction_type, spacing, clip_sample, S):
    sched = DDIMInverseScheduler(prediction_type=prediction_type, timestep_spacing=spacing, clip_sample=clip_sample)
    want = diffusers_inverse_loop(sched, S, x0.clone(), tiny_unet)
    got = fastddim.invert(tiny_unet, x0, S, convention="target", backend="torch", progress=False,
                          **fastddim.from_diffusers(sched))
    check(got, want, 1e-5)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("prediction_type,clip_sample", [("epsilon", True), ("v_prediction", False)])
def test_target_convention_on_fused_backends(tiny_unet, x0, backend, prediction_type, clip_sample):
    """A fused backend with the model in channels_last (which reorders fp32 sums): within 1e-4."""
    if fastddim.info()["backends"]["cpu"].get(backend) is not None:
        pytest.skip(f"backend {backend} not built here")
    sched = DDIMInverseScheduler(prediction_type=prediction_type, timestep_spacing="trailing", clip_sample=clip_sample)
    want = diffusers_inverse_loop(sched, 10, x0.clone(), tiny_unet)
    got = fastddim.invert(tiny_unet, x0, 10, convention="target", backend=backend, memory_format=torch.channels_last,
                          progress=False, **fastddim.from_diffusers(sched))
    assert fastddim.info()["last_run"]["memory_format"] == "channels_last"
    check(got, want, 1e-4)


def test_sample_prediction_stays_finite_where_diffusers_gives_nan(tiny_unet, x0):
    """At the clean image (a = 1) diffusers divides by sqrt(1 - a) = 0; fastddim converts that one
    step's output with the level of its timestep. Elsewhere (a_0 < 1 as the first level) both agree."""
    kw = dict(convention="target", backend="torch", progress=False)
    sched = DDIMInverseScheduler(prediction_type="sample", clip_sample=False)
    assert torch.isnan(diffusers_inverse_loop(sched, 10, x0.clone(), tiny_unet)).any()
    got = fastddim.invert(tiny_unet, x0, 10, **kw, **fastddim.from_diffusers(sched))
    assert torch.isfinite(got).all()
    sched = DDIMInverseScheduler(prediction_type="sample", clip_sample=False, set_alpha_to_one=False)
    check(fastddim.invert(tiny_unet, x0, 10, **kw, **fastddim.from_diffusers(sched)),
          diffusers_inverse_loop(sched, 10, x0.clone(), tiny_unet), 1e-5)


@pytest.fixture
def no_tf32():
    """cuDNN and cuBLAS use TF32 for fp32 by default: off for a 1e-4 comparison with the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("prediction_type,clip_sample", [("epsilon", True), ("v_prediction", False)])
def test_target_convention_on_cuda(tiny_unet, x0, no_tf32, backend, prediction_type, clip_sample):
    """Model, state and encoder on the GPU, against diffusers' loop on the CPU."""
    sched = DDIMInverseScheduler(prediction_type=prediction_type, timestep_spacing="leading", clip_sample=clip_sample)
    want = diffusers_inverse_loop(sched, 10, x0.clone(), tiny_unet)
    gpu_unet = UNet2DModel.from_config(tiny_unet.config).eval()
    gpu_unet.load_state_dict(tiny_unet.state_dict())
    got = fastddim.invert(gpu_unet.cuda(), x0.cuda(), 10, convention="target", backend=backend, progress=False,
                          **fastddim.from_diffusers(sched))
    assert got.device.type == "cuda" and fastddim.info()["last_run"]["device"].startswith("cuda")
    check(got.cpu(), want, 1e-4)
