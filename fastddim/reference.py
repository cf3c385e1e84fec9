"""The reference path: the paper's equations in plain PyTorch, one op at a time.

This is the oracle every fused kernel is tested against, the baseline of the benchmarks and
the ``backend="torch"`` path. It is written to round exactly as diffusers' ``DDIMScheduler.step``
does on the CPU in float32 (each tensor op rounded separately, in the same order, with the
per-step scalars from the plan's host table), so it is bit-identical to it there.

Notation (paper eq. 12): a_t is the cumulative product of (1 - beta), sigma the noise scale,
    x0    = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

from .noise import normal_like_batch
from .plan import Plan

__all__ = [
    "predict_x0", "predict_x0_eps", "threshold", "ddim_step", "ddim_sample", "dpm_solver_step", "dpm_solver_sample",
    "InvertPoint", "invert_points", "ddim_invert_step", "refine_invert_step", "invert_along", "ddim_invert",
]


def predict_x0(x: torch.Tensor, out: torch.Tensor, sqrt_a: float, sqrt_1ma: float, prediction_type: str) -> torch.Tensor:
    """x0 from a model output. x, out: (B, *shape) float32. Returns (B, *shape)."""
    if prediction_type == "epsilon":
        return (x - sqrt_1ma * out) / sqrt_a
    if prediction_type == "sample":
        return out
    if prediction_type == "v_prediction":
        return sqrt_a * x - sqrt_1ma * out
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def predict_x0_eps(
    x: torch.Tensor, out: torch.Tensor, sqrt_a: float, sqrt_1ma: float, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 and eps from a model output. x, out: (B, *shape) float32. Returns two (B, *shape)."""
    x0 = predict_x0(x, out, sqrt_a, sqrt_1ma, prediction_type)
    if prediction_type == "epsilon":
        return x0, out
    if prediction_type == "sample":
        return x0, (x - sqrt_a * out) / sqrt_1ma
    return x0, sqrt_a * out + sqrt_1ma * x


def threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Imagen): per sample, s = clamp(quantile(|x0|, ratio), 1, max_value),
    then x0 = clamp(x0, -s, s) / s. x0: (B, *shape), computed in float32 as diffusers does."""
    b = x0.shape[0]
    flat = x0.float().reshape(b, int(np.prod(x0.shape[1:])))
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


def _check_solver(plan: Plan, solver: str) -> None:
    # the two solvers' tables have the same width: a plan of the other kind would run silently
    if plan.solver != solver:
        raise ValueError(f"plan is for solver {plan.solver!r}, not {solver!r}")


def _clip(x0: torch.Tensor, plan: Plan) -> torch.Tensor:
    if plan.thresholding:
        return threshold(x0, plan.dynamic_thresholding_ratio, plan.sample_max_value)
    if plan.clip_sample:
        return x0.clamp(-plan.clip_sample_range, plan.clip_sample_range)
    if plan.sigma_hat:  # the paper code's DDPM clamps x0 to the data range
        return x0.clamp(-1.0, 1.0)
    return x0


def ddim_step(
    x: torch.Tensor, out: torch.Tensor, plan: Plan, j: int, noise: torch.Tensor | None = None,
    out_eps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step j of the plan: x_t -> x_prev.

    Args:
        x: (B, *shape) float32 state x_t at t = plan.timesteps[j].
        out: (B, *shape) model output at (x, t) (any float dtype; used in float32).
        noise: (B, *shape) standard normal z; required when plan.noise[j].
        out_eps: CFG++ (``guidance.cfgpp_outputs``): the output the direction's eps is formed
            from (the unconditional one), while x0 comes from ``out`` (the guided one). None: both
            from ``out``. Not with use_clipped_model_output or sigma_hat (they replace that eps).
    Returns:
        (x_prev, x0): the new state and the (clipped) x0 prediction, both (B, *shape) float32.
    """
    _check_solver(plan, "ddim")
    sqrt_a, sqrt_1ma, c_x0, c_eps, c_xt, sigma = plan.scalars[j]
    out = out.float()
    x0, eps = predict_x0_eps(x, out, sqrt_a, sqrt_1ma, plan.prediction_type)
    if out_eps is not None:
        if plan.use_clipped_model_output or plan.sigma_hat:
            raise ValueError("out_eps (CFG++) cannot be used with use_clipped_model_output or sigma_hat")
        eps = predict_x0_eps(x, out_eps.float(), sqrt_a, sqrt_1ma, plan.prediction_type)[1]
    x0 = _clip(x0, plan)
    if plan.use_clipped_model_output:
        eps = (x - sqrt_a * x0) / sqrt_1ma
    if plan.sigma_hat:
        prev = c_x0 * x0 + c_xt * x
    else:
        prev = c_x0 * x0 + c_eps * eps
    if plan.noise[j]:
        if noise is None:
            raise ValueError(f"step {j} adds noise: pass noise")
        prev = prev + sigma * noise
    return prev, x0


def ddim_sample(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    plan: Plan,
    seed: int = 0,
    first_index: int = 0,
) -> torch.Tensor:
    """The whole loop, plainly. model_fn(x, t) -> output tensor with t an int64 (B,) tensor.

    x_T: (B, *shape) float32; samples first_index .. first_index + B - 1 (for their noise).
    Returns x_0: (B, *shape) float32.
    """
    x = x_T
    for j, t in enumerate(plan.timesteps):
        out = model_fn(x, torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device))
        z = normal_like_batch(x, seed, first_index, j + 1) if plan.noise[j] else None
        x, _ = ddim_step(x, out, plan, j, z)
    return x


def dpm_solver_step(
    x: torch.Tensor, out: torch.Tensor, prev_x0: torch.Tensor | None, plan: Plan, j: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step j of a DPM-Solver++(2M) plan (``plan.make_dpm_plan``): x at sigmas[j] -> sigmas[j + 1].

    Op for op as diffusers' ``DPMSolverMultistepScheduler`` (``dpmsolver++``, ``midpoint``), with
    the scalars of ``plan.DPM_COLUMNS``:
        x0 = clip(x0 from out, as a DDIM step forms it with (alpha_s, sigma_s))
        order 1: x_next = c_x * x - c_d0 * x0
        order 2: x_next = (c_x * x - c_d0 * x0) - c_d1 * (r_inv * (x0 - prev_x0))

    Args:
        x: (B, *shape) float32 state at t = plan.timesteps[j].
        out: (B, *shape) model output at (x, t) (any float dtype; used in float32).
        prev_x0: (B, *shape) float32 x0 returned by step j - 1; read only on second-order steps.
    Returns:
        (x_next, x0): the new state and this step's (clipped) x0, both (B, *shape) float32.
    """
    _check_solver(plan, "dpm++2m")
    alpha_s, sigma_s, c_x, c_d0, c_d1, r_inv = plan.scalars[j]
    x0 = _clip(predict_x0(x, out.float(), alpha_s, sigma_s, plan.prediction_type), plan)
    x_next = c_x * x - c_d0 * x0
    if plan.orders[j] == 2:
        if prev_x0 is None:
            raise ValueError(f"step {j} is second order: pass prev_x0, the x0 of step {j - 1}")
        x_next = x_next - c_d1 * (r_inv * (x0 - prev_x0))
    return x_next, x0


def dpm_solver_sample(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_T: torch.Tensor, plan: Plan
) -> torch.Tensor:
    """The DPM-Solver++(2M) loop, plainly (deterministic: no noise). model_fn(x, t) -> output
    tensor with t an int64 (B,) tensor. x_T: (B, *shape) float32. Returns x_0: (B, *shape) float32."""
    x, x0 = x_T, None
    for j, t in enumerate(plan.timesteps):
        out = model_fn(x, torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device))
        x, x0 = dpm_solver_step(x, out, x0, plan, j)
    return x


# ------------------------------------------------------------------------------------ inversion
class InvertPoint(NamedTuple):
    """One inversion step: x at level src -> x at level dst (each a (sqrt a, sqrt(1 - a)) pair of
    exact float32 values, computed as diffusers computes its scalars). The model is told t_eval and
    its output is converted to x0 and eps with the level ``conv``; ``clip`` applies the plan's x0
    clipping. t_dst is the target's timestep (where refinement evaluates)."""

    t_eval: int
    t_dst: int
    conv: tuple[float, float]
    src: tuple[float, float]
    dst: tuple[float, float]
    clip: bool


def _sqrt_pair(a: torch.Tensor) -> tuple[float, float]:
    """(a ** 0.5, (1 - a) ** 0.5) of a 0-dim float32 CPU tensor, with diffusers' float32 torch ops."""
    return float(a**0.5), float((1 - a) ** 0.5)


def invert_points(plan: Plan, schedule_ac: torch.Tensor, convention: str) -> list[InvertPoint]:
    """The inversion's steps, from the clean image up to t_S (made once, on the host).

    The decode plan's points in increasing noise are p_0 (the final alpha: the clean image),
    p_1 = t_1 (smallest timestep) ... p_S = t_S. Step k goes p_{k-1} -> p_k.

    - ``"source"`` (the paper's Euler encoder): the model is evaluated at the source timestep and
      its output converted with that level. The clean image has no timestep of its own: its step
      evaluates at t_1 (and converts with a_{t_1}).
    - ``"target"`` (diffusers' ``DDIMInverseScheduler``, op for op): the model is evaluated at the
      target timestep, its output converted to x0 and eps with the *source* level (the level x is
      at), x0 clipped as the plan says (clip_sample, thresholding), then
      ``x_dst = sqrt(a_dst) x0 + sqrt(1 - a_dst) eps``. One exception: a ``"sample"`` prediction
      on the clean image (a_src = 1) would divide by sqrt(1 - a_src) = 0 (diffusers returns NaN
      there); fastddim converts that step's output with the level of t_eval and stays finite.
    """
    ts = list(reversed(plan.timesteps))  # increasing
    ac = schedule_ac.to(torch.float32)
    levels = [_sqrt_pair(torch.tensor(plan.final_alpha_cumprod, dtype=torch.float32))]
    levels += [_sqrt_pair(ac[t]) for t in ts]
    target = convention == "target"
    out = []
    for k in range(1, len(levels)):
        t_eval = ts[k - 1] if target or k == 1 else ts[k - 2]
        conv = levels[k - 1] if target or k > 1 else levels[1]
        if target and conv[1] == 0 and plan.prediction_type == "sample":
            conv = levels[k]
        out.append(InvertPoint(t_eval, ts[k - 1], conv, levels[k - 1], levels[k], target))
    return out


def ddim_invert_step(x: torch.Tensor, out: torch.Tensor, p: InvertPoint, plan: Plan) -> torch.Tensor:
    """One deterministic step with increasing noise: x (B, *shape) at p.src -> (B, *shape) at p.dst.

    x0 and eps come from the model output converted with the level p.conv. When that is not x's
    own level (the paper's first step, refinement) x0 is re-derived from eps at x's level,
    x0 = (x - sqrt(1 - a_src) eps) / sqrt(a_src). Then (p.clip) the plan's clipping of x0, and
    x_dst = sqrt(a_dst) x0 + sqrt(1 - a_dst) eps, each float32 tensor op rounded as diffusers'.
    """
    x0, eps = predict_x0_eps(x, out.float(), *p.conv, plan.prediction_type)
    if p.conv != p.src:
        x0 = (x - p.src[1] * eps) / p.src[0]
    if p.clip:
        x0 = _clip(x0, plan)
    return p.dst[0] * x0 + p.dst[1] * eps


def refine_invert_step(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_src: torch.Tensor,
    x_dst: torch.Tensor,
    p: InvertPoint,
    plan: Plan,
    iters: int,
) -> torch.Tensor:
    """Fixed-point iterations that make the decoder's step from x_dst land on x_src.

    The deterministic decoder step from t_dst is ``x_src = D(x_dst, eps(x_dst, t_dst))``, linear
    in x_dst for a fixed eps, so ``x_dst = ddim_invert_step(x_src, eps(x_dst, t_dst), ...)`` is
    its exact inverse: a fixed point. Each iteration evaluates eps at the current guess and at the
    target timestep (one model call), converted with the target's level, unclipped (the inverse of
    the unclipped decoder). The decoder started from guess j misses x_src by exactly
    ``sqrt(a_src / a_dst) * (x^(j) - x^(j+1))``, so successive guesses that agree mean an exact
    inverse. The iteration is not guaranteed to contract (large steps near the data can
    oscillate); in practice one iteration removes most of the Euler encoder's error.

    x_src, x_dst: (B, *shape), the point at p.src and the first guess at p.dst. Returns the last
    guess, (B, *shape).
    """
    q = p._replace(t_eval=p.t_dst, conv=p.dst, clip=False)
    for _ in range(iters):
        out = model_fn(x_dst, torch.full((x_dst.shape[0],), q.t_eval, dtype=torch.int64, device=x_dst.device))
        x_dst = ddim_invert_step(x_src, out, q, plan)
    return x_dst


def invert_along(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    points: list[InvertPoint],
    plan: Plan,
    refine: int = 0,
) -> torch.Tensor:
    """Encode x (B, *shape) float32 through ``points`` (``invert_points``). Returns (B, *shape)."""
    for p in points:
        out = model_fn(x, torch.full((x.shape[0],), p.t_eval, dtype=torch.int64, device=x.device))
        x = refine_invert_step(model_fn, x, ddim_invert_step(x, out, p, plan), p, plan, refine)
    return x


def ddim_invert(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    plan: Plan,
    schedule_ac: torch.Tensor,
    convention: str = "source",
    refine: int = 0,
) -> torch.Tensor:
    """Encode x0 (B, *shape) to x_T (B, *shape) along the plan, deterministically.

    ``convention`` as in ``invert_points``; ``refine`` > 0 adds that many fixed-point iterations
    per step (``refine_invert_step``).
    """
    return invert_along(model_fn, x0.float(), invert_points(plan, schedule_ac, convention), plan, refine)
