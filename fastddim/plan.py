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
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch

from .checks import check_eta
from .schedule import Schedule

__all__ = ["SPACINGS", "PREDICTION_TYPES", "PLAN_KWARGS", "timesteps", "paper_timesteps", "Plan", "make_plan", "COLUMNS"]

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


def _round_half_even(q: Fraction) -> int:
    """numpy's round() on an exact rational: ties go to the even integer."""
    f = math.floor(q)
    r = q - f
    if r > Fraction(1, 2) or (r == Fraction(1, 2) and f % 2 == 1):
        return f + 1
    return f


def timesteps(T: int, S: int, spacing: str | Sequence[int] = "uniform", steps_offset: int = 0) -> list[int]:
    """The S timesteps of a run, strictly decreasing, each in [0, T).

    Spacings (T training steps, S sampling steps):
      - ``uniform``: t = i * (T // S), i = 0..S-1 (the paper code's, which adds an extra step when
        S does not divide T; here always S). Equal to ``leading`` with ``steps_offset=0``.
      - ``quad``: the paper code's int(linspace(0, sqrt(0.8 T), S) ** 2), topping out at 0.8 T.
        Where the paper code repeats a timestep (large S) the repeat is moved up by one, so the
        plan stays strictly decreasing with S distinct entries; otherwise identical.
      - ``leading``: i * (T // S) + steps_offset (diffusers).
      - ``trailing``: round(T - i * T / S) - 1 in exact arithmetic (diffusers' float arange gives
        S + 1 entries ending at -1 for some S; this never does).
      - ``linspace``: round(i * (T - 1) / (S - 1)) (diffusers), exact arithmetic.
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
            ts = [_round_half_even(Fraction(T * (S - i), S)) - 1 for i in range(S)][::-1]
        else:  # linspace
            ts = [0] if S == 1 else [_round_half_even(Fraction(i * (T - 1), S - 1)) for i in range(S)]
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

    @property
    def steps(self) -> int:
        return len(self.timesteps)

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
        }


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
    """Build the plan: timesteps and the per-step scalar table.

    The scalars are computed with torch CPU float32 ops on 0-dim tensors in the order diffusers'
    ``DDIMScheduler.step`` uses (FACTS.md section 3), so the torch path is bit-identical to it.
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a fastddim.Schedule, got {type(schedule).__name__}")
    eta = check_eta(eta)
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
        prediction_type=prediction_type,
        clip_sample=bool(clip_sample),
        clip_sample_range=float(clip_sample_range),
        thresholding=bool(thresholding),
        dynamic_thresholding_ratio=float(dynamic_thresholding_ratio),
        sample_max_value=float(sample_max_value),
        use_clipped_model_output=bool(use_clipped_model_output),
        final_alpha_cumprod=float(final),
    )
