"""The Triton kernels compiled for sm_90 (H100/H200) on this machine, no GPU needed.

``triton.compile`` of an ``ASTSource`` for ``GPUTarget("cuda", 90, 32)`` runs the whole pipeline
down to SASS with the ptxas Triton ships. What a GPU would see is read off that: registers and
spills (``ptxas -v``) and the Philox rounds (``mul.hi`` in the PTX, two per round, ten rounds per
group of 4 normals). Sample sizes that are not a multiple of 16 once made Triton 3.6 spread a
group's 4 normals over 4 threads, each running the group's Philox (146 ``mul.hi`` against 38,
139 registers against 51): the assertions below catch that cliff coming back.

The kernel module reads TRITON_INTERPRET when it is imported (conftest.py sets it on a machine
without a GPU), so the compiles run in a subprocess without it: this file run as a script prints
a JSON report, one row per variant.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

# Sample sizes: multiples of 16 (numel gets tt.divisibility 16: 128-bit loads), 3x32x32 = 3072 and
# 4x50x50 = 10000 = 16 * 625, and one that is not even a multiple of 4, 3x37x37 = 4107 (the cliff).
SIZES = {"3x32x32": 3 * 32 * 32, "3x37x37": 3 * 37 * 37, "4x50x50": 4 * 50 * 50}
# (model output dtype, low-precision copy dtype): fp32, a bf16 model, a bf16 model fed a bf16 copy.
DTYPES = {"fp32": ("fp32", None), "bf16": ("bf16", None), "bf16+copy": ("bf16", "bf16")}
# Step kernel registers measured here: Triton 3.6 46-61 (139-159 before the joined noise tile),
# Triton 3.9 56-71. Room above the first, well below the cliff. The DPM-Solver++ variants (no noise)
# must stay under the same ceiling: Triton 3.9 34-48 (the DDIM variants' counts, PTX mul.hi and
# vector loads were the same before and after the SOLVER constexpr joined the kernel).
# The guided variants (one more load, the combine and the rescale) and the rescale's reduction
# (float64 sums) under the same ceiling.
MAX_REGS = 80
MULHI_PER_GROUP = 20  # Philox-4x32-10: 2 mul.hi per round, 10 rounds, once per group of 4 normals


# ------------------------------------------------------------------ the subprocess (no interpreter)
def _ptxas_report(ptxas: str, ptx: str, tmpdir: str) -> dict:
    """Registers and spill bytes of the kernel in ``ptx`` for sm_90, from ``ptxas -v``."""
    path = os.path.join(tmpdir, "kernel.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)[1]  # sm_90a: Triton uses Hopper's extensions
    res = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", path + ".cubin"], capture_output=True, text=True)
    info = res.stderr + res.stdout
    if res.returncode != 0:
        raise RuntimeError(f"{ptxas} -v failed: {info}")
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output: {info!r}")
    return {"regs": int(regs[1]), "spill_stores": int(spills[1]), "spill_loads": int(spills[2])}


def _compile(kernel, types: dict, constexprs: dict, numel: int, ptxas: str, tmpdir: str) -> dict:
    """Compile ``kernel`` for sm_90 as the launcher specializes it: 16-byte aligned pointers (torch's
    allocations are), numel divisible by 16 only when it is."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {name: types.get(name, "constexpr") for name in names}
    # ASTSource does not apply a constexpr's default: one left out would compile as None
    missing = [n for n in names if signature[n] == "constexpr" and n not in constexprs]
    assert not missing, f"{kernel.__name__}: give every constexpr a value, missing {missing}"
    divisible = [n for n in names if n.endswith("_ptr")] + (["numel"] if numel % 16 == 0 else [])
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    ptx = compiled.asm["ptx"]
    groups_per_thread = constexprs["BLOCK"] // (32 * compiled.metadata.num_warps)
    return {
        **_ptxas_report(ptxas, ptx, tmpdir),
        "mulhi": len(re.findall(r"\bmul\.hi\.u32\b", ptx)),
        "groups_per_thread": groups_per_thread,
        "v4_loads": len(re.findall(r"\bld\.global\S*\.v4\b", ptx)),
        "shared": compiled.metadata.shared,
        # float64 '/' and sqrt: correctly rounded instructions, and no approximate ones anywhere
        "rn_f64": len(re.findall(r"\b(?:div|sqrt)\.rn\.f64\b", ptx)),
        "approx": len(re.findall(r"\.approx\b", ptx)),
    }


def _variants():
    """(name, kernel, types, constexprs, numel) of the variants a run meets most."""
    from fastddim.kernels import ddim_step as k

    for size, numel in SIZES.items():
        block = k._block((numel + 3) // 4)
        for dname, (out_dt, low_dt) in DTYPES.items():
            types = {
                "x_ptr": "*fp32", "out_ptr": f"*{out_dt}", "table_ptr": "*fp32", "rng_ptr": "*i64", "s_ptr": "*fp32",
                "prev_ptr": "*fp32", "x0_ptr": "*fp32", "low_ptr": f"*{low_dt or 'fp32'}", "x0_prev_ptr": "*fp32",
                "u_ptr": f"*{out_dt}", "ratio_ptr": "*fp32",
                "j": "i32", "numel": "i32", "clip_range": "fp32", "w": "fp32", "phi": "fp32", "one_m_phi": "fp32",
            }
            base = dict(PRED=0, CLIP=0, CLIPPED_EPS=False, SIGMA_HAT=False, HAS_NOISE=True, WRITE_X0=low_dt is None,
                        WRITE_LOW=low_dt is not None, BLOCK=block, SOLVER=0, GUIDE=0, HAS_RATIO=False)
            yield f"step {size} {dname}", k._ddim_step_kernel, types, base, numel
            # DPM-Solver++(2M), second order: no noise, x0 always written, one more load (x0_prev)
            dpm = dict(base, HAS_NOISE=False, WRITE_X0=True, SOLVER=2)
            yield f"dpm {size} {dname}", k._ddim_step_kernel, types, dpm, numel
            if dname == "fp32":
                yield f"dpm {size} {dname} first order", k._ddim_step_kernel, types, dict(dpm, SOLVER=1), numel
            if dname == "bf16":  # the most work per element: v, thresholding, eps from the clipped x0
                heavy = dict(base, PRED=2, CLIP=2, CLIPPED_EPS=True)
                yield f"step {size} {dname} v+threshold", k._ddim_step_kernel, types, heavy, numel
                yield f"dpm {size} {dname} v+threshold", k._ddim_step_kernel, types, dict(dpm, PRED=2, CLIP=2), numel
            if dname != "bf16+copy":  # guidance: CFG, CFG with the rescale, CFG++ (the engine's DDIM run, with noise)
                for gname, guide in (("cfg", dict(GUIDE=1)), ("cfg+rescale", dict(GUIDE=1, HAS_RATIO=True)),
                                     ("cfg++", dict(GUIDE=2))):
                    yield f"guided {size} {dname} {gname}", k._ddim_step_kernel, types, dict(base, **guide), numel
                if dname == "bf16":  # the most work: rescaled v, thresholding, eps from the clipped x0; DPM
                    yield (f"guided {size} {dname} cfg+rescale v+threshold", k._ddim_step_kernel, types,
                           dict(base, PRED=2, CLIP=2, CLIPPED_EPS=True, GUIDE=1, HAS_RATIO=True), numel)
                    yield (f"guided {size} {dname} dpm cfg+rescale", k._ddim_step_kernel, types,
                           dict(dpm, GUIDE=1, HAS_RATIO=True), numel)
            if dname != "bf16+copy":  # the rescale's reduction: per-chunk float64 sums
                yield (f"rescale {size} {dname} partial", k._rescale_partial_kernel,
                       {"u_ptr": f"*{out_dt}", "c_ptr": f"*{out_dt}", "part_ptr": "*fp64", "numel": "i32", "chunks": "i32",
                        "w": "fp32"}, dict(BLOCK=_rescale_block(k, numel)), numel)
        yield f"normal {size}", k._normal_kernel, {"res_ptr": "*fp32", "rng_ptr": "*i64", "step": "i32", "numel": "i32"}, dict(BLOCK=block), numel
    yield ("rescale finish", k._rescale_finish_kernel,
           {"part_ptr": "*fp64", "ratio_ptr": "*fp32", "numel": "i32", "chunks": "i32"}, dict(BLOCK=64, ITERS=2), 1)


def _rescale_block(k, numel: int) -> int:
    """The BLOCK the rescale_ratio launcher picks for ``numel`` (read off its partial launch)."""
    import torch

    launches = _recorded(k, "_rescale_partial_kernel", lambda: k.rescale_ratio(torch.zeros(1, numel), torch.zeros(1, numel), 2.0))
    return launches[0][1]["BLOCK"]


def _recorded(k, kernel: str, call) -> list:
    """The (args, kwargs) the launchers pass to ``k.<kernel>`` during ``call()``, without launching it
    (no GPU here): the kernel is swapped for a recorder for the call's duration."""
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((args, kwargs))

    real = getattr(k, kernel)
    setattr(k, kernel, Recorder())
    try:
        try:
            call()
        except Exception:  # a later kernel of the call, not recorded, could not run here
            if not launches:
                raise
    finally:
        setattr(k, kernel, real)
    return launches


def _guided_step_keys() -> list[str]:
    """The distinct compile keys (Triton's specialization of the arguments) of the guided step as the
    launcher calls it for several w and phi, ints among them: one key means a per-step w never recompiles."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from fastddim.kernels import ddim_step as k

    kernel = k._ddim_step_kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32)))
    x = torch.zeros(2, 48)
    keys = set()
    for w, phi in ((7.5, 0.7), (2, 0), (0.0, 1), (16, 0.5), (3, 1.0)):  # not w = 1: the unguided variant runs
        def call():
            k.ddim_step(x, x.clone(), torch.zeros(10, 6), 3, torch.zeros(2, dtype=torch.int64), torch.empty_like(x),
                        pred=0, out_uncond=x.clone(), guide=1, w=w, phi=phi, ratio=torch.ones(2))
        for args, kwargs in _recorded(k, "_ddim_step_kernel", call):
            keys.add(repr(binder(*args, **kwargs)[1]))
    return sorted(keys)


def _report() -> dict:
    """{"skip": reason} where triton's CUDA backend or its ptxas is missing, else {"triton": version,
    "rows": {variant: figures}}."""
    import tempfile

    try:
        import triton
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path  # the one Triton compiles sm_90 with (versions differ in which)
    except (ImportError, AttributeError, RuntimeError) as e:
        return {"skip": f"triton's CUDA backend is not importable here: {e}"}
    if not ptxas or not os.path.exists(ptxas):
        return {"skip": f"triton's ptxas is not installed (looked for {ptxas!r})"}
    rows = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        for name, kernel, types, constexprs, numel in _variants():
            rows[name] = _compile(kernel, types, constexprs, numel, ptxas, tmpdir)
    return {"triton": triton.__version__, "rows": rows, "guided_step_keys": _guided_step_keys()}


# ------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def report() -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what the launcher does; silences Triton 3.9's warning
    res = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"compiling for sm_90 failed:\n{res.stderr[-4000:]}"
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    if "skip" in rep:
        pytest.skip(rep["skip"])
    return rep


def _rows(report: dict, kernel: str) -> dict:
    rows = {name: row for name, row in report["rows"].items() if name.startswith(kernel + " ")}
    assert rows, f"no {kernel} variants compiled"
    return rows


def _table(rows: dict) -> str:
    return "\n".join(f"  {name}: {row}" for name, row in rows.items())


@pytest.mark.parametrize("kernel", ["step", "dpm", "normal", "guided", "rescale"])
def test_no_spills_and_few_registers(report, kernel):
    rows = _rows(report, kernel)
    bad = {n: r for n, r in rows.items() if r["spill_stores"] or r["spill_loads"] or r["regs"] > MAX_REGS}
    assert not bad, f"Triton {report['triton']}, sm_90: spills or more than {MAX_REGS} registers:\n{_table(bad)}"


@pytest.mark.parametrize("kernel", ["step", "normal", "guided"])
def test_one_philox_per_group_whatever_the_size(report, kernel):
    """At most one Philox (20 mul.hi) per group a thread owns: none of a group's 4 normals is made twice.
    At least half of that: the rounds are really there (a few of them only see uniform values)."""
    rows = {n: r for n, r in _rows(report, kernel).items() if " dpm " not in n}  # a guided DPM step has no noise
    bad = {n: r for n, r in rows.items()
           if not MULHI_PER_GROUP // 2 * r["groups_per_thread"] <= r["mulhi"] <= MULHI_PER_GROUP * r["groups_per_thread"]}
    assert not bad, f"Triton {report['triton']}, sm_90: Philox not run once per group of 4 normals:\n{_table(bad)}"


def test_aligned_samples_get_128_bit_loads(report):
    """A multiple of 16 per sample keeps the vector loads (the size that is not cannot have them:
    its samples start at addresses that are not 16-byte aligned)."""
    rows = {**_rows(report, "step"), **_rows(report, "dpm"), **_rows(report, "guided"), **_rows(report, "rescale")}
    assert all(r["v4_loads"] > 0 for n, r in rows.items() if "3x32x32" in n), _table(rows)


def test_dpm_variants_make_no_noise(report):
    """The DPM-Solver++ step has no noise: no Philox rounds compiled in (a HAS_NOISE leak would add them)."""
    rows = _rows(report, "dpm")
    assert all(r["mulhi"] == 0 for r in rows.values()), _table(rows)


def test_rescale_float64_is_correctly_rounded(report):
    """The reduction's float64 '/' and sqrt compile to div.rn.f64 / sqrt.rn.f64, and nothing approximate."""
    row = _rows(report, "rescale")["rescale finish"]
    assert row["rn_f64"] >= 3 and row["approx"] == 0, row


def test_guided_step_compiles_once_whatever_w_and_phi(report):
    """w, phi and 1 - phi are runtime fp32 arguments: one compile key for w = 7.5, 2, 0.0, 16, 3 (ints too)."""
    assert len(report["guided_step_keys"]) == 1, "\n".join(report["guided_step_keys"])


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    print(json.dumps(_report()))
