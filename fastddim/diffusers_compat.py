"""``from_diffusers``: the arguments that reproduce a diffusers ``DDIMScheduler`` / ``DDIMInverseScheduler``
/ ``DPMSolverMultistepScheduler`` (fastddim/diffusers_dpm.py).

fastddim never imports diffusers: this reads the scheduler's config (an object with ``.config``
or a plain mapping) and rebuilds its betas exactly as diffusers does.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .diffusers_dpm import dpm_kwargs
from .schedule import Schedule

__all__ = ["from_diffusers"]

_DEFAULTS = dict(  # DDIMScheduler's own defaults, for configs that leave keys out
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False,
    dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
    rescale_betas_zero_snr=False,
)


def from_diffusers(scheduler: Any, *, as_ddim: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``fastddim.sample`` / ``fastddim.invert`` that reproduce a diffusers
    ``DDIMScheduler`` (for ``sample``), ``DDIMInverseScheduler`` (for
    ``invert(..., convention="target")``) or ``DPMSolverMultistepScheduler`` (for ``sample``:
    ``solver="dpm++2m"`` and its options, ``diffusers_dpm.dpm_kwargs``; a setting fastddim does
    not reproduce is refused, naming it).

    Args:
        scheduler: a ``DDIMScheduler``, ``DDIMInverseScheduler`` or ``DPMSolverMultistepScheduler`` (anything with a ``.config``
            mapping, identified by its class name), or a config mapping (identified by its
            ``_class_name`` as in a saved ``scheduler_config.json``; a mapping without one must hold
            only DDIMScheduler options). Any other scheduler is refused: reading its config as DDIM
            fills DDIMScheduler's defaults for every key it lacks (``clip_sample=True`` among them),
            a different sampler from the one it names. Ask for that explicitly with
            ``as_ddim=True`` or ``from_diffusers(DDIMScheduler.from_config(scheduler.config))``.
        as_ddim: read any scheduler's (or config's) DDIM keys as a ``DDIMScheduler`` would, with
            DDIMScheduler's defaults for the rest, as ``DDIMScheduler.from_config`` does.
    Returns:
        dict with ``schedule``, ``spacing``, ``steps_offset``, ``set_alpha_to_one``,
        ``prediction_type``, ``clip_sample``, ``clip_sample_range``, ``thresholding``,
        ``dynamic_thresholding_ratio``, ``sample_max_value`` (for DPM-Solver++: ``solver``,
        ``schedule``, ``spacing``, ``steps_offset``, the x0 options, ``solver_order``,
        ``lower_order_final``, ``final_sigmas_type``, ``use_karras_sigmas``). Use as
        ``fastddim.sample(unet, n, steps, **fastddim.from_diffusers(pipe.scheduler))``.
    """
    if not isinstance(as_ddim, bool):
        raise TypeError(f"as_ddim must be a bool, got {type(as_ddim).__name__}")
    cfg = getattr(scheduler, "config", scheduler)
    if not isinstance(cfg, Mapping):
        raise TypeError(
            f"scheduler must be a diffusers DDIMScheduler / DDIMInverseScheduler or its config dict, "
            f"got {type(scheduler).__name__}"
        )
    if as_ddim:
        return _ddim_kwargs(cfg)
    name = _class_name(scheduler, cfg)
    if name is None:  # a bare mapping: a DDIM config written by hand, unless it holds other options
        unknown = sorted(k for k in cfg if k not in _DEFAULTS and not str(k).startswith("_"))
        if unknown:
            raise ValueError(
                f"scheduler: config keys {unknown} are not DDIMScheduler options (another scheduler's config?): "
                f"pass its class as '_class_name', or as_ddim=True to read it as DDIM and ignore them"
            )
        return _ddim_kwargs(cfg)
    if name not in _SAME_METHOD:
        raise ValueError(
            f"scheduler: fastddim.from_diffusers reproduces {sorted(_SAME_METHOD)}, not {name}. To run DDIM on "
            f"its config (its beta schedule, with DDIMScheduler's defaults for every key it lacks, clip_sample=True "
            f"among them) say so: fastddim.from_diffusers(scheduler, as_ddim=True), or "
            f"fastddim.from_diffusers(DDIMScheduler.from_config(scheduler.config))"
        )
    return _SAME_METHOD[name](cfg)


def _class_name(scheduler: Any, cfg: Mapping) -> str | None:
    """The diffusers class a scheduler or config names: its own class, or a config's _class_name."""
    if cfg is not scheduler:
        return type(scheduler).__name__
    return cfg.get("_class_name")


def _ddim_kwargs(cfg: Mapping) -> dict[str, Any]:
    """The sample/invert keyword arguments from a DDIM config, DDIMScheduler's defaults filled in."""
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


# A diffusers scheduler class -> the maker of the fastddim arguments that compute the same thing.
# The one place a new method enters.
_SAME_METHOD = {"DDIMScheduler": _ddim_kwargs, "DDIMInverseScheduler": _ddim_kwargs,
                "DPMSolverMultistepScheduler": dpm_kwargs}
