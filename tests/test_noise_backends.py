"""Every backend's noise is fastddim.noise's: Philox integers bit for bit, normals within a few ulp.

The float part goes through each backend's own log/sqrt/cos/sin (torch's SLEEF on the CPU,
glibc in the C++ kernel, numpy under the Triton interpreter, libdevice / CUDA libm on a GPU), each
within 1-2 ulp of exact, so a normal r * cos(theta) may differ from the reference by a few ulp.
"""
from __future__ import annotations

import pytest
import torch

import fastddim
from fastddim import _ops, noise
from fastddim.dispatch import available_backends, make_step
from fastddim.plan import make_plan
from fastddim.schedule import Schedule

# Random123's known-answer vectors for Philox-4x32-10: (counter, key, output).
KATS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
# Largest allowed |difference| in ulps of a normal against noise.normal, per backend (see above;
# numpy's float32 sin/cos under the interpreter are the loosest).
MAX_ULPS = {"cpp": 4, "cuda": 4, "triton": 8 if torch.cuda.is_available() is False else 4}


def backend_param(name: str, device: str = "cpu"):
    reason = available_backends(torch.device(device))[name]
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)), id=name)


CPU_FUSED = [backend_param("cpp"), backend_param("triton")]


def philox(backend: str, ctr: torch.Tensor, seed: int) -> torch.Tensor:
    if backend == "torch":
        return torch.stack(noise.philox4x32(*ctr.unbind(1), seed & 0xFFFFFFFF, seed >> 32), dim=1)
    if backend == "triton":
        from fastddim.kernels import ddim_step as triton_kernels

        return triton_kernels.philox4x32(ctr, seed)
    return _ops.extension().philox4x32(ctr, seed)


def normal(backend: str, seed: int, first_index: int, n: int, step: int, shape, device="cpu") -> torch.Tensor:
    if backend == "torch":
        return noise.normal(seed, first_index, n, step, shape, device)
    if backend == "triton":
        from fastddim.kernels import ddim_step as triton_kernels

        return triton_kernels.normal(seed, first_index, n, step, shape, device)
    res = torch.empty((n, *shape), dtype=torch.float32, device=device)
    _ops.extension().normal_(res, seed, first_index, step)
    return res


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between float32 tensors (across zero too)."""
    def ordered(t):
        i = t.contiguous().view(torch.int32).long()
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)

    return (ordered(a) - ordered(b)).abs()


@pytest.mark.parametrize("backend", [backend_param("torch")] + CPU_FUSED)
def test_philox_known_answers(backend):
    for ctr, (k0, k1), want in KATS:
        got = philox(backend, torch.tensor([ctr], dtype=torch.int64), k0 | (k1 << 32))
        assert [hex(v) for v in got[0].tolist()] == [hex(v) for v in want]


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_philox_bit_identical_to_spec(backend):
    g = torch.Generator().manual_seed(0)
    ctr = torch.randint(0, 2**32, (2048, 4), generator=g, dtype=torch.int64)
    ctr[:4] = torch.tensor([[0, 0, 0, 0], [2**32 - 1] * 4, [1, 2, 3, 4], [2**31, 2**31 - 1, 0, 2**32 - 1]])
    for seed in (0, 1, 2**32 - 1, 2**32, 2**63 + 12345, 2**64 - 1):
        assert torch.equal(philox(backend, ctr, seed), philox("torch", ctr, seed)), seed


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_normals_within_ulps(backend):
    shape = (3, 37, 37) if backend == "cpp" else (3, 11, 13)
    n = 16 if backend == "cpp" else 4
    for seed, first, step in ((0, 0, 0), (2**64 - 1, 2**32 - n, 7), (123456789, 1000, 1)):
        got = normal(backend, seed, first, n, step, shape)
        want = noise.normal(seed, first, n, step, shape)
        d = ulps(got, want)
        worst = int(d.argmax())
        assert d.max() <= MAX_ULPS[backend], (
            f"{backend}: {int((d > 0).sum())} of {d.numel()} normals differ; worst {int(d.max())} ulp at flat "
            f"index {worst}: {got.flatten()[worst].item()!r} vs {want.flatten()[worst].item()!r}"
        )
        assert (d == 0).float().mean() > 0.5  # mostly identical: same integers, same formula


@pytest.mark.parametrize("backend", [backend_param("torch")] + CPU_FUSED)
def test_batch_invariance(backend):
    """Samples 5..7 of a batch of 8 are those of a batch of 3 starting at index 5, bit for bit."""
    shape = (3, 7, 9)
    big = normal(backend, 42, 0, 8, 3, shape)
    small = normal(backend, 42, 5, 3, 3, shape)
    assert torch.equal(big[5:8], small)
    plan = make_plan(Schedule.linear(), 10, eta=1.0)
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(8, *shape, generator=g), torch.randn(8, *shape, generator=g)
    step = make_step(backend, plan, 42)
    for j in (0, 9):
        assert torch.equal(step(x, out, j, 0)[0][5:8], step(x[5:8], out[5:8], j, 5)[0])


class TinyModel(torch.nn.Module):
    """A deterministic stand-in for a U-Net: enough to drive the whole loop."""

    def forward(self, x, t):
        return 0.6 * x + 0.002 * t.view(-1, *([1] * (x.dim() - 1))).float().sin()


@pytest.mark.parametrize(
    "eta,options", [(0.0, {}), (1.0, {}), (0.5, {"clip_sample": True}), ("sigma_hat", {"prediction_type": "v_prediction"})],
    ids=["eta0", "eta1", "eta0.5-clip", "sigma_hat-v"],
)
@pytest.mark.parametrize("backend", CPU_FUSED)
def test_sample_equals_torch_backend(backend, eta, options):
    kw = dict(n=3, steps=5, eta=eta, schedule=Schedule.linear(), shape=(3, 9, 9), seed=2**64 - 9, first_index=4, **options)
    want = fastddim.sample(TinyModel(), backend="torch", **kw)
    got = fastddim.sample(TinyModel(), backend=backend, **kw)
    assert fastddim.info()["last_run"]["backend"] == backend
    err = (got - want).abs().max().item()
    assert err <= 1e-4 * max(1.0, want.abs().max().item()), f"{backend}: max |diff| {err}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_noise(backend):
    if available_backends(torch.device("cuda"))[backend] is not None:
        pytest.skip(available_backends(torch.device("cuda"))[backend])
    g = torch.Generator().manual_seed(0)
    ctr = torch.randint(0, 2**32, (4096, 4), generator=g, dtype=torch.int64)
    if backend == "cuda":
        got = _ops.extension().philox4x32(ctr.cuda(), 2**64 - 5).cpu()
    else:
        from fastddim.kernels import ddim_step as triton_kernels

        got = triton_kernels.philox4x32(ctr.cuda(), 2**64 - 5).cpu()
    assert torch.equal(got, philox("torch", ctr, 2**64 - 5))
    if backend == "cuda":
        z = torch.empty(8, 3, 37, 37, device="cuda")
        _ops.extension().normal_(z, 7, 3, 2)
    else:
        z = normal("triton", 7, 3, 8, 2, (3, 37, 37), device="cuda")
    assert ulps(z.cpu(), noise.normal(7, 3, 8, 2, (3, 37, 37))).max() <= MAX_ULPS[backend]
