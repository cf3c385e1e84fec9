"""Timestep plans: which S of the T training timesteps a run visits, and the per-step scalars.

A plan is made once per (schedule, S, spacing, eta, ...) on the host. The sampling loop only
reads it: no scalar is computed, and no device tensor is indexed, inside the loop.

The previous timestep of step j is always the plan's own next entry (or the final alpha after
the last one), never diffusers' ``t - T // S``, which is wrong for ``linspace`` and for
``trailing`` when S does not divide T.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .checks import check_eta, check_int
from .schedule import Schedule

__all__ = [
    "SPACINGS", "PREDICTION_TYPES", "PLAN_KWARGS", "timesteps", "paper_timesteps", "Plan", "make_plan", "COLUMNS",
    "SOLVERS", "DPM_SPACINGS", "DPM_PLAN_KWARGS", "DPM_COLUMNS", "make_dpm_plan",
]

SPACINGS = ("uniform", "quad", "leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

# Keyword arguments of make_plan that shape a run beyond (schedule, steps, eta, spacing); sample,
# invert and interpolate pass them through.
PLAN_KWARGS = (
    "steps_offset", "set_alpha_to_one", "prediction_type", "clip_sample", "clip_sample_range", "thresholding",
    "dynamic_thresholding_ratio", "sample_max_value", "use_clipped_model_output",
)

# Columns of the per-step scalar table, shared with every kernel (same order in kernels/, csrc/).
COLUMNS = (
    "sqrt_a",      # a_t ** 0.5
    "sqrt_1ma",    # (1 - a_t) ** 0.5
    "c_x0",        # coefficient of the x0 prediction: a_prev ** 0.5 (DDIM), DDPM posterior (sigma_hat)
    "c_eps",       # coefficient of eps: (1 - a_prev - sigma**2) ** 0.5 (DDIM), 0 (sigma_hat)
    "c_xt",        # coefficient of x_t: 0 (DDIM), DDPM posterior (sigma_hat)
    "sigma",       # noise standard deviation
)

SOLVERS = ("ddim", "dpm++2m")


def timesteps(T: int, S: int, spacing: str | Sequence[int] = "uniform", steps_offset: int = 0) -> list[int]:
    """The S timesteps of a run, strictly decreasing, each in [0, T).

    Spacings (T training steps, S sampling steps):
      - ``uniform``: t = i * (T // S), i = 0..S-1 (the paper code's, which adds an extra step when
        S does not divide T; here always S). Equal to ``leading`` with ``steps_offset=0``.
      - ``quad``: the paper code's int(linspace(0, sqrt(0.8 T), S) ** 2), topping out at 0.8 T.
        Where the paper code repeats a timestep (large S) the repeat is moved up by one, so the
        plan stays strictly decreasing with S distinct entries; otherwise identical.
      - ``leading``: i * (T // S) + steps_offset (diffusers).
      - ``trailing``: round(T - i * T / S) - 1 (diffusers), the i-th value of its float64 arange
        computed as numpy does (so a tie rounds the same way), but exactly S entries: diffusers'
        arange gives S + 1 ending at -1 for some S (61, 103, ...); this never does.
      - ``linspace``: round(i * (T - 1) / (S - 1)) (diffusers), numpy's float64 linspace as
        diffusers calls it: exact arithmetic breaks ties differently at S = 27, 31, 47, ...
      - an explicit sequence of ints: used as given; must be strictly decreasing in [0, T).
    ``steps_offset`` only applies to ``leading``.
    """
    if isinstance(spacing, str):
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS} or a sequence of ints, got {spacing!r}")
        if not isinstance(S, (int, np.integer)) or isinstance(S, bool) or not 1 <= S <= T:
            raise ValueError(f"steps must be an int in [1, T={T}], got {S!r}")
        if steps_offset and spacing != "leading":
            raise ValueError(f"steps_offset applies only to spacing='leading', got spacing={spacing!r}")
        if spacing in ("uniform", "leading"):
            ts = [i * (T // S) + steps_offset for i in range(S)]
            if ts[-1] > T - 1:
                raise ValueError(
                    f"steps_offset={steps_offset} moves the last timestep to {ts[-1]}, past T - 1 = {T - 1}"
                )
        elif spacing == "quad":
            ts = [int(s) for s in np.linspace(0, np.sqrt(T * 0.8), S) ** 2]
            for i in range(1, S):
                ts[i] = max(ts[i], ts[i - 1] + 1)
        elif spacing == "trailing":
            # np.arange(T, 0, -T / S) fills start + i * delta, delta = (start + step) - start
            delta = (T + (-T / S)) - T
            ts = [round(T + i * delta) - 1 for i in range(S)][::-1]
        else:  # linspace
            ts = [int(t) for t in np.linspace(0, T - 1, S).round()]
        return ts[::-1]
    # an explicit plan
    if steps_offset:
        raise ValueError("steps_offset applies only to spacing='leading', not to explicit timesteps")
    try:
        ts = [int(t) for t in spacing]
        ok = all(float(t) == int(t) for t in spacing)
    except (TypeError, ValueError):
        raise TypeError(f"spacing must be a spacing name or a sequence of ints, got {spacing!r}") from None
    if not ok:
        raise ValueError(f"spacing: explicit timesteps must be integers, got {list(spacing)!r}")
    if not ts:
        raise ValueError("spacing: explicit timesteps must not be empty")
    bad = [t for t in ts if not 0 <= t < T]
    if bad:
        raise ValueError(f"spacing: explicit timesteps must lie in [0, T={T}), got {bad}")
    if len(set(ts)) != len(ts):
        raise ValueError(f"spacing: explicit timesteps must not repeat, got {ts}")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"spacing: explicit timesteps must be strictly decreasing, got {ts}")
    return ts


PAPER_SKIPS = ("uniform", "quad")


def paper_timesteps(skip: str, S: int, T: int = 1000) -> list[int]:
    """The timesteps the paper's own code (ermongroup/ddim, ``--skip_type``, ``--timesteps S``)
    visits, decreasing, for ``fastddim.sample(model, steps=len(ts), spacing=ts)``.

    - ``"uniform"``: ``range(0, T, T // S)``. When S does not divide T this is more than S
      timesteps (S = 30 gives 31, S = 7 gives 8); they are returned as the paper runs them.
    - ``"quad"``: ``[int(s) for s in np.linspace(0, np.sqrt(0.8 * T), S) ** 2]``, topping out
      at 0.8 T. For large S the paper's list repeats small timesteps (0 at S = 30 and 50;
      0 and 2 at S = 100); each repeat is kept once here, so such S give fewer than S entries.

    Why repeats can be dropped: the paper pairs t with the previous list entry, so a repeat is a
    step from t to the same t. Its a_t equals a_next exactly, so sigma is exactly 0 and the
    update ``sqrt(a_next) * x0 + sqrt(1 - a_next) * eps`` gives x_t back, up to float32 rounding;
    it costs one model call. Measured against the paper's loop (tests/test_parity_paper.py,
    eta = 0, float32, CPU): with the repeats removed the result is bit-identical to the paper's at
    quad S = 30, 50 and 100, and within 1e-6 (S = 200) and 4e-6 (S = 500) of it, where the paper's
    identity steps round. ``fastddim.sample`` (``backend="torch"``) over these timesteps gave the
    paper loop's numbers bit for bit there and at uniform S = 10 and 30 (the tests allow float32
    rounding, 1e-5, as the other paper-parity tests do).
    With eta > 0 the paper also draws ``torch.randn`` on an identity step, shifting its noise
    stream; fastddim's noise is counter-based and never matches the paper's draws anyway.

    Args:
        skip: ``"uniform"`` or ``"quad"`` (the paper's ``--skip_type``).
        S: the paper's ``--timesteps``, an int in [1, T].
        T: training timesteps (the paper's ``num_diffusion_timesteps``), >= 1.

    Returns:
        The distinct timesteps, strictly decreasing, each in [0, T).
    """
    from .checks import check_int

    if skip not in PAPER_SKIPS:
        raise ValueError(f"skip must be one of {PAPER_SKIPS} (the paper's skip types), got {skip!r}")
    T = check_int("T", T, 1)
    S = check_int("S", S, 1, T)
    if skip == "uniform":
        seq = list(range(0, T, T // S))
    else:
        seq = [int(s) for s in np.linspace(0, np.sqrt(0.8 * T), S) ** 2]
    return sorted(set(seq), reverse=True)


@dataclass(frozen=True)
class Plan:
    """Everything the loop needs for one run, made on the host.

    Attributes:
        timesteps: the S timesteps, strictly decreasing.
        prev_timesteps: the timestep each step goes to (-1 for the final alpha).
        table: (S, len(COLUMNS)) float32 CPU tensor of per-step scalars (see COLUMNS).
        scalars: the same table as Python floats (exact float32 values), for the torch path.
        noise: per-step bool: whether that step adds sigma * z.
        eta: the eta (float) or "sigma_hat".
        prediction_type, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
        sample_max_value, use_clipped_model_output: how x0 is formed and clipped.
        solver: ``"ddim"`` (``table`` has COLUMNS) or ``"dpm++2m"`` (``table`` has DPM_COLUMNS).
        orders: per step, 1 or 2: whether the step reads the previous x0 (DPM-Solver++ second
            order); all 1 for DDIM.
        sigmas: DPM-Solver only: the S + 1 float32 sigmas = sqrt((1 - a) / a) the update goes
            between (the last is the final one, 0 for ``final_sigmas_type="zero"``); empty for DDIM.
    """

    timesteps: tuple[int, ...]
    prev_timesteps: tuple[int, ...]
    table: torch.Tensor
    scalars: tuple[tuple[float, ...], ...]
    noise: tuple[bool, ...]
    eta: float | str
    prediction_type: str
    clip_sample: bool
    clip_sample_range: float
    thresholding: bool
    dynamic_thresholding_ratio: float
    sample_max_value: float
    use_clipped_model_output: bool
    final_alpha_cumprod: float
    solver: str = "ddim"
    orders: tuple[int, ...] = ()
    sigmas: tuple[float, ...] = ()

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def columns(self) -> tuple[str, ...]:
        """The names of ``table``'s columns for this plan's solver."""
        return DPM_COLUMNS if self.solver == "dpm++2m" else COLUMNS

    @property
    def sigma_hat(self) -> bool:
        return self.eta == "sigma_hat"

    @property
    def clips(self) -> bool:
        return self.clip_sample or self.thresholding or self.sigma_hat

    def describe(self) -> dict:
        """A JSON-able description (for manifests and cache keys)."""
        return {
            "timesteps": list(self.timesteps),
            "eta": self.eta,
            "prediction_type": self.prediction_type,
            "clip_sample": self.clip_sample,
            "clip_sample_range": self.clip_sample_range,
            "thresholding": self.thresholding,
            "dynamic_thresholding_ratio": self.dynamic_thresholding_ratio,
            "sample_max_value": self.sample_max_value,
            "use_clipped_model_output": self.use_clipped_model_output,
            "final_alpha_cumprod": self.final_alpha_cumprod,
            "solver": self.solver,
            "orders": list(self.orders),
            "sigmas": list(self.sigmas),
        }


def _x0_options(
    schedule: Schedule, prediction_type: str, clip_sample: bool, clip_sample_range: float, thresholding: bool,
    dynamic_thresholding_ratio: float, sample_max_value: float, steps_offset: int,
) -> dict:
    """The checks every plan maker shares (how x0 is formed and clipped, and steps_offset); returns
    the x0 fields of its Plan, normalised."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a fastddim.Schedule, got {type(schedule).__name__}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if schedule.zero_terminal_snr and prediction_type == "epsilon":
        raise ValueError(
            "schedule has zero terminal SNR (a_T = 0), where an epsilon prediction cannot give x0 "
            "(division by sqrt(a_T) = 0): use prediction_type='v_prediction' or 'sample'"
        )
    for name, v in (("clip_sample_range", clip_sample_range), ("sample_max_value", sample_max_value)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    if not 0 < dynamic_thresholding_ratio <= 1:
        raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {dynamic_thresholding_ratio!r}")
    if not isinstance(steps_offset, int) or isinstance(steps_offset, bool) or steps_offset < 0:
        raise ValueError(f"steps_offset must be a non-negative int, got {steps_offset!r}")
    return dict(
        prediction_type=prediction_type, clip_sample=bool(clip_sample), clip_sample_range=float(clip_sample_range),
        thresholding=bool(thresholding), dynamic_thresholding_ratio=float(dynamic_thresholding_ratio),
        sample_max_value=float(sample_max_value),
    )


def make_plan(
    schedule: Schedule,
    steps: int,
    *,
    eta: float | str = 0.0,
    spacing: str | Sequence[int] | None = "uniform",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    use_clipped_model_output: bool = False,
) -> Plan:
    """Build the DDIM plan: timesteps and the per-step scalar table (COLUMNS).

    The scalars are computed with torch CPU float32 ops on 0-dim tensors in the order diffusers'
    ``DDIMScheduler.step`` uses (FACTS.md section 3), so the torch path is bit-identical to it.
    """
    eta = check_eta(eta)
    x0_options = _x0_options(schedule, prediction_type, clip_sample, clip_sample_range, thresholding,
                             dynamic_thresholding_ratio, sample_max_value, steps_offset)
    if spacing is None:
        spacing = "uniform"
    if not isinstance(spacing, str):
        ts = timesteps(schedule.T, steps, spacing)
        if steps is not None and steps != len(ts):
            raise ValueError(f"steps={steps} does not match the {len(ts)} explicit timesteps given in spacing")
    else:
        ts = timesteps(schedule.T, steps, spacing, steps_offset)

    ac = schedule.alphas_cumprod
    final = torch.tensor(1.0) if set_alpha_to_one else ac[0]
    prev_ts = ts[1:] + [-1]
    rows, noise = [], []
    for j, (t, tp) in enumerate(zip(ts, prev_ts)):
        a = ac[t]
        a_prev = ac[tp] if tp >= 0 else final
        b = 1 - a
        sqrt_a, sqrt_1ma = a**0.5, b**0.5
        if eta == "sigma_hat":
            # The paper code's ddpm_noisy: DDPM posterior mean with beta_t = 1 - a_t / a_prev,
            # std sqrt(beta_t), no noise on the last step.
            beta_t = 1 - a / a_prev
            c_x0 = (a_prev**0.5 * beta_t) / b
            c_xt = ((1 - beta_t) ** 0.5 * (1 - a_prev)) / b
            c_eps = torch.tensor(0.0)
            last = j == len(ts) - 1
            sigma = torch.tensor(0.0) if last else beta_t**0.5
            noise.append(not last)
        else:
            variance = ((1 - a_prev) / b) * (1 - a / a_prev)
            sigma = eta * variance**0.5
            # Rounding can make 1 - a_prev - sigma^2 slightly negative at eta = 1.
            c_eps = (1 - a_prev - sigma**2).clamp_min(0) ** 0.5
            c_x0 = a_prev**0.5
            c_xt = torch.tensor(0.0)
            noise.append(eta > 0)
        rows.append(torch.stack([sqrt_a, sqrt_1ma, c_x0, c_eps, c_xt, sigma]).to(torch.float32))
    table = torch.stack(rows)
    return Plan(
        timesteps=tuple(ts),
        prev_timesteps=tuple(prev_ts),
        table=table,
        scalars=tuple(tuple(float(v) for v in row) for row in table),
        noise=tuple(noise),
        eta=eta,
        **x0_options,
        use_clipped_model_output=bool(use_clipped_model_output),
        final_alpha_cumprod=float(final),
        orders=(1,) * len(ts),
    )


# ------------------------------------------------------------------------ DPM-Solver++(2M)
DPM_SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")

# Keyword arguments of make_dpm_plan beyond (schedule, steps, spacing) and the x0 options it
# shares with make_plan.
DPM_PLAN_KWARGS = (
    "steps_offset", "prediction_type", "clip_sample", "clip_sample_range", "thresholding",
    "dynamic_thresholding_ratio", "sample_max_value", "solver_order", "lower_order_final", "final_sigmas_type",
    "use_karras_sigmas",
)

# Columns of a DPM-Solver++ plan's table. Step j goes from sigma_s = sigmas[j] to sigma_t =
# sigmas[j + 1] (alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha, lambda = log alpha -
# log sigma_t, h = lambda_t - lambda_s). The first two have the DDIM columns' names and roles:
# x0 comes from the model output with them exactly as in a DDIM step.
DPM_COLUMNS = (
    "sqrt_a",      # alpha_s: x0 = (x - sigma_s out) / alpha_s (eps), alpha_s x - sigma_s out (v)
    "sqrt_1ma",    # sigma_s (the VP sigma, sigma * alpha_s)
    "c_x",         # sigma_t / sigma_s, coefficient of x_t
    "c_d0",        # alpha_t * (exp(-h) - 1), coefficient of the current x0 (subtracted; negative)
    "c_d1",        # 0.5 * c_d0, coefficient of D1 (subtracted); 0 on first-order steps
    "r_inv",       # 1 / r0, r0 = h_prev / h, D1 = r_inv * (x0 - prev_x0); 0 on first-order steps
)

# diffusers' DPMSolverMultistepScheduler replaces a zero terminal a_T by this (the smallest
# positive float16 subnormal) so that the first sigma is finite.
_ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def _dpm_timesteps(T: int, S: int, spacing: str | Sequence[int], steps_offset: int) -> list[int]:
    """DPMSolverMultistepScheduler's timesteps, decreasing. Unlike DDIM's, linspace and leading
    space S + 1 points and drop the last (t = 0 or steps_offset): the model is never called at the
    smallest one, the final sigma stands there instead."""
    if not isinstance(spacing, str):
        return timesteps(T, S, spacing, steps_offset)
    if spacing not in DPM_SPACINGS:
        raise ValueError(f"spacing must be one of {DPM_SPACINGS} or a sequence of ints for solver 'dpm++2m', got {spacing!r}")
    if spacing == "trailing":
        return timesteps(T, S, spacing, steps_offset)
    check_int("steps", S, 1, T - 1)
    return timesteps(T, S + 1, spacing, steps_offset)[:-1]


def _karras_sigmas(sigma_min: float, sigma_max: float, S: int) -> np.ndarray:
    """Karras et al. (2022) eq. 5, rho = 7, float64 as diffusers' ``_convert_to_karras``. (S,)"""
    rho = 7.0
    ramp = np.linspace(0, 1, S)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """The fractional timestep of ``sigma``: linear interpolation in log sigma between the two
    training timesteps around it (diffusers' ``_sigma_to_t``, the same float64 ops).
    log_sigmas: (T,) float32, increasing."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    low = int(np.clip(np.count_nonzero(log_sigmas <= log_sigma) - 1, 0, len(log_sigmas) - 2))
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _dpm_sigmas(
    ac: torch.Tensor, S: int, ts: list[int] | None, final_sigmas_type: str
) -> tuple[list[int], np.ndarray]:
    """Timesteps and the S + 1 float32 sigmas, as diffusers' ``set_timesteps`` makes them.

    ac: (T,) float32 alphas_cumprod (a zero a_T already replaced). ts: the S timesteps, or None
    for Karras sigmas, which choose the timesteps: the model is called at round(_sigma_to_t(sigma))
    while the update uses the Karras sigma itself.
    """
    sigmas = (((1 - ac) / ac) ** 0.5).numpy()  # (T,) float32, as diffusers
    if ts is None:
        log_sigmas = np.log(sigmas)
        steps = _karras_sigmas(float(sigmas[0]), float(sigmas[-1]), S)
        ts = [int(round(_sigma_to_t(v, log_sigmas))) for v in steps]
    else:
        steps = sigmas[ts].astype(np.float64)
    last = 0.0 if final_sigmas_type == "zero" else float(((1 - ac[0]) / ac[0]) ** 0.5)
    return ts, np.concatenate([steps, [last]]).astype(np.float32)


def _dpm_point(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha, sigma_t, lambda) of a 0-dim float32 sigma, with diffusers' float32 ops."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    sigma_t = sigma * alpha
    return alpha, sigma_t, torch.log(alpha) - torch.log(sigma_t)


def _dpm_orders(S: int, solver_order: int, lower_order_final: bool, final_sigmas_type: str) -> tuple[int, ...]:
    """Per step, 1 or 2, as diffusers' ``step`` decides: the first step has no previous x0; the
    last is first order when it goes to sigma 0 (its update then returns x0) or, with
    ``lower_order_final``, when S < 15 (second order is unstable over so few steps)."""
    last_first = final_sigmas_type == "zero" or (lower_order_final and S < 15)
    return tuple(
        1 if solver_order == 1 or j == 0 or (j == S - 1 and last_first) else 2 for j in range(S)
    )


def _dpm_row(pts: list, j: int, order: int) -> torch.Tensor:
    """Row j of the DPM table (DPM_COLUMNS), float32 0-dim ops in diffusers' order."""
    alpha_s, sigma_s, lam_s = pts[j]
    alpha_t, sigma_t, lam_t = pts[j + 1]
    h = lam_t - lam_s
    c_x = sigma_t / sigma_s
    c_d0 = alpha_t * (torch.exp(-h) - 1.0)
    if order == 1:
        zero = torch.tensor(0.0)
        return torch.stack([alpha_s, sigma_s, c_x, c_d0, zero, zero])
    r0 = (lam_s - pts[j - 1][2]) / h
    return torch.stack([alpha_s, sigma_s, c_x, c_d0, 0.5 * c_d0, 1.0 / r0])


def make_dpm_plan(
    schedule: Schedule,
    steps: int,
    *,
    spacing: str | Sequence[int] | None = None,
    steps_offset: int = 0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    solver_order: int = 2,
    lower_order_final: bool = True,
    final_sigmas_type: str = "zero",
    use_karras_sigmas: bool = False,
) -> Plan:
    """The DPM-Solver++(2M) plan (Lu et al. 2022), as diffusers' ``DPMSolverMultistepScheduler``
    with ``algorithm_type="dpmsolver++"``, ``solver_type="midpoint"``.

    Timesteps (where the model is called) and sigmas (where the update goes) are made as its
    ``set_timesteps`` does, and every per-step scalar (DPM_COLUMNS) with the float32 tensor ops of
    its ``step``, so ``reference.dpm_solver_sample`` equals its loop bit for bit on the CPU.

    Args:
        spacing: ``"linspace"`` (None: the default, diffusers' too), ``"leading"``,
            ``"trailing"`` or explicit timesteps; must stay None with ``use_karras_sigmas``.
        steps_offset: added to ``leading`` timesteps only.
        prediction_type, thresholding, dynamic_thresholding_ratio, sample_max_value: as diffusers.
        clip_sample, clip_sample_range: clamp x0 to +-range before it joins the history (where
            thresholding acts). Not a diffusers option for this scheduler (it has none): a
            fastddim one, off by default, for parity with DDIM runs.
        solver_order: 2, or 1 (first order everywhere: DDIM's update in DPM-Solver's variables).
        lower_order_final: first order on the last step when S < 15.
        final_sigmas_type: ``"zero"`` (the last step returns its x0) or ``"sigma_min"`` (stop at
            the sigma of t = 0).
        use_karras_sigmas: Karras sigmas (rho = 7) between the schedule's smallest and largest,
            the model called at the nearest timestep ("DPM++ 2M Karras").
    """
    x0_options = _x0_options(schedule, prediction_type, clip_sample, clip_sample_range, thresholding,
                             dynamic_thresholding_ratio, sample_max_value, steps_offset)
    solver_order = check_int("solver_order", solver_order, 1, 2)
    if final_sigmas_type not in FINAL_SIGMAS_TYPES:
        raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got {final_sigmas_type!r}")
    T = schedule.T
    ac = schedule.alphas_cumprod
    if schedule.zero_terminal_snr:
        ac = ac.clone()
        ac[-1] = _ZERO_SNR_ALPHA_CUMPROD
    if use_karras_sigmas:
        if spacing is not None or steps_offset:
            raise ValueError("spacing and steps_offset must be left unset with use_karras_sigmas: its sigmas choose the timesteps")
        ts, sigmas = _dpm_sigmas(ac, check_int("steps", steps, 1), None, final_sigmas_type)
        if len(ts) > 1 and ts[0] == ts[1]:
            # diffusers starts a run whose first timestep repeats at the second occurrence and runs
            # off the end of its sigmas (IndexError): e.g. zero-SNR schedules at S = 50
            raise ValueError(f"steps={steps}: use_karras_sigmas repeats the first timestep {ts[0]}; use fewer steps")
    else:
        ts = _dpm_timesteps(T, steps, "linspace" if spacing is None else spacing, steps_offset)
        if steps is not None and steps != len(ts):
            raise ValueError(f"steps={steps} does not match the {len(ts)} explicit timesteps given in spacing")
        ts, sigmas = _dpm_sigmas(ac, len(ts), ts, final_sigmas_type)
    S = len(ts)
    orders = _dpm_orders(S, solver_order, bool(lower_order_final), final_sigmas_type)
    sig = torch.from_numpy(sigmas)
    pts = [_dpm_point(sig[k]) for k in range(S + 1)]
    table = torch.stack([_dpm_row(pts, j, orders[j]) for j in range(S)]).to(torch.float32)
    return Plan(
        timesteps=tuple(ts),
        prev_timesteps=tuple(ts[1:]) + (-1,),
        table=table,
        scalars=tuple(tuple(float(v) for v in row) for row in table),
        noise=(False,) * S,
        eta=0.0,
        **x0_options,
        use_clipped_model_output=False,
        final_alpha_cumprod=float(pts[S][0]) ** 2,
        solver="dpm++2m",
        orders=orders,
        sigmas=tuple(float(v) for v in sigmas),
    )
