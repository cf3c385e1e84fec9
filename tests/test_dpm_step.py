"""The DPM-Solver++(2M) step through dispatch.Step (every backend) against reference.dpm_solver_step.

The contract the engine builds on: ``step(x, out, j, first_index, x0_prev) -> (x_next, x0)``;
a 'dpm++2m' plan needs need_x0=True, reads x0_prev on its second-order steps and returns this
step's clipped x0 (the next step's x0_prev) as a fresh tensor, without touching its inputs.
"""
from __future__ import annotations

import pytest
import torch

from fastddim import reference
from fastddim.dispatch import available_backends, make_step
from fastddim.plan import make_dpm_plan
from fastddim.schedule import Schedule

SCHEDULE = Schedule.linear()


def dpm_plan(S=6, **kw):
    return make_dpm_plan(SCHEDULE, S, **kw)


def data(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, out, x0_prev = (torch.randn(shape, generator=g) for _ in range(3))
    return x, out.to(dtype), x0_prev


def test_torch_step_is_the_reference_and_leaves_inputs_alone():
    plan = dpm_plan()
    assert plan.orders[0] == 1 and plan.orders[2] == 2
    step = make_step("torch", plan, 0, need_x0=True)
    x, out, x0_prev = data((2, 3, 4, 4))
    keep = [t.clone() for t in (x, out, x0_prev)]
    for j in (0, 2):
        got = step(x, out, j, None, x0_prev)
        want = reference.dpm_solver_step(x, out, x0_prev if plan.orders[j] == 2 else None, plan, j)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert got[1] is not x0_prev and got[1].data_ptr() != x0_prev.data_ptr()
    assert all(torch.equal(a, b) for a, b in zip((x, out, x0_prev), keep))
    # second order really reads x0_prev: another one gives another x_next
    assert not torch.equal(step(x, out, 2, None, x0_prev)[0], step(x, out, 2, None, x0_prev + 1)[0])


def test_first_order_step_ignores_x0_prev():
    plan = dpm_plan()
    step = make_step("torch", plan, 0, need_x0=True)
    x, out, x0_prev = data((2, 5))
    assert torch.equal(step(x, out, 0)[0], step(x, out, 0, None, x0_prev + 3)[0])


def test_low_dtype_copy():
    plan = dpm_plan()
    step = make_step("torch", plan, 0, need_x0=True, low_dtype=torch.bfloat16)
    x, out, x0_prev = data((2, 5))
    prev, x0, low = step(x, out, 2, None, x0_prev)
    assert low.dtype == torch.bfloat16 and torch.equal(low, prev.to(torch.bfloat16))


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_dpm_needs_x0(backend):
    with pytest.raises(ValueError, match="need_x0 must be True"):
        make_step(backend, dpm_plan(), 0, need_x0=False)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_second_order_step_without_x0_prev_refused(backend):
    step = make_step(backend, dpm_plan(), 0, need_x0=True)
    x, out, _ = data((2, 5))
    with pytest.raises(ValueError, match="x0_prev"):
        step(x, out, 2)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fused_run_threads_x0_as_the_torch_backend(backend):
    """A whole run, each step's x0 passed to the next as x0_prev, on a fused backend equals the torch
    backend bit for bit on the CPU (both kernels round as the reference there)."""
    reason = available_backends(torch.device("cpu"))[backend]
    if reason is not None:
        pytest.skip(reason)
    plan = dpm_plan(S=6, prediction_type="v_prediction", thresholding=True, sample_max_value=2.0)
    x_T = data((2, 3, 5, 7))[0]

    def run(step):
        x, x0 = x_T, None
        for j in range(plan.steps):
            x, x0 = step(x, torch.tanh(0.3 * x), j, None, x0)
        return x

    assert torch.equal(run(make_step(backend, plan, 0)), run(make_step("torch", plan, 0)))
