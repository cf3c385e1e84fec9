"""Every backend's noise is fastddim.noise's: Philox integers bit for bit, normals within a few ulp.

The float part goes through each backend's own log/sqrt/cos/sin (torch's SLEEF on the CPU; in the
C++ kernel our AVX-512/AVX2 log/sincos or, on the portable path, glibc; numpy under the Triton
interpreter, libdevice / CUDA libm on a GPU), each within 1 ulp of exact, so a normal r * cos(theta)
may differ from the reference by a few ulp. The C++ kernel's three noise paths (AVX-512F, AVX2+FMA
and scalar) are each tested here, as "cpp-avx512", "cpp-avx2" and "cpp-scalar", whichever one the
machine runs by default (a path the processor lacks is skipped with the reason); AVX-512 makes the
AVX2 path's normals bit for bit (the same operations at 16 lanes instead of 8).
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


SIMD_PATHS = ("avx512", "avx2", "scalar")


def _path_reason(path: str) -> str | None:
    """Why the C++ noise path ``path`` cannot run here, or None."""
    if _ops.extension_error() is not None:
        return _ops.extension_error()
    try:
        with cpu_simd(path):
            return None
    except RuntimeError as e:
        return f"no {path} noise path here: {e}"


@contextlib.contextmanager
def cpu_simd(path: str | bool):
    """Run the C++ kernels' noise on path ("avx512", "avx2", "scalar"; True: the default SIMD
    path, False: scalar), then restore the one that was on."""
    C = _ops.extension()
    saved = C.cpu_simd()
    C.cpu_simd(path)
    try:
        yield
    finally:
        C.cpu_simd(saved)


# The C++ backend once per noise path; "cpp-avx2" runs the backend "cpp" on the AVX2 path.
CPP_PATHS = [
    pytest.param(f"cpp-{p}", marks=pytest.mark.skipif(_path_reason(p) is not None, reason=str(_path_reason(p))), id=f"cpp-{p}")
    for p in SIMD_PATHS
]
CPU_FUSED = CPP_PATHS + [backend_param("triton")]
# Skipped with the reason where a backend is missing; without a GPU the `gpu` marker skips them all.
GPU_FUSED = [backend_param("cuda", "cuda"), backend_param("triton", "cuda")]


def split(backend: str) -> tuple[str, contextlib.AbstractContextManager]:
    """("cpp", path context) for "cpp-avx512" / "cpp-avx2" / "cpp-scalar"; (backend, no-op) otherwise."""
    if backend.startswith("cpp-"):
        return "cpp", cpu_simd(backend[4:])
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
    nor of 8 or 16 groups (one AVX2 or AVX-512 block), and one that spans several 256-group chunks."""
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
        (res.double(), rng, "res must be a float32 .n, .shape. tensor, got torch.float64"),
        (torch.empty(()), rng, "res must be a float32 .n, .shape. tensor"),
        (res, torch.tensor([1]), "rng must be an int64 .2,. tensor"),
        (res, rng.float(), "rng must be an int64 .2,. tensor"),
        (res, rng.to("meta"), "rng must be an int64 .2,. tensor .* on res's device"),
    ]
    for name in names:
        for r, g, message in bad:
            with pytest.raises(ValueError, match=message):
                _ops.normal_(name, r, g, 0)


def check_normal_into_strided(backend: str, device: str = "cpu") -> None:
    """_ops.normal_ into a transposed, sliced or channels_last res, with a strided rng, fills res in
    place with, element for element, the numbers it gives a contiguous res."""
    name, path = split(backend)
    big = torch.full((3, 4, 10, 14), float("nan"), device=device)
    cases = {
        "transposed": torch.empty(3, 4, 7, 5, device=device).transpose(2, 3),
        "sliced": big[:, :, ::2, 2:-3],
        "channels_last": torch.empty(3, 4, 5, 9, device=device).to(memory_format=torch.channels_last),
    }
    rng = torch.tensor([5, 0, 2**40 + 3, 0, 11, 0], device=device)[::2][1:]  # (2**40 + 3, 11), not contiguous
    with path:
        for case, res in cases.items():
            assert not res.is_contiguous() and not rng.is_contiguous()
            ptr, stride = res.data_ptr(), res.stride()
            assert _ops.normal_(name, res, rng, 6) is res
            want = _ops.normal_(name, torch.empty(res.shape, device=device), rng.contiguous(), 6)
            assert (res.data_ptr(), res.stride()) == (ptr, stride), case
            assert torch.equal(res, want), f"{backend} {case}: max |diff| {(res - want).abs().max().item()}"
    assert big.isnan().sum() == big.numel() - 3 * 4 * 5 * 9  # nothing written outside the slice


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_normal_op_fills_any_strides(backend):
    check_normal_into_strided(backend)


@pytest.mark.skipif(_path_reason("avx2") is not None, reason=str(_path_reason("avx2")))
def test_cpu_noise_paths_agree():
    """Every available path against the spec within MAX_ULPS; the SIMD paths and the scalar one
    within a few ulp of each other, so switching paths moves no sample by more than that; AVX-512
    and AVX2 equal bit for bit."""
    C = _ops.extension()
    got = {}
    cases = [(16, (3, 33, 35)), (3, (61,)), (2, (5,)), (1, (2,))]  # tails of 1..15 groups past a block
    for path in SIMD_PATHS:
        if _path_reason(path) is not None:
            continue
        with cpu_simd(path):
            assert C.cpu_simd() == path
            got[path] = [normal(f"cpp-{path}", 2**40 + 3, 77, n, 5, shape) for n, shape in cases]
    for path, zs in got.items():
        for (n, shape), z in zip(cases, zs):
            assert_within_ulps(z, noise.normal(2**40 + 3, 77, n, 5, shape), MAX_ULPS["cpp"], f"{path} {shape}")
    d = assert_within_ulps(got["avx2"][0], got["scalar"][0], 2 * MAX_ULPS["cpp"], "avx2 vs scalar")
    assert (d == 0).float().mean() > 0.5
    if "avx512" in got:
        for (n, shape), a, b in zip(cases, got["avx512"], got["avx2"]):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"avx512 vs avx2 {shape}"


@pytest.mark.skipif(_path_reason("avx512") is not None, reason=str(_path_reason("avx512")))
def test_avx512_noise_equals_avx2_bit_for_bit():
    """AVX-512 and AVX2 run the same operations in the same order per lane: the same normals to the
    bit, over many seeds, steps and sample indices (10^6 normals, chunk and sample tails included),
    the same raw Philox integers, and the same fused step (fp32 and bf16 model output)."""
    shape = (3, 37, 41)  # 1137 groups per sample: 4 full 256-group chunks and a tail of 113
    cases = [(0, 0, 0), (2**64 - 1, 2**32 - 3, 9), (123456789, 1000, 1), (2**63 + 7, 5, 999)]
    g = torch.Generator().manual_seed(3)
    ctr = torch.randint(0, 2**32, (1037, 4), generator=g, dtype=torch.int64)
    plan = make_plan(Schedule.linear(), 10, eta=1.0)
    x, out = torch.randn(5, *shape, generator=g), torch.randn(5, *shape, generator=g)
    got = {}
    for path in ("avx512", "avx2"):
        with cpu_simd(path):
            zs = [normal(f"cpp-{path}", seed, first, 16, step, shape) for seed, first, step in cases]
            ints = [_ops.extension().philox4x32(ctr, seed) for seed, _, _ in cases]
            steps = [make_step("cpp", plan, 77)(x, o, 4, 3)[0] for o in (out, out.bfloat16())]
        got[path] = (zs, ints, steps)
    for i, (a, b) in enumerate(zip(got["avx512"][0], got["avx2"][0])):
        if not torch.equal(a.view(torch.int32), b.view(torch.int32)):
            d = ulps(a, b)
            pytest.fail(f"case {cases[i]}: {int((d > 0).sum())} of {d.numel()} normals differ, worst {int(d.max())} ulp")
    for a, b in zip(got["avx512"][1], got["avx2"][1]):
        assert torch.equal(a, b)
    assert torch.equal(got["avx512"][1][0], philox("torch", ctr, cases[0][0]))
    for a, b in zip(got["avx512"][2], got["avx2"][2]):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("backend", CPP_PATHS)
def test_cpp_fused_step_on_each_path(backend):
    """The fused C++ step with noise on each path against the torch backend's step (reference
    math and noise): the difference is sigma times the noise's few ulps, plus one rounding."""
    for pred, eta, dtype in (("epsilon", 1.0, torch.float32), ("v_prediction", 0.5, torch.bfloat16)):
        plan = make_plan(Schedule.linear(), 10, eta=eta, prediction_type=pred, clip_sample=True)
        g = torch.Generator().manual_seed(5)
        shape = (4, 3, 33, 35)
        x, out = torch.randn(shape, generator=g), torch.randn(shape, generator=g).to(dtype)
        want_step = make_step("torch", plan, 2**64 - 11)
        with split(backend)[1]:
            got_step = make_step("cpp", plan, 2**64 - 11)
            for j in (0, 4, 8):
                got, want = got_step(x, out, j, 6)[0], want_step(x, out, j, 6)[0]
                sigma = plan.table[j, 5].item()
                z = noise.normal(2**64 - 11, 6, 4, j + 1, shape[1:]).abs()
                bound = MAX_ULPS["cpp"] * 2**-23 * sigma * (z + 2**-126) * 2 + 2**-22 * want.abs() + 1e-7
                err = (got - want).abs()
                assert (err <= bound).all(), f"{backend} {pred} j={j}: worst {float((err - bound).max()):.3g} over the bound"


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
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_noise(backend):
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
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_normal_op_fills_any_strides(backend):
    check_normal_into_strided(backend, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_normal_op_replays_in_a_graph_with_new_rng(backend):
    """x_T captured in a CUDA graph: a replay after rng.copy_ gives the new seed's noise."""
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
def test_cpu_simd_env_var_picks_the_path():
    """FASTDDIM_CPU_SIMD, read once when fastddim._C loads, caps the default path by name or level
    (0 forces the portable one); True then means that SIMD path, False the scalar one."""
    import os
    import subprocess
    import sys

    C = _ops.extension()
    have = [p for p in reversed(SIMD_PATHS) if _path_reason(p) is None]  # scalar first
    code = "from fastddim import _ops; C = _ops.extension(); print(C.cpu_simd(), C.cpu_simd(False), C.cpu_simd(0))"
    for value, want in (("0", "scalar"), ("scalar", "scalar"), ("1", "avx2"), ("avx2", "avx2"), ("2", "avx512"),
                        ("avx512", "avx512"), (None, "avx512")):
        env = {k: v for k, v in os.environ.items() if k != "FASTDDIM_CPU_SIMD"}
        if value is not None:
            env["FASTDDIM_CPU_SIMD"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        expect = [p for p in have if have.index(p) <= ["scalar", "avx2", "avx512"].index(want)][-1]  # best up to the cap
        assert out.stdout.split() == [expect, "scalar", "scalar"], (value, out.stdout)
    with cpu_simd(C.cpu_simd()):
        for level, name in enumerate(reversed(SIMD_PATHS)):
            if name in have:
                assert C.cpu_simd(level) == name == C.cpu_simd(name)
            else:
                with pytest.raises(RuntimeError, match="no .* noise path"):
                    C.cpu_simd(name)
        with pytest.raises(RuntimeError, match="unknown path"):
            C.cpu_simd("sse")
        with pytest.raises(RuntimeError, match="level must be"):
            C.cpu_simd(3)
