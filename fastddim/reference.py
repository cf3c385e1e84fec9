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

from typing import Callable

import numpy as np
import torch

from .noise import normal_like_batch
from .plan import Plan

__all__ = ["predict_x0_eps", "threshold", "ddim_step", "ddim_invert_step", "refine_invert_step", "ddim_sample", "ddim_invert"]


def predict_x0_eps(
    x: torch.Tensor, out: torch.Tensor, sqrt_a: float, sqrt_1ma: float, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 and eps from a model output. x, out: (B, *shape) float32. Returns two (B, *shape)."""
    if prediction_type == "epsilon":
        return (x - sqrt_1ma * out) / sqrt_a, out
    if prediction_type == "sample":
        return out, (x - sqrt_a * out) / sqrt_1ma
    if prediction_type == "v_prediction":
        return sqrt_a * x - sqrt_1ma * out, sqrt_a * out + sqrt_1ma * x
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Imagen): per sample, s = clamp(quantile(|x0|, ratio), 1, max_value),
    then x0 = clamp(x0, -s, s) / s. x0: (B, *shape), computed in float32 as diffusers does."""
    b = x0.shape[0]
    flat = x0.float().reshape(b, int(np.prod(x0.shape[1:])))
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


def _clip(x0: torch.Tensor, plan: Plan) -> torch.Tensor:
    if plan.thresholding:
        return threshold(x0, plan.dynamic_thresholding_ratio, plan.sample_max_value)
    if plan.clip_sample:
        return x0.clamp(-plan.clip_sample_range, plan.clip_sample_range)
    if plan.sigma_hat:  # the paper code's DDPM clamps x0 to the data range
        return x0.clamp(-1.0, 1.0)
    return x0


def ddim_step(
    x: torch.Tensor, out: torch.Tensor, plan: Plan, j: int, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step j of the plan: x_t -> x_prev.

    Args:
        x: (B, *shape) float32 state x_t at t = plan.timesteps[j].
        out: (B, *shape) model output at (x, t) (any float dtype; used in float32).
        noise: (B, *shape) standard normal z; required when plan.noise[j].
    Returns:
        (x_prev, x0): the new state and the (clipped) x0 prediction, both (B, *shape) float32.
    """
    sqrt_a, sqrt_1ma, c_x0, c_eps, c_xt, sigma = plan.scalars[j]
    out = out.float()
    x0, eps = predict_x0_eps(x, out, sqrt_a, sqrt_1ma, plan.prediction_type)
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


# ------------------------------------------------------------------------------------ inversion
def invert_points(plan: Plan, schedule_ac: torch.Tensor, convention: str) -> list[tuple[float, float, int]]:
    """The inversion's (a_src, a_dst, t_eval) per step, from the clean image up to t_S.

    The decode plan's points in increasing noise are p_0 (the final alpha: the clean image),
    p_1 = t_1 (smallest timestep) ... p_S = t_S. Step k goes p_{k-1} -> p_k. The model is evaluated
    at the source timestep (``convention="source"``, the paper's Euler encoder) or at the target
    (``"target"``, diffusers' DDIMInverseScheduler and null-text inversion). The clean image has
    no timestep of its own: its step evaluates at t_1 under both conventions.
    """
    ts = list(reversed(plan.timesteps))  # increasing
    a = [plan.final_alpha_cumprod] + [float(schedule_ac[t]) for t in ts]
    out = []
    for k in range(1, len(a)):
        t_eval = ts[k - 1] if convention == "target" or k == 1 else ts[k - 2]
        out.append((a[k - 1], a[k], t_eval))
    return out


def ddim_invert_step(
    x: torch.Tensor, out: torch.Tensor, a_src: float, a_dst: float, a_eval: float, prediction_type: str
) -> torch.Tensor:
    """One deterministic step with increasing noise: x at a_src -> x at a_dst.

    eps comes from the model output (converted with a_eval, the level the model was told);
    x0 = (x - sqrt(1 - a_src) eps) / sqrt(a_src); x_dst = sqrt(a_dst) x0 + sqrt(1 - a_dst) eps.
    Computed in float64 scalars rounded to float32 tensor ops. Shapes: (B, *shape).
    """
    out = out.float()
    _, eps = predict_x0_eps(x, out, a_eval**0.5, (1 - a_eval) ** 0.5, prediction_type)
    x0 = (x - (1 - a_src) ** 0.5 * eps) / a_src**0.5
    return a_dst**0.5 * x0 + (1 - a_dst) ** 0.5 * eps


def refine_invert_step(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_src: torch.Tensor,
    x_dst: torch.Tensor,
    a_src: float,
    a_dst: float,
    t_dst: int,
    a_eval: float,
    prediction_type: str,
    iters: int,
) -> torch.Tensor:
    """Fixed-point iterations that make the decoder's step from x_dst land on x_src.

    The deterministic decoder step from t_dst is ``x_src = D(x_dst, eps(x_dst, t_dst))``, linear
    in x_dst for a fixed eps, so ``x_dst = ddim_invert_step(x_src, eps(x_dst, t_dst), ...)`` is
    its exact inverse: a fixed point. Each iteration evaluates eps at the current guess and at the
    target timestep (one model call). The decoder started from guess j misses x_src by exactly
    ``sqrt(a_src / a_dst) * (x^(j) - x^(j+1))``, so successive guesses that agree mean an exact
    inverse. The iteration is not guaranteed to contract (large steps near the data can
    oscillate); in practice one iteration removes most of the Euler encoder's error.

    x_src, x_dst: (B, *shape), the point at a_src and the first guess at a_dst; a_eval:
    alphas_cumprod[t_dst]. Returns the last guess, (B, *shape).
    """
    for _ in range(iters):
        out = model_fn(x_dst, torch.full((x_dst.shape[0],), t_dst, dtype=torch.int64, device=x_dst.device))
        x_dst = ddim_invert_step(x_src, out, a_src, a_dst, a_eval, prediction_type)
    return x_dst


def ddim_invert(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    plan: Plan,
    schedule_ac: torch.Tensor,
    convention: str = "source",
    refine: int = 0,
) -> torch.Tensor:
    """Encode x0 (B, *shape) to x_T (B, *shape) along the plan, deterministically.

    ``refine`` > 0 adds that many fixed-point iterations per step (``refine_invert_step``).
    """
    x = x0.float()
    for (a_src, a_dst, t_eval), t_dst in zip(invert_points(plan, schedule_ac, convention), reversed(plan.timesteps)):
        out = model_fn(x, torch.full((x.shape[0],), t_eval, dtype=torch.int64, device=x.device))
        x_dst = ddim_invert_step(x, out, a_src, a_dst, float(schedule_ac[t_eval]), plan.prediction_type)
        x = refine_invert_step(model_fn, x, x_dst, a_src, a_dst, int(t_dst), float(schedule_ac[t_dst]),
                               plan.prediction_type, refine)
    return x
