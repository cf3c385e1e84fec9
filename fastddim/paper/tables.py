"""The paper's tables as data: the settings, the paper's own numbers, cells, summaries, observations.

The raw results of one run (what ``measure`` fills in, ``results`` stores as JSON and ``report``
renders) hold these two dicts; keys that are step counts are strings, as JSON makes them:

    table1 = {"steps": [S, ...], "etas": [eta, ...], "seeds": [seed, ...], "n": samples per cell,
              "spacing": str, "cells": {"S/eta": {"fd": [FD per seed], "hist": [[10 ints] per seed]}},
              "real": [FD of n real training digits, per seed], "seconds": float, "evals": int}
    table2 = {"steps": [S, ...], "n_for": {"S": images}, "n_common": int, "refine": K,
              "rows": {"S": {"n", "common", "mse", "se", "median", "max", "seconds", "per_image",
                             "refined": {"mse", "se", "median", "max", "seconds", "per_image"} (when K > 0)}},
              "variants": {"spacing:convention": {"S": {"mse", "se", "median", "max", "seconds", "per_image"}}},
              "variant_steps": [S, ...], "variant_n": int, "seconds": float, "evals": int}

``per_image`` holds each image's MSE in held-out order (image i is a digit i % 10), so a report can
say which digits fail; results written before it was added lack it.

Nothing here samples or draws: these are pure functions of numbers.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = [
    "TABLE1_STEPS", "TABLE1_ETAS", "TABLE2_STEPS", "PAPER_TABLE1", "PAPER_TABLE2", "eta_str", "cell_key",
    "mean_std", "mse_stats", "fmt_mean_std", "new_table1", "new_table2", "table1_complete", "table2_complete",
    "table1_observations", "table1_claims", "table2_observations", "table2_by_digit", "single_summary",
]

TABLE1_STEPS = (10, 20, 50, 100)
TABLE1_ETAS: tuple = (0.0, 0.2, 0.5, 1.0, "sigma_hat")
TABLE2_STEPS = (10, 20, 50, 100, 200, 500, 1000)
# The paper's CIFAR-10 numbers (docs FACTS section 4): Table 1 FID with quad spacing (the eta = 0
# row and eta = 1 at S = 20) and Table 2 reconstruction MSE.
PAPER_TABLE1 = {0.0: {10: 13.36, 20: 6.84, 50: 4.67, 100: 4.16}, 1.0: {20: 18.36}}
PAPER_TABLE2 = {10: 0.014, 20: 0.0065, 50: 0.0023, 100: 0.0009, 200: 0.0004, 500: 0.0001, 1000: 0.0001}


def eta_str(eta) -> str:
    """How an eta is written in keys, logs and the report: ``"0.2"``, ``"1"``, ``"sigma_hat"``."""
    return "sigma_hat" if eta == "sigma_hat" else f"{eta:g}"


def cell_key(steps: int, eta) -> str:
    """The key of a Table 1 cell: ``"10/0.2"``."""
    return f"{steps}/{eta_str(eta)}"


def mean_std(v: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for a single value)."""
    m = sum(v) / len(v)
    s = math.sqrt(sum((a - m) ** 2 for a in v) / (len(v) - 1)) if len(v) > 1 else float("nan")
    return m, s


def mse_stats(mse: torch.Tensor, seconds: float) -> dict:
    """Summary of per-image MSEs (n,): mean, its standard error, median, max, the time taken, and
    the MSEs themselves."""
    k = len(mse)
    return {"mse": float(mse.mean()), "se": float(mse.std() / math.sqrt(k)) if k > 1 else float("nan"),
            "median": float(mse.median()), "max": float(mse.max()), "seconds": seconds,
            "per_image": [float(v) for v in mse]}


def fmt_mean_std(v: Sequence[float], want: int, digits: int = 2) -> str:
    """``"87.64 ± 3.78"`` over the values of ``want`` seeds; says how many when some are missing."""
    if not v:
        return "not run"
    m, s = mean_std(v)
    txt = f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"
    return txt if len(v) >= want else f"{txt} ({len(v)} of {want} seeds)"


def new_table1(steps: list[int], etas: list, seeds: list[int], n: int, spacing: str) -> dict:
    """An empty Table 1 for these settings (see the module docstring for its keys)."""
    return {"steps": steps, "etas": etas, "seeds": seeds, "n": n, "spacing": spacing, "cells": {},
            "real": [], "seconds": 0.0, "evals": 0}


def new_table2(steps: list[int], n_for: dict[str, int], refine: int, variants: list[str],
               variant_steps: list[int], variant_n: int) -> dict:
    """An empty Table 2: ``n_for`` maps str(S) to the number of held-out digits of that row;
    ``variants`` names the diagnostic "spacing:convention" rows."""
    return {"steps": steps, "n_for": n_for, "rows": {}, "seconds": 0.0, "evals": 0, "refine": refine,
            "n_common": min(n_for.values()), "variants": {v: {} for v in variants}, "variant_steps": variant_steps,
            "variant_n": variant_n}


def table1_complete(t1: dict) -> bool:
    """Every cell has a value for every seed."""
    return all(len(t1["cells"].get(cell_key(s, e), {}).get("fd", [])) >= len(t1["seeds"])
               for s in t1["steps"] for e in t1["etas"])


def table2_complete(t2: dict) -> bool:
    """Every row is measured (with its refined encoder when K > 0), and every diagnostic cell."""
    rows = t2["rows"]
    return (all(str(s) in rows and (not t2.get("refine") or "refined" in rows[str(s)]) for s in t2["steps"])
            and all(str(s) in t2["variants"][v] for v in t2["variants"] for s in t2["variant_steps"]))


def table1_observations(t1: dict) -> list[str]:
    """Sentences on what Table 1 shows: the best and worst eta at the smallest S, and which etas do
    not improve monotonically with S (only over cells that were measured)."""
    out = []
    means = {k: mean_std(v["fd"])[0] for k, v in t1["cells"].items() if v.get("fd")}
    s0 = min(t1["steps"])
    row = {eta_str(e): means.get(cell_key(s0, e)) for e in t1["etas"]}
    if all(v is not None for v in row.values()) and len(row) > 1:
        out.append(f"at S = {s0} the best eta is {min(row, key=row.get)} and the worst is {max(row, key=row.get)}.")
    for e in t1["etas"]:
        col = [means.get(cell_key(s, e)) for s in t1["steps"]]
        if all(v is not None for v in col) and len(col) > 1 and not all(b <= a for a, b in zip(col, col[1:])):
            out.append(f"eta = {eta_str(e)} does not improve monotonically with S.")
    if len(out) == 1 and len(t1["etas"]) > 1 and all(
            means.get(cell_key(s, e)) is not None for s in t1["steps"] for e in t1["etas"]):
        out.append("Every eta improves monotonically with S.")
    return out


def table1_claims(t1: dict) -> list[str]:
    """The paper's claims on Table 1, checked seed by seed (common random numbers make a seed's cells
    comparable): eta = 0 best at every S <= 100, sigma_hat worst at the smallest S, and the best cell
    within 2x of the real-data floor. Each line says by how much a claim is missed; S rows whose
    cells are not all measured for a seed leave that seed out."""
    fd = {k: v["fd"] for k, v in t1["cells"].items()}
    etas, nseeds, out = t1["etas"], len(t1["seeds"]), []

    def row(s):  # seed index -> {eta: FD} for the seeds that every eta of this S has
        return [{eta_str(e): fd[cell_key(s, e)][i] for e in etas} for i in range(nseeds)
                if all(len(fd.get(cell_key(s, e), [])) > i for e in etas)]

    if 0.0 in etas and len(etas) > 1:
        for s in (s for s in t1["steps"] if s <= 100 and row(s)):
            seeds = row(s)
            won = sum(min(r, key=r.get) == "0" for r in seeds)
            line = f"eta = 0 best at S = {s}: under {won} of {len(seeds)} seed(s)"
            if won < len(seeds):
                gaps = [r["0"] - min(r.values()) for r in seeds]
                winners = sorted({min(r, key=r.get) for r in seeds} - {"0"})
                line += (f" (eta = {', '.join(winners)} lower where it loses; eta = 0 is {sum(gaps) / len(gaps):.2f} "
                         f"above each seed's best cell on average)")
            out.append(line + ".")
    if "sigma_hat" in etas and len(etas) > 1 and row(min(t1["steps"])):
        seeds = row(min(t1["steps"]))
        worst = sum(max(r, key=r.get) == "sigma_hat" for r in seeds)
        out.append(f"sigma_hat worst at S = {min(t1['steps'])}: under {worst} of {len(seeds)} seed(s).")
    means = {k: mean_std(v)[0] for k, v in fd.items() if len(v) >= nseeds}
    if means and t1.get("real"):
        best = min(means, key=means.get)
        floor = mean_std(t1["real"])[0]
        s, e = best.split("/")
        out.append(f"best cell S = {s}, eta = {e}: FD {means[best]:.2f}, {means[best] / floor:.2f}x the real-data "
                   f"floor {floor:.2f} (the paper's goal: within 2x, i.e. FD <= {2 * floor:.2f}).")
    return out


def table1_class_balance(t1: dict) -> dict[str, tuple[int, float, int, float]]:
    """Per measured cell, its rarest and commonest digit class and their shares of the samples, the
    histograms of all its seeds added: ``{cell_key: (rarest, share, commonest, share)}`` (shares in
    [0, 1]). The training and held-out digits are class-balanced (10% each), so a good sampler's
    shares stay near 0.1."""
    out = {}
    for k, v in t1["cells"].items():
        if v.get("hist"):
            tot = [sum(col) for col in zip(*v["hist"])]
            n = sum(tot)
            lo, hi = min(range(10), key=tot.__getitem__), max(range(10), key=tot.__getitem__)
            out[k] = (lo, tot[lo] / n, hi, tot[hi] / n)
    return out


def table2_observations(t2: dict) -> list[str]:
    """Per encoder, at how many of the measured step counts the MSE is at or below the paper's."""
    done = [s for s in t2["steps"] if str(s) in t2["rows"] and s in PAPER_TABLE2]
    if not done:
        return []
    per_encoder = [("the Euler encoder", {s: t2["rows"][str(s)] for s in done})]
    K = t2.get("refine", 0)
    if K:
        per_encoder.append((f"the refine={K} encoder", {s: t2["rows"][str(s)]["refined"] for s in done
                                                       if "refined" in t2["rows"][str(s)]}))
    obs = []
    for name, got in per_encoder:
        miss = [s for s, r in got.items() if r["mse"] > PAPER_TABLE2[s]]
        obs.append(f"{name} is at or below the paper's CIFAR-10 value at {len(got) - len(miss)} of "
                   f"{len(got)} step counts" + (f" (not at S = {', '.join(map(str, miss))})" if miss else ""))
    return obs


def table2_by_digit(t2: dict, encoder: str = "euler") -> dict[int, list[float]]:
    """Mean reconstruction MSE per digit class (0..9) of each row that kept its per-image MSEs:
    ``{S: [10 floats]}`` for the Euler encoder, or ``encoder="refined"``. Image i is a digit i % 10
    (``measure.heldout_subset``); a row of fewer than 10 images is left out."""
    out = {}
    for s in t2["steps"]:
        r = t2["rows"].get(str(s), {})
        r = r.get("refined", {}) if encoder == "refined" else r
        v = r.get("per_image", [])
        if len(v) >= 10:
            out[s] = [sum(v[c::10]) / len(v[c::10]) for c in range(10)]
    return out


def single_summary(single: dict) -> str:
    """Two lines on the single setting's result (``evaluate(...)["single"]``): FD, spread, settings,
    and the class histogram of the first seed."""
    spread = "" if math.isnan(single["std"]) else f" ± {single['std']:.3f} over {len(single['seeds'])} seeds"
    return (f"FD to held-out MNIST (classifier features, not Inception FID): {single['mean']:.3f}{spread}  "
            f"[n={single['n']}, S={single['steps']}, solver={single.get('solver', 'ddim')}, eta={eta_str(single['eta'])}, "
            f"spacing={single['spacing']}]\n"
            f"class histogram (digits 0..9, seed {single['seeds'][0]}): {single['hist'][0]}")
