"""Classifier-free guidance: the per-run description (``Guidance``) and the reference math.

    out = u + w * (c - u)                                   (Ho & Salimans 2022; diffusers' convention)

with u, c the model's raw outputs for the unconditional and the conditional kwargs at the same
(x_t, t), before any prediction-type conversion (a v-model is guided on v, as diffusers and the
Stability code do); clipping and thresholding come after. ``w = 1`` is the conditional
prediction alone and needs no unconditional call.

What lives here is host data and plain torch, op for op as diffusers (0.42.1) does it:
- ``make_guidance``: every argument check, before any model call, and the per-step table
  (``weights[j]``: the scale of step j; ``calls[j]``: 2 when step j needs the unconditional half).
- ``combine``, ``rescale``, ``guide``: the Stable Diffusion pipeline's combine and
  ``rescale_noise_cfg`` (Lin et al. 2023); ``cfgpp_outputs``: CFG++ (Chung et al. 2024);
  ``rescale_ratio_torch``: the rescale's per-sample ratio, the fused steps' reduction pass.
- ``halves_kwargs``, ``doubled_kwargs``, ``halves``: the kwargs of one doubled call
  ([uncond; cond], unconditional half first, as the Stable Diffusion pipeline) or of two calls,
  from kwargs already sliced per batch (``fastddim.kwargs``), and the split of the doubled output.

Imports point one way: this module needs only ``checks``; the reference step and the engine use it.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .checks import check_float, check_int

__all__ = [
    "GUIDANCE_METHODS", "Guidance", "make_guidance", "combine", "rescale", "rescale_ratio_torch", "guide", "cfgpp_outputs",
    "halves_kwargs", "doubled_kwargs", "halves",
]

GUIDANCE_METHODS = ("cfg", "cfg++")


@dataclass(frozen=True)
class Guidance:
    """The guidance of one run, made by :func:`make_guidance` (host data, made once).

    ``weights[j]`` is step j's scale (w for "cfg", lambda for "cfg++"; 1.0 outside the interval);
    ``calls[j]`` is 2 when step j runs the unconditional half too, 1 when the conditional
    prediction alone is used (no unconditional call). ``split``: two model calls per guided step
    instead of one on the doubled batch. ``uncond_kwargs`` are the checked, unsliced kwargs of the
    unconditional half (not part of equality or the hash: the per-step table is what a captured
    graph depends on).
    """

    method: str
    weights: tuple[float, ...]
    calls: tuple[int, ...]
    rescale: float
    interval: tuple[float, float] | None
    split: bool
    uncond_kwargs: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def active(self) -> bool:
        """Whether any step calls the unconditional half (False: plain conditional sampling)."""
        return 2 in self.calls

    @property
    def uncond_steps(self) -> int:
        """Steps that run the unconditional half (the interval's saving is S minus this)."""
        return self.calls.count(2)


# ------------------------------------------------------------------------------ checks
def _check_method(guidance) -> str:
    if guidance not in GUIDANCE_METHODS:
        raise ValueError(f"guidance must be one of {GUIDANCE_METHODS}, got {guidance!r}")
    return guidance


def _check_weights(guidance_scale, steps: int, method: str) -> list[float]:
    """One scale per step: a number for every step, or a sequence of ``steps`` numbers.
    "cfg": finite and >= 0; "cfg++": lambda in [0, 1] (it interpolates, it does not extrapolate)."""
    hi = 1.0 if method == "cfg++" else None
    if isinstance(guidance_scale, numbers.Real) and not isinstance(guidance_scale, bool):
        return [check_float("guidance_scale", guidance_scale, 0.0, hi)] * steps
    if isinstance(guidance_scale, (str, bytes)) or not isinstance(guidance_scale, Sequence):
        raise TypeError(f"guidance_scale must be a number or a sequence of one number per step, "
                        f"got {type(guidance_scale).__name__}")
    if len(guidance_scale) != steps:
        raise ValueError(f"guidance_scale: a per-step list needs {steps} weights (one per step), "
                         f"got {len(guidance_scale)}")
    return [check_float(f"guidance_scale[{j}]", w, 0.0, hi) for j, w in enumerate(guidance_scale)]


def _check_interval(guidance_interval) -> tuple[float, float] | None:
    """(t_lo, t_hi): two finite numbers with t_lo <= t_hi, in timestep units (inclusive)."""
    if guidance_interval is None:
        return None
    if isinstance(guidance_interval, (str, bytes)) or not isinstance(guidance_interval, Sequence) \
            or len(guidance_interval) != 2:
        raise ValueError(f"guidance_interval must be a pair (t_lo, t_hi) of timesteps, got {guidance_interval!r}")
    lo, hi = (check_float(f"guidance_interval[{i}]", v) for i, v in enumerate(guidance_interval))
    if lo > hi:
        raise ValueError(f"guidance_interval must have t_lo <= t_hi, got ({lo}, {hi})")
    return lo, hi


def _check_kwargs(name: str, kw, n: int) -> dict:
    """A dict whose tensors have a leading (batch) dimension of 1 (shared) or n (one row per sample)."""
    if not isinstance(kw, dict):
        raise TypeError(f"{name} must be a dict, got {type(kw).__name__}")
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and (v.ndim == 0 or v.shape[0] not in (1, n)):
            lead = "no leading dimension" if v.ndim == 0 else f"leading dimension {v.shape[0]}"
            raise ValueError(f"{name}[{k!r}] has {lead}: guided kwargs need a leading dimension of n = {n} "
                             "(one row per sample) or 1 (shared by all)")
    return kw


def _same(a, b) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:  # an object whose == is not a truth value (e.g. holds tensors)
        return False


def _check_pairs(uncond: dict, cond: dict, split: bool) -> None:
    """Both sides name the same keys (diffusers passes the same keys to both halves); per key,
    two tensors of the same trailing shape and dtype (they are concatenated for the doubled call),
    or two non-tensors, equal unless the halves run as two calls (one doubled call takes one)."""
    if uncond.keys() != cond.keys():
        only_u, only_c = sorted(uncond.keys() - cond.keys()), sorted(cond.keys() - uncond.keys())
        raise ValueError(f"uncond_kwargs and model_kwargs must have the same keys: only in uncond_kwargs "
                         f"{only_u}, only in model_kwargs {only_c}")
    for k, u in uncond.items():
        c = cond[k]
        if isinstance(u, torch.Tensor) != isinstance(c, torch.Tensor):
            raise TypeError(f"uncond_kwargs[{k!r}] and model_kwargs[{k!r}] must both be tensors or both not, "
                            f"got {type(u).__name__} and {type(c).__name__}")
        if isinstance(u, torch.Tensor):
            if u.shape[1:] != c.shape[1:] or u.dtype != c.dtype:
                raise ValueError(f"uncond_kwargs[{k!r}] is {u.dtype} {tuple(u.shape)} but model_kwargs[{k!r}] is "
                                 f"{c.dtype} {tuple(c.shape)}: they need the same dtype and the same shape after "
                                 "the leading dimension")
        elif not split and not _same(u, c):
            raise ValueError(f"uncond_kwargs[{k!r}] = {u!r} differs from model_kwargs[{k!r}] = {c!r}: one doubled "
                             "call passes one value to both halves (use split calls to pass each its own)")


# ------------------------------------------------------------------------------ the table
def make_guidance(
    timesteps: Sequence[int],
    guidance_scale: float | Sequence[float] = 1.0,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
    guidance: str = "cfg",
    uncond_kwargs: dict | None = None,
    model_kwargs: dict | None = None,
    n: int = 1,
    split: bool = False,
) -> Guidance:
    """Check a guided run's arguments (before any model call) and make its per-step table.

    Args:
        timesteps: the timestep each step evaluates the model at, in step order (``plan.timesteps``).
        guidance_scale: w, diffusers' convention ``u + w (c - u)``, finite and >= 0; or one weight per
            step. For ``guidance="cfg++"``, lambda in [0, 1].
        guidance_rescale: phi in [0, 1] of ``rescale_noise_cfg`` (Lin et al. 2023), "cfg" only.
        guidance_interval: (t_lo, t_hi): guide only the steps whose timestep t has t_lo <= t <= t_hi
            (Kynkaenniemi et al. 2024); elsewhere the weight is 1, i.e. the conditional prediction
            alone with no unconditional call.
        guidance: ``"cfg"`` or ``"cfg++"`` (Chung et al. 2024, see :func:`cfgpp_outputs`).
        uncond_kwargs: the unconditional half's model kwargs (e.g. the null class label, the
            negative prompt's embeddings); required when any step runs it. The same keys as
            ``model_kwargs``; tensors with leading dimension n (sliced per batch) or 1 (shared), the
            same trailing shape and dtype as their ``model_kwargs`` counterpart.
        model_kwargs: the conditional half's kwargs (None: none).
        n: the number of samples of the run.
        split: run the two halves as two calls (less memory) instead of one doubled call.

    Returns:
        A :class:`Guidance`. "cfg": ``calls[j]`` is 1 where ``weights[j] == 1``. "cfg++": 2 on
        every step inside the interval (its direction term needs the unconditional eps even at
        lambda = 1), 1 outside.

    Raises:
        TypeError, ValueError: naming the argument.
    """
    method = _check_method(guidance)
    ts = list(timesteps)
    n = check_int("n", n, 1)
    weights = _check_weights(guidance_scale, len(ts), method)
    phi = check_float("guidance_rescale", guidance_rescale, 0.0, 1.0)
    if method == "cfg++" and phi > 0:
        raise ValueError("guidance_rescale applies to guidance='cfg' only (CFG++ keeps x0 on the data manifold "
                         "by its own renoising), got guidance='cfg++' with guidance_rescale > 0")
    interval = _check_interval(guidance_interval)
    inside = [interval is None or interval[0] <= t <= interval[1] for t in ts]
    weights = [w if ins else 1.0 for w, ins in zip(weights, inside)]
    if method == "cfg++":
        calls = [2 if ins else 1 for ins in inside]
    else:
        calls = [1 if w == 1.0 else 2 for w in weights]
    if uncond_kwargs is None:
        if 2 in calls:
            w = next(w for w in weights if w != 1) if method == "cfg" else None
            what = "guidance='cfg++'" if w is None else f"guidance_scale {w}"
            raise ValueError(f"{what} needs uncond_kwargs, the unconditional half's model kwargs (e.g. "
                             "{'class_labels': torch.tensor([model.null_class_label])}); guidance_scale=1 samples "
                             "the conditional prediction alone")
        uncond = {}
    else:  # model_kwargs alone (an unguided run) are the engine's to check, as before guidance existed
        uncond = _check_kwargs("uncond_kwargs", uncond_kwargs, n)
        _check_pairs(uncond, _check_kwargs("model_kwargs", {} if model_kwargs is None else model_kwargs, n), split)
    return Guidance(method=method, weights=tuple(weights), calls=tuple(calls), rescale=phi, interval=interval,
                    split=bool(split), uncond_kwargs=uncond)


# ------------------------------------------------------------------------------ the math
def combine(out_uncond: torch.Tensor, out_cond: torch.Tensor, w: float) -> torch.Tensor:
    """``u + w * (c - u)``: the Stable Diffusion pipeline's expression, op for op.

    out_uncond, out_cond: (B, C, ...) raw model outputs; w a Python float (as diffusers passes it:
    a 0-dim float32 tensor would be rounded to a bf16 output's dtype first). Returns (B, C, ...)."""
    return out_uncond + w * (out_cond - out_uncond)


def rescale(guided: torch.Tensor, out_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """diffusers' ``rescale_noise_cfg`` (Lin et al. 2023, sec. 3.4), op for op: per sample, the
    unbiased std over every non-batch dimension, ``phi * (e * (std_c / std_e)) + (1 - phi) * e``.

    guided (e), out_cond (c): (B, C, ...); phi a Python float in [0, 1]. Returns (B, C, ...)."""
    dims = list(range(1, out_cond.ndim))
    std_c = out_cond.std(dim=dims, keepdim=True)
    std_e = guided.std(dim=dims, keepdim=True)
    return phi * (guided * (std_c / std_e)) + (1 - phi) * guided


def rescale_ratio_torch(out_uncond: torch.Tensor, out_cond: torch.Tensor, w: float) -> torch.Tensor:
    """std(c) / std(g) per sample, g = combine(u, c, w), in float32 (the fused backends' reduction
    pass; ``rescale`` is the op-for-op reference). out_uncond, out_cond: (B, C, ...). Returns (B,) fp32."""
    u, c = out_uncond.float(), out_cond.float()
    dims = list(range(1, c.ndim))
    return c.std(dim=dims) / combine(u, c, w).std(dim=dims)


def _eps_half(out: torch.Tensor, eps_channels: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the guided part, the learned-variance part or None) of an output (B, C or 2C, ...)."""
    if eps_channels is None or out.shape[1] == eps_channels:
        return out, None
    if out.shape[1] != 2 * eps_channels:
        raise ValueError(f"the model output has {out.shape[1]} channels: expected {eps_channels} (eps) or "
                         f"{2 * eps_channels} (eps and a learned variance)")
    return out[:, :eps_channels], out[:, eps_channels:]


def guide(out_uncond: torch.Tensor, out_cond: torch.Tensor, w: float, phi: float = 0.0,
          eps_channels: int | None = None) -> torch.Tensor:
    """The guided output of one "cfg" step: ``combine``, then ``rescale`` when phi > 0, as the Stable
    Diffusion pipeline does. ``w == 1`` returns ``out_cond`` itself (no arithmetic, as diffusers
    skips guidance then; note diffusers also skips it for w < 1, which is applied here).

    out_uncond, out_cond: (B, C, ...) or, for a model with a learned variance (DiT), (B, 2C, ...)
    with ``eps_channels=C``: the guidance applies to the first C channels and the variance half is
    the conditional output's (DiT's sampler does the same). Returns the shape of out_cond."""
    if w == 1:
        return out_cond
    (u, _), (c, var) = _eps_half(out_uncond, eps_channels), _eps_half(out_cond, eps_channels)
    e = combine(u, c, w)
    if phi > 0:
        e = rescale(e, c, phi)
    return e if var is None else torch.cat([e, var], dim=1)


def cfgpp_outputs(out_uncond: torch.Tensor, out_cond: torch.Tensor, lam: float,
                  eps_channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two outputs a CFG++ DDIM step reads: (the one x0 is formed from, the one eps is formed from).

    CFG++ (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion
    Models", arXiv:2406.08070, DDIM form) with lambda in [0, 1]:

        eps_lam = e_u + lam * (e_c - e_u)
        x0      = (x_t - sqrt(1 - a_t) * eps_lam) / sqrt(a_t)
        x_prev  = sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma^2) * e_u + sigma * z

    i.e. x0 from the guided prediction, the renoising direction from the unconditional one. The
    reference DDIM step calls this with its two output halves and then does what it does for one
    output: x0 = clip(predict_x0(x_t, first)), eps = the eps of (x_t, second) for its prediction
    type, ``c_x0 * x0 + c_eps * eps (+ sigma z)``. The combine is on the raw outputs as for "cfg"
    (for a v-model, x0 and eps are linear in v with weights summing to one, so this is the paper's
    update up to rounding). ``use_clipped_model_output`` would replace e_u by the eps of the clipped
    x0: the step should refuse it with CFG++.

    out_uncond, out_cond: (B, C, ...), or (B, 2C, ...) with ``eps_channels=C`` (the variance half of
    both results is the conditional output's). Returns two tensors shaped like out_cond."""
    (u, _), (c, var) = _eps_half(out_uncond, eps_channels), _eps_half(out_cond, eps_channels)
    guided = combine(u, c, lam)
    if var is None:
        return guided, u
    return torch.cat([guided, var], dim=1), torch.cat([u, var], dim=1)


# ------------------------------------------------------------------------------ model calls
def _rows(name: str, k: str, v: torch.Tensor, rows: int) -> torch.Tensor:
    if v.ndim == 0 or v.shape[0] not in (1, rows):
        raise ValueError(f"{name}[{k!r}] has shape {tuple(v.shape)}: expected a leading dimension of 1 or {rows} "
                         "(the kwargs of one batch)")
    return v.expand(rows, *v.shape[1:])


def halves_kwargs(uncond_kwargs: dict, model_kwargs: dict, rows: int) -> tuple[dict, dict]:
    """The kwargs of the two calls of a split guided step: (unconditional, conditional), each for
    ``rows`` rows. Inputs are one batch's kwargs (per-sample tensors already sliced to ``rows`` rows,
    shared ones with leading dimension 1, as ``fastddim.kwargs`` leaves them; keys checked by
    ``make_guidance``); leading-1 tensors are broadcast to ``rows`` (a view, no copy), non-tensors
    pass as they are."""
    def side(name: str, kw: dict) -> dict:
        return {k: _rows(name, k, v, rows) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}

    return side("uncond_kwargs", uncond_kwargs), side("model_kwargs", model_kwargs)


def doubled_kwargs(uncond_kwargs: dict, model_kwargs: dict, rows: int) -> dict:
    """The kwargs of one doubled call on ``cat([x, x])``: per key ``cat([uncond, cond])`` with
    2 * ``rows`` rows, the unconditional half first (the Stable Diffusion pipeline's order);
    non-tensors (equal on both sides, ``make_guidance`` checks it) pass once. Inputs as for
    :func:`halves_kwargs`."""
    u, c = halves_kwargs(uncond_kwargs, model_kwargs, rows)
    return {k: torch.cat([u[k], v]) if isinstance(v, torch.Tensor) else v for k, v in c.items()}


def halves(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out_uncond, out_cond) of a doubled call's output (2B, ...): ``out.chunk(2)``, as diffusers."""
    if out.shape[0] % 2:
        raise ValueError(f"a doubled call's output has an even batch, got {tuple(out.shape)}")
    u, c = out.chunk(2)
    return u, c
