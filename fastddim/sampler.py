"""The public sampling functions: ``sample``, ``invert``, ``interpolate``.

Every argument is checked before the model is called once; the loop itself reads only the
host-side plan (no device sync per step: the finiteness check is accumulated on the device and
read once per batch).
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Callable, Sequence

import torch

from . import reference
from .dispatch import make_step, resolve_backend
from .checks import check_seed
from .noise import normal
from .plan import Plan, make_plan
from .schedule import Schedule

__all__ = ["sample", "invert", "interpolate", "info"]

log = logging.getLogger("fastddim")

_LAST_RUN: dict[str, Any] = {}

# Keyword arguments that shape the plan (shared by sample, invert and interpolate).
PLAN_KWARGS = (
    "spacing", "steps_offset", "set_alpha_to_one", "prediction_type", "clip_sample",
    "clip_sample_range", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
    "use_clipped_model_output",
)


def info() -> dict[str, Any]:
    """What fastddim can use here and what the last call ran with.

    Returns a dict: ``version``, ``torch``, ``backends`` (name -> None if usable on the CPU /
    the current CUDA device, else why not), ``last_run`` (backend, device, timesteps, n,
    batch_size, seconds of the last ``sample``/``invert`` call).
    """
    from . import __version__
    from .dispatch import available_backends

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return {
        "version": __version__,
        "torch": torch.__version__,
        "backends": {str(d): available_backends(d) for d in devices},
        "last_run": dict(_LAST_RUN),
    }


# ----------------------------------------------------------------------------- argument checks
def _check_int(name: str, v, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}, got {v}")
    return v


def _model_device(model) -> torch.device | None:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return None


def _resolve_device(model, device, x: torch.Tensor | None) -> torch.device:
    mdev = _model_device(model)
    if device is None:
        dev = mdev or (x.device if x is not None else torch.device("cpu"))
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if mdev is not None and mdev != dev:
        raise ValueError(f"device: the model is on {mdev} but device={dev}; move the model or pass device={str(mdev)!r}")
    return dev


def _resolve_shape(model, shape, x: torch.Tensor | None) -> tuple[int, ...]:
    if shape is None:
        shape = getattr(model, "sample_shape", None)
    if shape is None:
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "in_channels") and hasattr(cfg, "sample_size"):
            size = cfg.sample_size
            hw = (size, size) if isinstance(size, int) else tuple(size)
            shape = (cfg.in_channels, *hw)
    if shape is None and x is not None:
        shape = tuple(x.shape[1:])
    if shape is None:
        raise ValueError("shape: the model has no sample_shape (or diffusers config); pass shape=(C, H, W)")
    shape = tuple(shape)
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive ints, got {shape!r}")
    return shape


def _resolve_schedule(model, schedule) -> Schedule:
    if schedule is None:
        schedule = getattr(model, "schedule", None)
    if schedule is None:
        raise ValueError(
            "schedule: the model has no `schedule` attribute; pass schedule=fastddim.Schedule.linear() "
            "(or the one the model was trained with), or **fastddim.from_diffusers(scheduler)"
        )
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a fastddim.Schedule, got {type(schedule).__name__}")
    return schedule


def _plan_kwargs(kwargs: dict) -> dict:
    unknown = set(kwargs) - set(PLAN_KWARGS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    return kwargs


def _model_output(model, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
    out = model(x, t, **model_kwargs)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):  # diffusers' UNet2DOutput
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model returned {type(out).__name__}; expected a tensor, an object with .sample, or a tuple")


def _check_output(out: torch.Tensor, x: torch.Tensor, t: int) -> None:
    if out.shape != x.shape:
        raise ValueError(f"model output has shape {tuple(out.shape)} at t={t}, expected {tuple(x.shape)} (same as x_t)")
    if not out.is_floating_point():
        raise TypeError(f"model output has dtype {out.dtype} at t={t}; expected a floating dtype")


class _FiniteWatch:
    """Remembers, on the device, the first step whose model output was not finite."""

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = enabled
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device) if enabled else None

    def update(self, out: torch.Tensor, j: int) -> None:
        if self.enabled:
            bad = ~torch.isfinite(out).all()
            self.first_bad = torch.where(bad & (self.first_bad < 0), j, self.first_bad)

    def check(self, timesteps: Sequence[int], what: str, unit: str = "step") -> None:
        if self.enabled:
            j = int(self.first_bad)  # one sync per batch, outside the step loop
            if j >= 0:
                raise FloatingPointError(
                    f"model output is not finite (NaN or inf) at {unit} {j} (t={timesteps[j]}) of {what}"
                )


def _progress(total: int, progress, desc: str):
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False)


# ----------------------------------------------------------------------------------- sample
def sample(
    model: Callable,
    n: int | None = None,
    steps: int = 50,
    *,
    eta: float | str = 0.0,
    schedule: Schedule | None = None,
    spacing: str | Sequence[int] | None = None,
    shape: Sequence[int] | None = None,
    seed: int = 0,
    x_T: torch.Tensor | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    model_kwargs: dict | None = None,
    progress: bool | None = None,
    callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    backend: str = "auto",
    first_index: int = 0,
    check_finite: bool = True,
    **plan_kwargs,
) -> torch.Tensor:
    """Draw ``n`` samples with DDIM in ``steps`` model calls each.

    Args:
        model: ``model(x_t, t, **model_kwargs)`` with x_t (B, *shape) in ``dtype`` and t an int64
            (B,) tensor; returns the prediction (B, *shape) as a tensor, an object with ``.sample``
            (diffusers ``UNet2DModel``), or a tuple whose first item is it.
        n: number of samples (default 1, or ``len(x_T)`` when x_T is given).
        steps: S, the number of sampling steps (model calls per sample), 1 <= S <= T.
        eta: 0 for DDIM (deterministic), 1 for DDPM on the strided chain, any value >= 0 between
            and beyond, or ``"sigma_hat"`` for the paper's larger-variance DDPM.
        schedule: the training schedule; default ``model.schedule``.
        spacing: ``"uniform"`` (default), ``"quad"``, ``"leading"``, ``"trailing"``, ``"linspace"``
            or an explicit strictly decreasing sequence of timesteps (see ``fastddim.plan.timesteps``).
        shape: the shape of one sample, default ``model.sample_shape`` or the diffusers config.
        seed: noise seed in [0, 2**64); sample i's noise is a pure function of (seed, i, step).
        x_T: (n, *shape) initial noise; default drawn from (seed, first_index + i).
        batch_size: samples per model call (default: all n at once). Results do not depend on it.
        device: where to run (default: the model's device).
        dtype: the dtype of the model's input; the state x_t is kept in float32.
        model_kwargs: extra keyword arguments for every model call (e.g. class labels).
        progress: a tqdm bar (default: when stderr is a terminal).
        callback: ``callback(step, t, x_prev, x0)`` after every step of every batch.
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cpp"`` or ``"cuda"``; see ``fastddim.info()``.
        first_index: global index of the first sample (for sharding a large job).
        check_finite: raise if the model ever returns NaN or inf (checked once per batch).
        **plan_kwargs: ``steps_offset``, ``set_alpha_to_one``, ``prediction_type`` ("epsilon",
            "sample", "v_prediction"), ``clip_sample``, ``clip_sample_range``, ``thresholding``,
            ``dynamic_thresholding_ratio``, ``sample_max_value``, ``use_clipped_model_output``.
            ``fastddim.from_diffusers(scheduler)`` returns these (and ``schedule``) for a diffusers
            ``DDIMScheduler``.

    Returns:
        (n, *shape) float32 tensor on ``device``.
    """
    # --- every check before the first model call
    if n is None:
        n = x_T.shape[0] if isinstance(x_T, torch.Tensor) and x_T.ndim >= 1 else 1
    n = _check_int("n", n, 1)
    seed = check_seed(seed)
    first_index = _check_int("first_index", first_index, 0)
    if first_index + n > 2**32:  # the noise counter holds the sample index in 32 bits
        raise ValueError(f"first_index + n must be <= 2**32, got {first_index + n}")
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}")
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    schedule = _resolve_schedule(model, schedule)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    plan = make_plan(schedule, steps, eta=eta, spacing=spacing, **_plan_kwargs(plan_kwargs))
    if x_T is not None and not isinstance(x_T, torch.Tensor):
        raise TypeError(f"x_T must be a tensor, got {type(x_T).__name__}")
    shape = _resolve_shape(model, shape, x_T)
    if x_T is not None and tuple(x_T.shape) != (n, *shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected (n, *shape) = {(n, *shape)}")
    dev = _resolve_device(model, device, x_T)
    batch_size = n if batch_size is None else _check_int("batch_size", batch_size, 1)
    backend_name = resolve_backend(backend, dev)
    step = make_step(backend_name, plan, seed, need_x0=callback is not None, device=dev)
    model_kwargs = model_kwargs or {}

    # --- the loop
    t0 = time.perf_counter()
    result = torch.empty((n, *shape), dtype=torch.float32, device=dev)
    ts = plan.timesteps
    t_dev = torch.tensor(ts, dtype=torch.int64).to(dev)  # one copy per run; t_dev[j] is a view
    bar = _progress(math.ceil(n / batch_size) * len(ts), progress, "fastddim")
    checked = False
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                b = min(batch_size, n - start)
                idx0 = first_index + start
                if x_T is None:
                    x = normal(seed, idx0, b, 0, shape, dev)
                else:
                    x = x_T[start:start + b].to(device=dev, dtype=torch.float32)
                watch = _FiniteWatch(dev, check_finite)
                for j in range(len(ts)):
                    t = t_dev[j].expand(b)
                    out = _model_output(model, x if dtype == torch.float32 else x.to(dtype), t, model_kwargs)
                    if not checked:
                        _check_output(out, x, ts[j])
                        checked = True
                    watch.update(out, j)
                    x, x0 = step(x, out, j, idx0)
                    if callback is not None:
                        callback(j, ts[j], x, x0)
                    if bar is not None:
                        bar.update(1)
                watch.check(ts, f"the batch starting at sample {idx0}")
                result[start:start + b] = x
    finally:
        if bar is not None:
            bar.close()
    _record("sample", backend_name, dev, plan, n, batch_size, time.perf_counter() - t0)
    return result


def _record(kind: str, backend: str, dev: torch.device, plan: Plan, n: int, batch_size: int, seconds: float):
    _LAST_RUN.clear()
    _LAST_RUN.update(
        kind=kind, backend=backend, device=str(dev), timesteps=list(plan.timesteps), n=n,
        batch_size=batch_size, seconds=seconds,
    )
    log.info("%s: backend=%s device=%s n=%d steps=%d %.3fs", kind, backend, dev, n, plan.steps, seconds)


# ----------------------------------------------------------------------------------- invert
def invert(
    model: Callable,
    x0: torch.Tensor,
    steps: int = 50,
    *,
    schedule: Schedule | None = None,
    spacing: str | Sequence[int] | None = None,
    shape: Sequence[int] | None = None,
    convention: str = "source",
    refine: int = 0,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    model_kwargs: dict | None = None,
    progress: bool | None = None,
    check_finite: bool = True,
    **plan_kwargs,
) -> torch.Tensor:
    """Encode images to latents with the deterministic DDIM ODE run forward (paper sec. 5.4).

    ``sample(model, x_T=invert(model, x0, S), steps=S)`` reconstructs x0, better as S grows
    (paper Table 2). Use the same ``spacing`` and plan options for both.

    Args:
        x0: (n, *shape) images in the model's data range.
        steps: S, the number of model calls.
        convention: ``"source"`` (default, the paper's Euler encoder: eps evaluated at the lower,
            source timestep of each step) or ``"target"`` (diffusers' ``DDIMInverseScheduler`` and
            null-text inversion: eps at the higher, target timestep).
        refine: fixed-point iterations per step (default 0: the paper's encoder). Each one calls
            the model once more per step and moves x_t towards the latent from which the S-step
            eta = 0 decoder lands exactly on the previous point, so the round trip error falls
            far below the plain encoder's (``reference.refine_invert_step``). Cost: S * (1 + refine)
            model calls.
        other arguments: as in ``sample``; clipping options are ignored (the encoder is the ODE).
    Returns:
        x_T: (n, *shape) float32 on ``device``.
    """
    if not isinstance(x0, torch.Tensor) or x0.ndim < 2:
        raise TypeError("x0 must be a tensor of shape (n, *shape)")
    if convention not in ("source", "target"):
        raise ValueError(f"convention must be 'source' or 'target', got {convention!r}")
    refine = _check_int("refine", refine, 0)
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}")
    schedule = _resolve_schedule(model, schedule)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    plan = make_plan(schedule, steps, eta=0.0, spacing=spacing, **_plan_kwargs(plan_kwargs))
    shape = _resolve_shape(model, shape, x0)
    if tuple(x0.shape[1:]) != shape:
        raise ValueError(f"x0 has shape {tuple(x0.shape)}, expected (n, *{shape})")
    n = x0.shape[0]
    dev = _resolve_device(model, device, x0)
    batch_size = n if batch_size is None else _check_int("batch_size", batch_size, 1)
    model_kwargs = model_kwargs or {}
    points = reference.invert_points(plan, schedule.alphas_cumprod, convention)
    ac = schedule.alphas_cumprod
    t0 = time.perf_counter()
    result = torch.empty((n, *shape), dtype=torch.float32, device=dev)
    t_dst = list(reversed(plan.timesteps))  # point k lands on t_dst[k]; refinement evaluates there
    t_evals = [t for k, p in enumerate(points) for t in (p[2], *[t_dst[k]] * refine)]  # model calls, in order
    bar = _progress(math.ceil(n / batch_size) * len(t_evals), progress, "fastddim invert")
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                x = x0[start:start + batch_size].to(device=dev, dtype=torch.float32)
                watch = _FiniteWatch(dev, check_finite)
                calls = [0]

                def model_fn(xt, t):
                    out = _model_output(model, xt if dtype == torch.float32 else xt.to(dtype), t, model_kwargs)
                    if calls[0] == 0 and start == 0:
                        _check_output(out, xt, t_evals[0])
                    watch.update(out, calls[0])
                    calls[0] += 1
                    if bar is not None:
                        bar.update(1)
                    return out

                for k, (a_src, a_dst, t_eval) in enumerate(points):
                    t = torch.full((x.shape[0],), t_eval, dtype=torch.int64, device=dev)
                    x_dst = reference.ddim_invert_step(x, model_fn(x, t), a_src, a_dst, float(ac[t_eval]),
                                                       plan.prediction_type)
                    x = reference.refine_invert_step(model_fn, x, x_dst, a_src, a_dst, t_dst[k], float(ac[t_dst[k]]),
                                                     plan.prediction_type, refine)
                watch.check(t_evals, f"the inversion of the batch starting at {start}",
                            "step" if refine == 0 else "model call")
                result[start:start + x.shape[0]] = x
    finally:
        if bar is not None:
            bar.close()
    _record("invert", "torch", dev, plan, n, batch_size, time.perf_counter() - t0)
    _LAST_RUN.update(convention=convention, refine=refine, model_calls_per_image=len(t_evals))
    return result


# ------------------------------------------------------------------------------ interpolate
def slerp(z0: torch.Tensor, z1: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two latents (paper Figure 6).

    z0, z1: (*shape); alphas: (num,) in [0, 1]. Returns (num, *shape); rows for alpha 0 and 1
    are exactly z0 and z1.
    """
    a, b = z0.double().flatten(), z1.double().flatten()
    cos = torch.dot(a, b) / (a.norm() * b.norm())
    theta = torch.arccos(cos.clamp(-1, 1))
    al = alphas.double().view(-1, 1)
    if float(theta) < 1e-6:  # parallel latents: slerp degenerates to lerp
        out = (1 - al) * a + al * b
    else:
        out = (torch.sin((1 - al) * theta) * a + torch.sin(al * theta) * b) / torch.sin(theta)
    out = out.float().reshape(len(alphas), *z0.shape)
    out[alphas == 0] = z0.float()
    out[alphas == 1] = z1.float()
    return out


def interpolate(model: Callable, z0: torch.Tensor, z1: torch.Tensor, num: int = 11, steps: int = 50, **sample_kwargs) -> torch.Tensor:
    """Decode ``num`` latents spherically interpolated between z0 and z1 (paper Figure 6).

    z0, z1: (*shape) or (1, *shape) latents (x_T). Returns (num, *shape): the samples at
    alpha = 0, 1/(num-1), ..., 1. The first and last rows equal ``sample`` of z0 and z1.
    Other keyword arguments go to ``sample`` (eta must stay 0 for a meaningful path).
    """
    if not isinstance(z0, torch.Tensor) or not isinstance(z1, torch.Tensor):
        raise TypeError("z0 and z1 must be tensors")
    shape = _resolve_shape(model, sample_kwargs.get("shape"), z0[None])
    z0 = z0.reshape(shape) if z0.shape in (shape, (1, *shape)) else z0
    z1 = z1.reshape(shape) if z1.shape in (shape, (1, *shape)) else z1
    if z0.shape != shape or z1.shape != shape:
        raise ValueError(f"z0 and z1 must have shape {shape} (or (1, *shape)), got {tuple(z0.shape)} and {tuple(z1.shape)}")
    num = _check_int("num", num, 2)
    if "x_T" in sample_kwargs or "n" in sample_kwargs:
        raise TypeError("interpolate makes x_T and n itself")
    zs = slerp(z0.detach().cpu(), z1.detach().cpu(), torch.linspace(0, 1, num))
    return sample(model, n=num, steps=steps, x_T=zs, **sample_kwargs)
