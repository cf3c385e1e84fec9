"""Argument checks shared by the library and the command line: one home for each.

Each check returns the value (normalised) or raises a ``TypeError``/``ValueError`` that names the
argument. The CLI builds its argparse types on these (``fastddim.cli``), so a bad value reads the
same from Python and from a shell. This module imports nothing else from fastddim.
"""
from __future__ import annotations

import math
import numbers

__all__ = ["check_int", "check_float", "check_seed", "check_eta", "check_dtype", "check_device", "check_int_list"]


def check_int(name: str, v, lo: int, hi: int | None = None) -> int:
    """An int (not a bool) in [lo, hi] (hi=None: no upper bound)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}, got {v}")
    return v


def check_float(name: str, v, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> float:
    """A finite real number in [lo, hi] (or (lo, hi] with lo_open); None bounds are open ends."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    below = lo is not None and (v <= lo if lo_open else v < lo)
    if not math.isfinite(v) or below or (hi is not None and v > hi):
        left = "(" if lo_open else "["
        rng = f"in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ValueError(f"{name} must be a finite number {rng}, got {v!r}")
    return v


def check_seed(seed) -> int:
    """A user seed: an int in [0, 2**64)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return int(seed)


def check_eta(eta) -> float | str:
    """eta: a finite number >= 0, or the string "sigma_hat" (the paper's larger-variance DDPM)."""
    if isinstance(eta, str):
        if eta != "sigma_hat":
            raise ValueError(f"eta must be a non-negative finite number or 'sigma_hat', got {eta!r}")
        return eta
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
        raise TypeError(f"eta must be a number or 'sigma_hat', got {type(eta).__name__}")
    eta = float(eta)
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a non-negative finite number or 'sigma_hat', got {eta!r}")
    return eta


def check_dtype(name: str, dtype):
    """A floating torch.dtype."""
    import torch

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating torch.dtype, got {dtype!r}")
    return dtype


def check_int_list(name: str, v, lo: int, hi: int | None = None, *, unique: bool = False) -> list[int]:
    """A non-empty sequence (not a string) of ints, each in [lo, hi] (hi=None: no upper bound);
    with ``unique``, no value twice."""
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {type(v).__name__}")
    v = list(v)
    if not v:
        raise ValueError(f"{name} must hold at least one int, got an empty list")
    bad = [x for x in v if isinstance(x, bool) or not isinstance(x, numbers.Integral)]
    if bad:
        raise TypeError(f"{name} must hold ints, got {bad[0]!r}")
    out = [int(x) for x in v]
    off = [x for x in out if x < lo or (hi is not None and x > hi)]
    if off:
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must hold ints {rng}, got {off[0]}")
    if unique and len(set(out)) != len(out):
        raise ValueError(f"{name} must not repeat a value, got {out}")
    return out


def check_device(name: str, device):
    """A device to run on: None means CUDA when available, else the CPU; otherwise "cpu", "cuda",
    "cuda:N" or a torch.device of those types, with CUDA available for a CUDA one. Returns a
    torch.device (a CUDA device keeps its index, or none when none was given)."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{name} must be a device name or torch.device, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{name}: not a device: {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: {dev.type!r} is not supported (use cpu, cuda or cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {device}: CUDA is not available on this machine")
    return dev
