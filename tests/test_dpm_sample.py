"""DPM-Solver++(2M) through the engine: ``fastddim.sample(..., solver="dpm++2m")`` (prepare/Run,
the plan cache, batching, generate, interpolate, invert's refusal, the CLI's options), against
diffusers' DPMSolverMultistepScheduler loop with a tiny random UNet2DModel.

CPU: ``backend="torch"`` equals the diffusers loop bit for bit (torch.equal); the fused CPU
backends (cpp, Triton under the interpreter) within 1e-4 relative of it. The GPU tests (strict
graph=True) are in tests/test_graph.py.
"""
from __future__ import annotations

import os

import pytest
import torch

import fastddim
from fastddim import engine
from fastddim.dispatch import available_backends

diffusers = pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler  # noqa: E402
from test_dpm_solver import CONFIGS  # noqa: E402  (the issue's parity cells: one home, the reference's tests)

SHAPE = (3, 8, 8)  # the tiny_unet fixture's samples
SCHED = fastddim.Schedule.linear()
CPU_FUSED = [b for b in ("cpp", "triton") if available_backends(torch.device("cpu"))[b] is None]


def diffusers_sample(sched, unet, S: int, x_T: torch.Tensor) -> torch.Tensor:
    """The pipeline loop: x_T * init_noise_sigma, then model and step per timestep."""
    sched.set_timesteps(S)
    x = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x


def rowwise(x, t):
    """A cheap model whose rows do not interact: batch invariance is exact with it."""
    return torch.tanh(x.roll(1, dims=1) * (t.view(-1, *[1] * (x.ndim - 1)).float() / 1000 + 0.5))


def x_T(n=2, seed=3):
    return fastddim.noise.normal(seed, 0, n, 0, SHAPE)


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("S", [5, 10, 20])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_sample_equals_diffusers_bit_for_bit(tiny_unet, name, S):
    sched = DPMSolverMultistepScheduler(**CONFIGS[name])
    z = x_T()
    with torch.no_grad():
        want = diffusers_sample(sched, tiny_unet, S, z.clone())
    got = fastddim.sample(tiny_unet, steps=S, x_T=z, backend="torch", progress=False, **fastddim.from_diffusers(sched))
    assert fastddim.info()["last_run"]["solver"] == "dpm++2m"
    assert torch.equal(got, want), f"max |diff| {(got - want).abs().max():.3g}"


def test_sample_at_50_steps_equals_diffusers(tiny_unet):
    sched = DPMSolverMultistepScheduler(**CONFIGS["v-zero_snr-trailing"])
    z = x_T(1)
    with torch.no_grad():
        want = diffusers_sample(sched, tiny_unet, 50, z.clone())
    got = fastddim.sample(tiny_unet, steps=50, x_T=z, backend="torch", progress=False, **fastddim.from_diffusers(sched))
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("name", ["eps-linear-linspace", "v-zero_snr-trailing", "thresholding", "karras"])
def test_fused_cpu_backends_within_1e4_of_diffusers(tiny_unet, name, backend):
    sched = DPMSolverMultistepScheduler(**CONFIGS[name])
    z = x_T()
    with torch.no_grad():
        want = diffusers_sample(sched, tiny_unet, 10, z.clone())
    got = fastddim.sample(tiny_unet, steps=10, x_T=z, backend=backend, progress=False, **fastddim.from_diffusers(sched))
    assert fastddim.info()["last_run"]["backend"] == backend
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-4, f"{backend} {name}: relative error {err:.3g}"


# ----------------------------------------------------------------------------- the engine
def test_trajectory_passes_each_steps_x0_to_the_next(monkeypatch):
    """The Run hands step j's x0 to step j + 1 (x0_prev), and the callback sees it."""
    run = engine.prepare(rowwise, 2, 6, schedule=SCHED, shape=SHAPE, backend="torch", solver="dpm++2m")
    assert run.step.need_x0 and run.plan.orders == (1, 2, 2, 2, 2, 1)
    seen, real = [], type(run.step).__call__

    def spy(step, x, out, j, first_index=None, x0_prev=None, out_uncond=None):
        res = real(step, x, out, j, first_index, x0_prev, out_uncond)
        seen.append((j, x0_prev, res[1]))
        return res

    monkeypatch.setattr(type(run.step), "__call__", spy)
    run.sample()
    assert seen[0][1] is None
    for (_, _, x0), (j, x0_prev, _) in zip(seen, seen[1:]):
        assert x0_prev is x0, f"step {j} did not get step {j - 1}'s x0"


def test_callback_gets_x_and_x0_of_every_step():
    steps = []
    fastddim.sample(rowwise, 2, 5, schedule=SCHED, shape=SHAPE, backend="torch", solver="dpm++2m", progress=False,
                    callback=lambda j, t, x, x0: steps.append((j, t, x0 is not None)))
    plan = engine.plan_for(SCHED, 5, 0.0, None, {}, "dpm++2m")
    assert steps == [(j, t, True) for j, t in enumerate(plan.timesteps)]


def test_plan_cache_keys_on_the_solver():
    ddim = engine.plan_for(SCHED, 10, 0.0, "trailing", {})
    dpm = engine.plan_for(SCHED, 10, 0.0, "trailing", {}, "dpm++2m")
    assert (ddim.solver, dpm.solver) == ("ddim", "dpm++2m")
    assert engine.plan_for(SCHED, 10, 0.0, "trailing", {}, "dpm++2m") is dpm
    assert engine.plan_for(SCHED, 10, 0.0, "trailing", {}) is ddim
    karras = engine.plan_for(SCHED, 10, 0.0, None, {"use_karras_sigmas": True}, "dpm++2m")
    linspace = engine.plan_for(SCHED, 10, 0.0, None, {}, "dpm++2m")
    assert karras.timesteps != linspace.timesteps and karras.sigmas[1:] != linspace.sigmas[1:]


@pytest.mark.parametrize("backend", ["torch", *CPU_FUSED])
def test_batch_invariance(backend):
    kw = dict(steps=6, shape=SHAPE, schedule=SCHED, backend=backend, progress=False, solver="dpm++2m")
    alone = fastddim.sample(rowwise, n=3, first_index=2, **kw)
    in_one = fastddim.sample(rowwise, n=8, batch_size=8, **kw)[2:5]
    in_many = fastddim.sample(rowwise, n=8, batch_size=3, **kw)[2:5]  # 2..4 split over two batches, one padded
    assert torch.equal(alone, in_one) and torch.equal(alone, in_many)


def test_interpolate_passes_the_solver_through():
    z0, z1 = x_T(2)
    kw = dict(shape=SHAPE, schedule=SCHED, backend="torch", progress=False, steps=5)
    path = fastddim.interpolate(rowwise, z0, z1, num=3, solver="dpm++2m", **kw)
    ends = fastddim.sample(rowwise, x_T=torch.stack([z0, z1]), solver="dpm++2m", **kw)
    assert torch.equal(path[[0, 2]], ends)
    assert not torch.equal(path[[0, 2]], fastddim.sample(rowwise, x_T=torch.stack([z0, z1]), **kw))


# ----------------------------------------------------------------------------- refusals
class Counting:
    """A model that counts its calls: a refusal must come before any."""

    def __init__(self):
        self.calls, self.sample_shape, self.schedule = 0, SHAPE, SCHED

    def __call__(self, x, t):
        self.calls += 1
        return rowwise(x, t)


@pytest.mark.parametrize("kw,match", [
    (dict(eta=1.0), "eta=1.0: eta is a DDIM option"),
    (dict(eta="sigma_hat"), "eta='sigma_hat'"),
    (dict(spacing="uniform"), "spacing must be one of .* for solver 'dpm\\+\\+2m'"),
    (dict(spacing="quad"), "spacing must be one of"),
    (dict(use_clipped_model_output=True), "use_clipped_model_output: not an option of solver='dpm\\+\\+2m': a DDIM option"),
    (dict(set_alpha_to_one=False), "set_alpha_to_one: not an option of solver='dpm\\+\\+2m'"),
    (dict(use_karras_sigmas=True, spacing="trailing"), "use_karras_sigmas"),
    (dict(solver_order=3), "solver_order"),
])
def test_ddim_only_arguments_are_refused_before_the_model_runs(kw, match):
    m = Counting()
    with pytest.raises(ValueError, match=match):
        fastddim.sample(m, 2, 5, backend="torch", solver="dpm++2m", **kw)
    assert m.calls == 0


@pytest.mark.parametrize("kw,match", [
    (dict(solver="dpm"), "solver must be one of \\('ddim', 'dpm\\+\\+2m'\\)"),
    (dict(use_karras_sigmas=True), "use_karras_sigmas: not an option of solver='ddim': a DPM-Solver\\+\\+ option"),
    (dict(lower_order_final=False), "lower_order_final: not an option of solver='ddim'"),
])
def test_dpm_only_arguments_with_ddim_are_refused(kw, match):
    m = Counting()
    with pytest.raises(ValueError, match=match):
        fastddim.sample(m, 2, 5, backend="torch", **kw)
    assert m.calls == 0


def test_invert_refuses_the_dpm_solver_naming_it():
    m = Counting()
    with pytest.raises(ValueError, match="solver='dpm\\+\\+2m': invert runs the DDIM ODE only"):
        fastddim.invert(m, x_T(), 5, solver="dpm++2m")
    with pytest.raises(ValueError, match="solver='dpm\\+\\+2m'"):  # what from_diffusers(dpm) brings along
        fastddim.invert(m, x_T(), 5, **fastddim.from_diffusers(DPMSolverMultistepScheduler()))
    assert m.calls == 0


# ----------------------------------------------------------------------------- generate
def test_generate_is_the_same_bytes_in_any_shards_and_batches(tmp_path):
    """Byte identity across process counts rests on sample i being a function of (seed, i): shards made
    in another order and batch size (what another world size does) give the same file."""
    from fastddim.generate import generate

    kw = dict(solver="dpm++2m", use_karras_sigmas=True, progress=False, log=lambda s: None, backend="torch")
    model = Counting()
    a = generate(model, 11, 5, str(tmp_path / "a"), shard_size=4, batch_size=4, **kw)
    b = generate(model, 11, 5, str(tmp_path / "b"), shard_size=4, batch_size=3, **kw)
    assert a["solver"] == "dpm++2m" and a["config"]["plan"]["solver"] == "dpm++2m"
    assert (tmp_path / "a" / "samples.npz").read_bytes() == (tmp_path / "b" / "samples.npz").read_bytes()
    with pytest.raises(ValueError, match="configuration"):  # a DDIM run in the same folder is another job
        generate(model, 11, 5, str(tmp_path / "a"), shard_size=4, progress=False, log=lambda s: None, backend="torch")


def test_generate_with_two_processes_equals_one(tmp_path):
    """torchrun with two processes (gloo) writes the file one process writes."""
    import subprocess
    import sys

    (tmp_path / "m.py").write_text(
        "import torch\nfrom fastddim import Schedule\n"
        "class M(torch.nn.Module):\n"
        "    sample_shape, schedule = (3, 6, 6), Schedule.linear()\n"
        "    def forward(self, x, t):\n"
        "        return torch.tanh(x.roll(1, dims=1) * (t.float().view(-1, 1, 1, 1) / 1000 + 0.5))\n"
        "def make():\n    return M()\n")
    args = ["-m", "fastddim", "generate", "-n", "10", "--steps", "5", "--shard-size", "3", "--solver", "dpm++2m",
            "--karras", "--device", "cpu", "--model", f"{tmp_path / 'm.py'}:make"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], capture_output=True, text=True,
                         env=env, timeout=240)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=240)
    assert two.returncode == 0, two.stderr
    assert "2 process(es)" in two.stdout
    assert (tmp_path / "one" / "samples.npz").read_bytes() == (tmp_path / "two" / "samples.npz").read_bytes()
