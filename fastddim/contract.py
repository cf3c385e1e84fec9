"""The model contract: what fastddim needs of a model and how it calls one.

``model(x_t, t, **model_kwargs)`` with x_t (B, *shape) and t an int64 (B,) tensor, returning the
prediction as a tensor, an object with ``.sample`` (diffusers) or a tuple; its device, sample
shape and schedule from the module, its diffusers config, or the arguments. Used by the engine
(fastddim/engine.py) and the drivers; imports nothing of fastddim but the checks and the schedule.
"""
from __future__ import annotations

import torch

from .checks import check_device
from .schedule import Schedule

__all__ = ["model_device", "resolve_device", "resolve_shape", "resolve_schedule", "model_output", "check_output"]


def model_device(model) -> torch.device | None:
    """The device of a module's first parameter (or buffer); None for a plain function."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return None


def resolve_device(model, device, x: torch.Tensor | None = None) -> torch.device:
    """The run's device: ``device``, else the model's, else x's, else the CPU; must agree with the model."""
    mdev = model_device(model)
    if device is None:
        dev = mdev or (x.device if x is not None else torch.device("cpu"))
    else:
        dev = check_device("device", device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if mdev is not None and mdev != dev:
        raise ValueError(f"device: the model is on {mdev} but device={dev}; move the model or pass device={str(mdev)!r}")
    return dev


def resolve_shape(model, shape, x: torch.Tensor | None = None) -> tuple[int, ...]:
    """One sample's shape: ``shape``, else ``model.sample_shape``, a diffusers config, or x.shape[1:]."""
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


def resolve_schedule(model, schedule) -> Schedule:
    """``schedule``, else ``model.schedule``; a clear error naming the fix when neither exists."""
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


def model_output(model, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
    """``model(x, t, **model_kwargs)`` as a tensor: accepts a tensor, ``.sample`` or a tuple."""
    out = model(x, t, **model_kwargs)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):  # diffusers' UNet2DOutput
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model returned {type(out).__name__}; expected a tensor, an object with .sample, or a tuple")


def check_output(out: torch.Tensor, x: torch.Tensor, t: int, learned_variance: bool) -> None:
    """The model's first output has x's shape (2C channels with learned_variance) and a float dtype."""
    want = (x.shape[0], 2 * x.shape[1], *x.shape[2:]) if learned_variance else tuple(x.shape)
    if tuple(out.shape) != want:
        hint = ""
        if not learned_variance and x.ndim >= 2 and tuple(out.shape) == (x.shape[0], 2 * x.shape[1], *x.shape[2:]):
            hint = ("; it has twice the channels: a model with learned variance (guided-diffusion `learn_sigma`, "
                    "diffusers variance_type='learned_range') needs learned_variance=True")
        elif learned_variance:
            hint = " (learned_variance=True: eps and the variance, 2C channels)"
        raise ValueError(f"model output has shape {tuple(out.shape)} at t={t}, expected {want}{hint}")
    if not out.is_floating_point():
        raise TypeError(f"model output has dtype {out.dtype} at t={t}; expected a floating dtype")
