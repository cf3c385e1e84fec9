"""The measurements behind the tables, through the public ``fastddim.sample`` / ``fastddim.invert``.

- ``fd_of_setting``: n samples at one (S, eta, spacing, seed), their FD to the held-out digits.
- ``reconstruction_errors``: held-out digits encoded with ``invert`` and decoded with ``sample``.
- ``measure_table1`` / ``measure_table2``: fill the raw-results dicts of ``tables`` cell by cell,
  calling ``progress`` after each one so the caller can log and save partial results.

Images are (n, 1, 32, 32) float in [-1, 1] throughout.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

import fastddim

from ..checks import check_int
from . import tables

__all__ = [
    "MNIST_SHAPE", "check_model", "fd_of_setting", "heldout_subset", "reconstruction_errors", "model_calls",
    "real_digits_fd", "measure_table1", "measure_table2", "consistency_images", "interpolation_images",
]

MNIST_SHAPE = (1, 32, 32)
# progress(evals, seconds, message): evals network evaluations (one image, one timestep) just made
# in `seconds` of sampling time, and a log line saying what was measured.
Progress = Callable[[int, float, str], None]


def check_model(model) -> None:
    """The metric's classifier reads 1x32x32 digits, and the plans need the model's schedule."""
    shape = tuple(getattr(model, "sample_shape", ()) or ())
    if shape != MNIST_SHAPE:
        raise ValueError(f"the MNIST metric needs a model of 1x32x32 digits (sample_shape {MNIST_SHAPE}), "
                         f"got sample_shape {shape or None}")
    if getattr(model, "schedule", None) is None:
        raise ValueError("the model has no `schedule` attribute (fastddim.pretrained models have one)")


def model_calls(model, steps: int, eta, spacing: str) -> int:
    """Model calls per sample of one run: the plan's number of timesteps."""
    from ..plan import make_plan

    return len(make_plan(model.schedule, steps, eta=eta, spacing=spacing).timesteps)


def fd_of_setting(model, n: int, steps: int, eta=0.0, *, spacing="quad", seed: int = 0,
                  batch_size: int | None = None, device=None, **sample_kwargs) -> dict:
    """Draw ``n`` samples at (steps, eta, spacing, seed) and measure them. ``sample_kwargs`` go to
    ``fastddim.sample`` (e.g. ``solver="dpm++2m"``, ``use_karras_sigmas=True``, ``backend``).

    Returns ``{"fd": float, "hist": [10 ints], "seconds": sampling time, "evals": n * model calls}``.
    """
    from .. import metrics

    t0 = time.perf_counter()
    x = fastddim.sample(model, n, steps, eta=eta, spacing=spacing, seed=seed, batch_size=batch_size,
                        device=device, progress=False, **sample_kwargs)
    seconds = time.perf_counter() - t0
    calls = len(fastddim.info()["last_run"].get("timesteps", ())) or steps
    fd, hist = metrics.fd_and_histogram(x)
    return {"fd": fd, "hist": hist.tolist(), "seconds": seconds, "evals": n * calls}


def heldout_subset(n: int) -> torch.Tensor:
    """``n`` held-out digits (n <= 1000) as (n, 1, 32, 32), class-balanced: digit i % 10, the
    (i // 10)-th of its class. A prefix of the n = 1000 ordering, so a smaller subset is
    contained in a larger one."""
    from ..metrics import heldout_digits

    x, y = heldout_digits()
    n = check_int("n", n, 1, len(x))
    starts = [int((y < c).sum()) for c in range(10)]
    return x[[starts[i % 10] + i // 10 for i in range(n)]]


def reconstruction_errors(model, x0: torch.Tensor, steps: int, *, spacing="uniform", convention="source",
                          refine: int = 0, batch_size: int | None = None,
                          device=None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Encode x0 (n, C, H, W) with ``invert`` and decode with ``sample`` (eta 0), both over the same
    ``steps`` timesteps and ``spacing`` (``convention`` and ``refine`` go to ``invert``; the encoder
    makes ``steps * (1 + refine)`` model calls, the decoder ``steps``).

    Returns (per-image per-dimension MSE (n,), reconstructions (n, C, H, W) on the CPU, seconds).
    """
    t0 = time.perf_counter()
    z = fastddim.invert(model, x0, steps, spacing=spacing, convention=convention, refine=refine,
                        batch_size=batch_size, device=device, progress=False)
    xr = fastddim.sample(model, x_T=z, steps=steps, eta=0.0, spacing=spacing, batch_size=batch_size,
                         device=device, progress=False).cpu()
    mse = ((xr.double() - x0.cpu().double()) ** 2).flatten(1).mean(1)
    return mse, xr, time.perf_counter() - t0


def real_digits_fd(n: int, seeds: list[int]) -> list[float]:
    """The floor of Table 1: FD of ``n`` real training digits (drawn with each seed) to the held-out ones."""
    from .. import metrics

    xtr = metrics._digits("train")[0]
    return [metrics.fd_to_heldout(xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(sd))[:n]])
            for sd in seeds]


def measure_table1(model, t1: dict, progress: Progress, *, batch_size=None, device=None) -> None:
    """Fill ``t1`` (from ``tables.new_table1``, or an unfinished one to continue): the real-digit
    floor, then every (S, eta, seed) cell it does not hold yet (a cell's values are in seed order, so
    a cell holding k of them lacks the seeds after the k-th). Within a seed every cell starts from
    the same x_T (common random numbers), and a cell's FD depends only on (model, n, S, eta,
    spacing, seed): a table continued over several runs equals one made in one."""
    if len(t1.get("real", [])) < len(t1["seeds"]):
        t1["real"] = real_digits_fd(t1["n"], t1["seeds"])
    t0, seconds0 = time.perf_counter(), t1.get("seconds", 0.0)
    for s in t1["steps"]:
        for e in t1["etas"]:
            cell = t1["cells"].setdefault(tables.cell_key(s, e), {"fd": [], "hist": []})
            for sd in t1["seeds"][len(cell["fd"]):]:
                c = fd_of_setting(model, t1["n"], s, e, spacing=t1["spacing"], seed=sd, batch_size=batch_size,
                                  device=device)
                cell["fd"].append(c["fd"])
                cell["hist"].append(c["hist"])
                t1["evals"] += c["evals"]
                t1["seconds"] = seconds0 + time.perf_counter() - t0
                progress(c["evals"], c["seconds"], f"table1 S={s} eta={tables.eta_str(e)} seed={sd}: "
                                                   f"FD {c['fd']:.3f} ({c['seconds']:.0f} s)")


def measure_table2(model, t2: dict, x_all: torch.Tensor, progress: Progress, *, batch_size=None,
                   device=None) -> dict[int, torch.Tensor]:
    """Fill ``t2`` (from ``tables.new_table2``, or an unfinished one to continue) from the held-out
    digits ``x_all`` (N, 1, 32, 32): row S on its first ``n_for[S]``, with the refined encoder
    beside it when K > 0; then the diagnostic variants. What ``t2`` holds already is not measured
    again (every row depends only on the model and its own settings, so a table continued over
    several runs equals one made in one). Returns the Euler encoder's reconstructions of the rows
    measured here, per S, for the figure."""
    t0, seconds0 = time.perf_counter(), t2.get("seconds", 0.0)
    K = t2["refine"]

    def count(evals: int, seconds: float, msg: str) -> None:
        t2["evals"] += evals
        t2["seconds"] = seconds0 + time.perf_counter() - t0
        progress(evals, seconds, msg)

    recons = {}
    for s in t2["steps"]:
        k = t2["n_for"][str(s)]
        if str(s) not in t2["rows"]:
            mse, recons[s], sec = reconstruction_errors(model, x_all[:k], s, batch_size=batch_size, device=device)
            row = t2["rows"][str(s)] = {"n": k, "common": float(mse[:t2["n_common"]].mean()),
                                        **tables.mse_stats(mse, sec)}
            count(2 * k * s, sec, f"table2 S={s} n={k}: MSE {row['mse']:.2e}")
        row = t2["rows"][str(s)]
        if K and "refined" not in row:
            mse_r, _, sec_r = reconstruction_errors(model, x_all[:k], s, refine=K, batch_size=batch_size,
                                                    device=device)
            row["refined"] = tables.mse_stats(mse_r, sec_r)
            count((2 + K) * k * s, sec_r, f"table2 S={s} n={k} refine={K}: MSE {row['refined']['mse']:.2e}")
    kv = t2["variant_n"]
    for v, done in t2["variants"].items():
        sp, conv = v.split(":")
        for s in t2["variant_steps"]:
            if str(s) in done:
                continue
            mse, _, sec = reconstruction_errors(model, x_all[:kv], s, spacing=sp, convention=conv,
                                                batch_size=batch_size, device=device)
            done[str(s)] = tables.mse_stats(mse, sec)
            count(2 * kv * s, sec, f"table2 variant {v} S={s} n={kv}: MSE {float(mse.mean()):.2e} ({sec:.0f} s)")
    return recons


def consistency_images(model, steps: list[int], spacing: str = "quad", n: int = 8, seed: int = 0, *,
                       batch_size=None, device=None) -> torch.Tensor:
    """One x_T (samples 0..n-1 of ``seed``) decoded with eta 0 at each S: (len(steps) * n, 1, 32, 32),
    row-major by S. The paper's consistency claim is that the rows show the same digits."""
    return torch.cat([fastddim.sample(model, n, s, eta=0.0, spacing=spacing, seed=seed, batch_size=batch_size,
                                      device=device, progress=False).cpu() for s in steps])


def interpolation_images(model, pairs: int = 5, num: int = 9, steps: int = 50, spacing: str = "quad",
                         seed: int = 0, *, device=None) -> torch.Tensor:
    """Slerp between the x_T of samples 1000 + 2p and 1000 + 2p + 1 of ``seed``, decoded with eta 0
    (paper Fig. 6): (pairs * num, 1, 32, 32), one pair per row."""
    from ..noise import normal

    rows = []
    for p in range(pairs):
        z = normal(seed, 1000 + 2 * p, 2, 0, MNIST_SHAPE)
        rows.append(fastddim.interpolate(model, z[0], z[1], num=num, steps=steps, spacing=spacing, device=device,
                                         progress=False).cpu())
    return torch.cat(rows)
