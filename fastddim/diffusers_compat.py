"""``from_diffusers``: the ``sample`` arguments that reproduce a diffusers ``DDIMScheduler``.

fastddim never imports diffusers: this reads the scheduler's config (an object with ``.config``
or a plain mapping) and rebuilds its betas exactly as diffusers does.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .schedule import Schedule

__all__ = ["from_diffusers"]

_DEFAULTS = dict(  # DDIMScheduler's own defaults, for configs that leave keys out
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False,
    dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
    rescale_betas_zero_snr=False,
)


def from_diffusers(scheduler: Any) -> dict[str, Any]:
    """Keyword arguments for ``fastddim.sample`` that reproduce a diffusers ``DDIMScheduler``.

    Args:
        scheduler: a ``DDIMScheduler`` (or anything with a ``.config`` mapping), or its config dict.
    Returns:
        dict with ``schedule``, ``spacing``, ``steps_offset``, ``set_alpha_to_one``,
        ``prediction_type``, ``clip_sample``, ``clip_sample_range``, ``thresholding``,
        ``dynamic_thresholding_ratio``, ``sample_max_value``. Use as
        ``fastddim.sample(unet, n, steps, **fastddim.from_diffusers(pipe.scheduler))``.
    """
    cfg = getattr(scheduler, "config", scheduler)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"scheduler must be a diffusers DDIMScheduler or its config dict, got {type(scheduler).__name__}")
    c = {**_DEFAULTS, **{k: v for k, v in cfg.items() if k in _DEFAULTS}}
    T, rescale = int(c["num_train_timesteps"]), bool(c["rescale_betas_zero_snr"])
    if c["trained_betas"] is not None:
        schedule = Schedule.from_betas(np.asarray(c["trained_betas"]), rescale_zero_terminal_snr=rescale)
    elif c["beta_schedule"] == "linear":
        schedule = Schedule.linear(T, c["beta_start"], c["beta_end"], linspace="float32", rescale_zero_terminal_snr=rescale)
    elif c["beta_schedule"] == "scaled_linear":
        schedule = Schedule.scaled_linear(
            T, c["beta_start"], c["beta_end"], linspace="float32", rescale_zero_terminal_snr=rescale
        )
    elif c["beta_schedule"] == "squaredcos_cap_v2":
        schedule = Schedule.cosine(T, rescale_zero_terminal_snr=rescale)
    else:
        raise ValueError(f"scheduler: beta_schedule {c['beta_schedule']!r} is not supported by DDIMScheduler")
    spacing = c["timestep_spacing"]
    return dict(
        schedule=schedule,
        spacing=spacing,
        # diffusers adds steps_offset only to 'leading' timesteps
        steps_offset=int(c["steps_offset"]) if spacing == "leading" else 0,
        set_alpha_to_one=bool(c["set_alpha_to_one"]),
        prediction_type=c["prediction_type"],
        clip_sample=bool(c["clip_sample"]) and not c["thresholding"],
        clip_sample_range=float(c["clip_sample_range"]),
        thresholding=bool(c["thresholding"]),
        dynamic_thresholding_ratio=float(c["dynamic_thresholding_ratio"]),
        sample_max_value=float(c["sample_max_value"]),
    )
