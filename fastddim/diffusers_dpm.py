"""The ``from_diffusers`` mapping of a diffusers ``DPMSolverMultistepScheduler``.

Reads its config (never imports diffusers) and returns the keyword arguments of fastddim's
DPM-Solver++(2M) (``solver="dpm++2m"``, ``plan.make_dpm_plan``) that compute what it computes.
A setting fastddim does not reproduce is refused with an error naming it: never run as
something else.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from .plan import PREDICTION_TYPES

__all__ = ["dpm_kwargs"]

_DEFAULTS = dict(  # DPMSolverMultistepScheduler's own defaults (diffusers 0.42.1), for missing keys
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    rescale_betas_zero_snr=False, solver_order=2, prediction_type="epsilon", thresholding=False,
    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint",
    lower_order_final=True, euler_at_final=False, use_karras_sigmas=False, final_sigmas_type="zero",
    timestep_spacing="linspace", steps_offset=0,
    # not reproduced unless at these values:
    use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False,
    use_dynamic_shifting=False, variance_type=None, lambda_min_clipped=-math.inf,
)

# Settings fastddim reproduces only at one value (diffusers' default), and why not others.
_ONLY = {
    "algorithm_type": ("dpmsolver++", "only the data-prediction ODE solver DPM-Solver++ is built"),
    "use_exponential_sigmas": (False, "exponential sigmas are not built"),
    "use_beta_sigmas": (False, "beta sigmas are not built"),
    "use_lu_lambdas": (False, "Lu's uniform-lambda steps are not built"),
    "use_flow_sigmas": (False, "flow-matching sigmas are not built"),
    "use_dynamic_shifting": (False, "dynamic shifting (flow matching) is not built"),
    "variance_type": (None, "learned-variance outputs are not sliced by this solver"),
    "lambda_min_clipped": (-math.inf, "clipped lambdas change the timestep count per spacing"),
}

# The schedule keys, with the same defaults in DDIMScheduler and DPMSolverMultistepScheduler.
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "rescale_betas_zero_snr")


def _refuse(c: Mapping[str, Any]) -> None:
    """Raise, naming the setting, where this config asks for something fastddim does not compute."""
    for key, (value, why) in _ONLY.items():
        if c[key] != value:
            raise ValueError(f"scheduler: {key}={c[key]!r} is not reproduced by fastddim ({why}); only {value!r}")
    if c["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(f"scheduler: prediction_type={c['prediction_type']!r} is not reproduced by fastddim; only {PREDICTION_TYPES}")
    if c["solver_order"] not in (1, 2):
        raise ValueError(f"scheduler: solver_order={c['solver_order']!r} is not reproduced by fastddim; only 1 or 2")
    if c["solver_order"] == 2 and c["solver_type"] != "midpoint":
        raise ValueError(f"scheduler: solver_type={c['solver_type']!r} is not reproduced by fastddim; only 'midpoint'")
    if c["euler_at_final"] and c["final_sigmas_type"] != "zero":
        # with a zero final sigma the last step is first order anyway
        raise ValueError("scheduler: euler_at_final=True with final_sigmas_type='sigma_min' is not reproduced by fastddim")
    if c["use_karras_sigmas"] and c["beta_schedule"] == "squaredcos_cap_v2" and c["trained_betas"] is None:
        # there diffusers does not round the Karras timesteps: int64 truncates them
        raise ValueError("scheduler: use_karras_sigmas with beta_schedule='squaredcos_cap_v2' is not reproduced by fastddim")


def dpm_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``fastddim.sample(..., **kwargs)`` that reproduce a
    ``DPMSolverMultistepScheduler`` with this config (DPMSolverMultistepScheduler's defaults filled in).

    Returns:
        dict with ``solver="dpm++2m"``, ``schedule``, ``spacing`` (None with Karras sigmas, which
        choose the timesteps), ``steps_offset`` (leading only, as diffusers), ``prediction_type``,
        ``thresholding``, ``dynamic_thresholding_ratio``, ``sample_max_value``, ``solver_order``,
        ``lower_order_final``, ``final_sigmas_type``, ``use_karras_sigmas``.
    Raises:
        ValueError naming the first setting fastddim does not reproduce.
    """
    from .diffusers_compat import _ddim_kwargs  # the one home of betas-from-config (imports this module)

    c = {**_DEFAULTS, **{k: v for k, v in cfg.items() if k in _DEFAULTS}}
    _refuse(c)
    karras = bool(c["use_karras_sigmas"])
    spacing = None if karras else c["timestep_spacing"]
    return dict(
        solver="dpm++2m",
        schedule=_ddim_kwargs({k: c[k] for k in _SCHEDULE_KEYS})["schedule"],
        spacing=spacing,
        steps_offset=int(c["steps_offset"]) if spacing == "leading" else 0,
        prediction_type=c["prediction_type"],
        thresholding=bool(c["thresholding"]),
        dynamic_thresholding_ratio=float(c["dynamic_thresholding_ratio"]),
        sample_max_value=float(c["sample_max_value"]),
        solver_order=int(c["solver_order"]),
        lower_order_final=bool(c["lower_order_final"]),
        final_sigmas_type=c["final_sigmas_type"],
        use_karras_sigmas=karras,
    )
