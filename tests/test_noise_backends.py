"""Every backend's noise is fastddim.noise's: Philox integers bit for bit, normals within a few ulp.

The float part goes through each backend's own log/sqrt/cos/sin (torch's SLEEF on the CPU; in the
C++ kernel our AVX2 log/sincos or, on the portable path, glibc; numpy under the Triton interpreter,
libdevice / CUDA libm on a GPU), each within 1 ulp of exact, so a normal r * cos(theta) may differ
from the reference by a few ulp. The C++ kernel's two noise paths (AVX2+FMA and scalar) are both
tested here, as "cpp-avx2" and "cpp-scalar", whichever one the machine runs by default.
"""
from __future__ import annotations

import contextlib

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


def _simd_reason() -> str | None:
    if _ops.extension_error() is not None:
        return _ops.extension_error()
    with contextlib.suppress(RuntimeError):
        with cpu_simd(True):
            return None
    return "no AVX2+FMA on this processor or in this build"


@contextlib.contextmanager
def cpu_simd(simd: bool):
    """Run the C++ kernels' noise on the AVX2 path (True) or the scalar one, then restore."""
    C = _ops.extension()
    saved = C.cpu_simd() == "avx2"
    C.cpu_simd(simd)
    try:
        yield
    finally:
        C.cpu_simd(saved)


# The C++ backend once per noise path; "cpp-avx2" runs the backend "cpp" with the SIMD path on.
CPP_PATHS = [
    pytest.param("cpp-avx2", marks=pytest.mark.skipif(_simd_reason() is not None, reason=str(_simd_reason())), id="cpp-avx2"),
    pytest.param("cpp-scalar", marks=pytest.mark.skipif(_ops.extension_error() is not None, reason=str(_ops.extension_error())), id="cpp-scalar"),
]
CPU_FUSED = CPP_PATHS + [backend_param("triton")]


def split(backend: str) -> tuple[str, contextlib.AbstractContextManager]:
    """("cpp", path context) for "cpp-avx2" / "cpp-scalar"; (backend, no-op) otherwise."""
    if backend.startswith("cpp-"):
        return "cpp", cpu_simd(backend == "cpp-avx2")
    return backend, contextlib.nullcontext()


def philox(backend: str, ctr: torch.Tensor, seed: int) -> torch.Tensor:
    if backend == "torch":
        return torch.stack(noise.philox4x32(*ctr.unbind(1), seed & 0xFFFFFFFF, seed >> 32), dim=1)
    if backend == "triton":
        from fastddim.kernels import ddim_step as triton_kernels

        return triton_kernels.philox4x32(ctr, seed)
    with split(backend)[1]:
        return _ops.extension().philox4x32(ctr, seed)


def normal(backend: str, seed: int, first_index: int, n: int, step: int, shape, device="cpu") -> torch.Tensor:
    """noise.normal's arguments, made by ``backend``'s own kernel through ``_ops.normal_``."""
    if backend == "torch":
        return noise.normal(seed, first_index, n, step, shape, device)
    name, path = split(backend)
    res = torch.empty((n, *shape), dtype=torch.float32, device=device)
    with path:
        assert _ops.normal_(name, res, _ops.rng_state(seed, first_index, device), step) is res
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


def max_ulps(backend: str) -> int:
    return MAX_ULPS[backend.split("-")[0]]


def assert_within_ulps(got: torch.Tensor, want: torch.Tensor, bound: int, what: str) -> torch.Tensor:
    d = ulps(got, want)
    worst = int(d.argmax())
    assert d.max() <= bound, (
        f"{what}: {int((d > 0).sum())} of {d.numel()} normals differ; worst {int(d.max())} ulp at flat "
        f"index {worst}: {got.flatten()[worst].item()!r} vs {want.flatten()[worst].item()!r}"
    )
    return d


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_normals_within_ulps(backend):
    """_ops.normal_ against the spec; sample sizes that are not a multiple of 4 (the Philox group)
    nor of 8 groups (one AVX2 block), and one that spans several 256-group chunks."""
    cases = [(16, (3, 37, 37)), (5, (5, 7)), (3, (2,))] if backend.startswith("cpp") else [(4, (3, 11, 13)), (3, (5, 7))]
    for n, shape in cases:
        for seed, first, step in ((0, 0, 0), (2**64 - 1, 2**32 - n, 7), (123456789, 1000, 1)):
            got = normal(backend, seed, first, n, step, shape)
            d = assert_within_ulps(got, noise.normal(seed, first, n, step, shape), max_ulps(backend), f"{backend} {shape}")
            if d.numel() >= 1000:
                assert (d == 0).float().mean() > 0.5  # mostly identical: same integers, same formula


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_normal_op_reads_rng_in_place(backend):
    """normal_ reads seed and first index from the rng tensor when it runs: changing the tensor in
    place (what a CUDA graph's replay relies on) changes the noise, with nothing re-created."""
    name, path = split(backend)
    res = torch.full((3, 5, 7), float("nan"))
    rng = _ops.rng_state(11, 0, "cpu")
    ptrs = (res.data_ptr(), rng.data_ptr())
    with path:
        _ops.normal_(name, res, rng, 4)
        first = res.clone()
        rng.copy_(_ops.rng_state(2**64 - 2, 2**32 + 9, "cpu"))  # index wraps to 9: the spec's mod 2**32
        _ops.normal_(name, res, rng, 4)
    assert (res.data_ptr(), rng.data_ptr()) == ptrs
    assert_within_ulps(first, noise.normal(11, 0, 3, 4, (5, 7)), max_ulps(backend), "before")
    assert_within_ulps(res, noise.normal(2**64 - 2, 9, 3, 4, (5, 7)), max_ulps(backend), "after the rng changed")
    assert not torch.equal(res, first)


def test_normal_op_rejects_bad_arguments():
    rng = _ops.rng_state(1, 0, "cpu")
    res = torch.empty(2, 3, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        _ops.normal_("torch", res, rng, 0)
    with pytest.raises(ValueError, match="fills cuda tensors"):
        _ops.normal_("cuda", res, rng, 0)
    names = ["cpp"] * (_ops.extension_error() is None) + ["triton"] * (available_backends(torch.device("cpu"))["triton"] is None)
    bad = [
        (res.double(), rng, "res must be a contiguous float32"),
        (res.transpose(1, 2), rng, "res must be a contiguous float32"),
        (torch.empty(()), rng, "res must be a contiguous float32"),
        (res, torch.tensor([1]), "rng must be"),
        (res, rng.float(), "rng must be"),
        (res, torch.tensor([1, 7, 0, 7])[::2], "rng must be"),  # not contiguous
    ]
    for name in names:
        for r, g, message in bad:
            with pytest.raises((RuntimeError, ValueError), match=message):
                _ops.normal_(name, r, g, 0)


@pytest.mark.skipif(_simd_reason() is not None, reason=str(_simd_reason()))
def test_cpu_noise_paths_agree():
    """The AVX2 and scalar paths: the same Philox integers, normals within a few ulp of each other
    (each is within MAX_ULPS of the spec), so switching paths moves no sample by more than that."""
    C = _ops.extension()
    got = {}
    for path in ("cpp-avx2", "cpp-scalar"):
        with split(path)[1]:
            assert C.cpu_simd() == path[4:]
            got[path] = normal(path, 2**40 + 3, 77, 16, 5, (3, 33, 35))
    d = assert_within_ulps(got["cpp-avx2"], got["cpp-scalar"], 2 * MAX_ULPS["cpp"], "avx2 vs scalar")
    assert (d == 0).float().mean() > 0.5


@pytest.mark.parametrize("backend", [backend_param("torch")] + CPU_FUSED)
def test_batch_invariance(backend):
    """Samples 5..7 of a batch of 8 are those of a batch of 3 starting at index 5, bit for bit."""
    name, path = split(backend)
    shape = (3, 7, 9)
    with path:
        big = normal(backend, 42, 0, 8, 3, shape)
        small = normal(backend, 42, 5, 3, 3, shape)
        assert torch.equal(big[5:8], small)
        plan = make_plan(Schedule.linear(), 10, eta=1.0)
        g = torch.Generator().manual_seed(1)
        x, out = torch.randn(8, *shape, generator=g), torch.randn(8, *shape, generator=g)
        step = make_step(name, plan, 42)
        for j in (0, 9):
            assert torch.equal(step(x, out, j, 0)[0][5:8], step(x[5:8], out[5:8], j, 5)[0])


@pytest.mark.parametrize("backend", CPP_PATHS)
def test_cpp_noise_independent_of_threads_and_chunks(backend):
    """The C++ noise of an element does not depend on how the work is split: one thread or two,
    a batch that starts elsewhere, samples of 1027 groups (several chunks, not a multiple of 8)."""
    shape = (3, 37, 37)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = normal(backend, 5, 0, 9, 2, shape)
        torch.set_num_threads(2)
        two = normal(backend, 5, 0, 9, 2, shape)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(one, two)
    assert torch.equal(one[4:], normal(backend, 5, 4, 5, 2, shape))


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
    name, path = split(backend)
    kw = dict(n=3, steps=5, eta=eta, schedule=Schedule.linear(), shape=(3, 9, 9), seed=2**64 - 9, first_index=4, **options)
    want = fastddim.sample(TinyModel(), backend="torch", **kw)
    with path:
        got = fastddim.sample(TinyModel(), backend=name, **kw)
    assert fastddim.info()["last_run"]["backend"] == name
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
    z = normal(backend, 7, 3, 8, 2, (3, 37, 37), device="cuda")
    assert_within_ulps(z.cpu(), noise.normal(7, 3, 8, 2, (3, 37, 37)), MAX_ULPS[backend], backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_normal_op_replays_in_a_graph_with_new_rng(backend):
    """x_T captured in a CUDA graph: a replay after rng.copy_ gives the new seed's noise."""
    if available_backends(torch.device("cuda"))[backend] is not None:
        pytest.skip(available_backends(torch.device("cuda"))[backend])
    res = torch.empty(4, 3, 17, 19, device="cuda")
    rng = _ops.rng_state(1, 0, "cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        _ops.normal_(backend, res, rng, 0)  # compile / warm up off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _ops.normal_(backend, res, rng, 0)
    for seed, first in ((1, 0), (2**64 - 3, 9), (77, 2**32 + 5)):
        rng.copy_(_ops.rng_state(seed, first, "cuda"))
        graph.replay()
        want = noise.normal(seed, first, 4, 0, (3, 17, 19))
        assert_within_ulps(res.cpu(), want, MAX_ULPS[backend], f"{backend} replay seed={seed} first={first}")


@pytest.mark.skipif(_ops.extension_error() is not None, reason=str(_ops.extension_error()))
def test_cpu_simd_env_var_picks_the_scalar_path():
    """FASTDDIM_CPU_SIMD=0, read once when fastddim._C loads, forces the portable path."""
    import os
    import subprocess
    import sys

    code = "from fastddim import _ops; print(_ops.extension().cpu_simd())"
    env = dict(os.environ, FASTDDIM_CPU_SIMD="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "scalar"
