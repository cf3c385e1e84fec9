"""Measure sample quality and reconstruction of the MNIST model, and remake the DDIM paper's Tables 1 and 2.

    fastddim eval --n 256 --steps 10 --eta 0                       # one setting: FD to held-out digits
    fastddim eval --table1 --table2 --figures --out docs/          # docs/paper_tables.md + PNGs

The quality metric is ``fastddim.metrics.fd_to_heldout``: the FID formula in the feature space
of a small MNIST classifier trained by the project. It is NOT Inception FID and its values are
not comparable to the paper's CIFAR-10 FIDs; only the orderings (over eta and S) are.

- Table 1: the metric for S in {10, 20, 50, 100} x eta in {0, 0.2, 0.5, 1, sigma_hat}, spacing
  "quad" (as the paper's CIFAR-10 numbers), ``n`` samples per cell, mean +- std over seeds.
  Every cell of one seed starts from the same x_T (common random numbers), so differences
  between cells are less noisy than the per-cell spread suggests.
- Table 2: per-dimension MSE (images in [-1, 1]) of held-out digits encoded with
  ``fastddim.invert`` and decoded with ``fastddim.sample`` at the same S (spacing "uniform",
  eta 0), for S in {10, 20, 50, 100, 200, 500, 1000}, next to the paper's CIFAR-10 column.
- Figures: one x_T decoded with S = 10, 20, 50, 100; an interpolation grid; reconstructions;
  plots of both tables.

Python: ``evaluate(model, table1=True, n=128, seeds=2, out="docs")`` returns the numbers as a
dict and writes the same report as the CLI.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "evaluate", "add_eval_arguments", "run_eval", "fd_of_setting", "reconstruction_errors",
    "heldout_subset", "TABLE1_STEPS", "TABLE1_ETAS", "TABLE2_STEPS", "PAPER_TABLE2", "PAPER_TABLE1",
]

TABLE1_STEPS = (10, 20, 50, 100)
TABLE1_ETAS: tuple = (0.0, 0.2, 0.5, 1.0, "sigma_hat")
TABLE2_STEPS = (10, 20, 50, 100, 200, 500, 1000)
# The paper's CIFAR-10 numbers (docs FACTS section 4): Table 1 FID with quad spacing (the eta = 0
# row and eta = 1 at S = 20) and Table 2 reconstruction MSE.
PAPER_TABLE1 = {0.0: {10: 13.36, 20: 6.84, 50: 4.67, 100: 4.16}, 1.0: {20: 18.36}}
PAPER_TABLE2 = {10: 0.014, 20: 0.0065, 50: 0.0023, 100: 0.0009, 200: 0.0004, 500: 0.0001, 1000: 0.0001}
REPORT = "paper_tables.md"
FIGURES = {
    "consistency": "fig_consistency.png",
    "interpolation": "fig_interpolation.png",
    "table1": "fig_table1.png",
    "table2": "fig_table2.png",
    "reconstructions": "fig_reconstructions.png",
}
_MNIST_SHAPE = (1, 32, 32)


# ----------------------------------------------------------------------------- argument parsing
def parse_eta(v) -> float | str:
    """``"sigma_hat"`` or a finite float >= 0 (from a str or a number)."""
    if isinstance(v, str):
        s = v.strip().lower().replace("-", "_")
        if s in ("sigma_hat", "sigmahat", "hat"):
            return "sigma_hat"
        try:
            v = float(s)
        except ValueError:
            raise ValueError(f"eta must be a number >= 0 or 'sigma_hat', got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"eta must be a number >= 0 or 'sigma_hat', got {v!r}")
    return float(v)


def parse_seeds(v) -> list[int]:
    """Seeds from an int k (seeds 0..k-1), a list of ints, or a string ``"3"`` / ``"0,5,9"``."""
    if isinstance(v, str):
        parts = [p for p in v.replace(" ", "").split(",") if p]
        try:
            nums = [int(p, 0) for p in parts]
        except ValueError:
            raise ValueError(f"seeds: expected a count (e.g. 3) or a comma list (e.g. 0,5,9), got {v!r}") from None
        if len(nums) == 1 and "," not in v:
            v = nums[0]
        else:
            v = nums
    if isinstance(v, bool):
        raise ValueError(f"seeds: expected a count or a list of seeds, got {v!r}")
    if isinstance(v, int):
        if v < 1:
            raise ValueError(f"seeds: the number of seeds must be >= 1, got {v}")
        return list(range(v))
    seeds = list(v)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**64 for s in seeds):
        raise ValueError(f"seeds: expected ints in [0, 2**64), got {v!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: duplicates in {seeds}")
    return seeds


def _int_list(name: str, v, lo: int, hi: int | None = None) -> list[int]:
    if isinstance(v, str):
        try:
            v = [int(p) for p in v.replace(" ", "").split(",") if p]
        except ValueError:
            raise ValueError(f"{name}: expected a comma list of ints, got {v!r}") from None
    v = list(v)
    if not v or any(isinstance(s, bool) or not isinstance(s, int) or s < lo or (hi is not None and s > hi) for s in v):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}: expected a non-empty list of ints {rng}, got {v!r}")
    return v


def _pos_int(name: str, v, lo: int = 1, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an int {rng}, got {v!r}")
    return v


def _eta_str(eta) -> str:
    return "sigma_hat" if eta == "sigma_hat" else f"{eta:g}"


# ----------------------------------------------------------------------------- measurements
def _check_model(model) -> None:
    shape = tuple(getattr(model, "sample_shape", ()) or ())
    if shape != _MNIST_SHAPE:
        raise ValueError(f"the MNIST metric needs a model of 1x32x32 digits (sample_shape {_MNIST_SHAPE}), "
                         f"got sample_shape {shape or None}")
    if getattr(model, "schedule", None) is None:
        raise ValueError("the model has no `schedule` attribute (fastddim.pretrained models have one)")


def fd_of_setting(model, n: int, steps: int, eta=0.0, *, spacing="quad", seed: int = 0,
                  batch_size: int | None = None, device=None) -> dict:
    """Draw ``n`` samples at (steps, eta, spacing, seed) and measure them.

    Returns ``{"fd": float, "hist": [10 ints], "seconds": sampling time, "evals": n * model calls}``.
    """
    import fastddim
    from . import metrics

    t0 = time.perf_counter()
    x = fastddim.sample(model, n, steps, eta=eta, spacing=spacing, seed=seed, batch_size=batch_size,
                        device=device, progress=False)
    seconds = time.perf_counter() - t0
    calls = len(fastddim.info()["last_run"].get("timesteps", ())) or steps
    fd, hist = metrics.fd_and_histogram(x)
    return {"fd": fd, "hist": hist.tolist(), "seconds": seconds, "evals": n * calls}


def heldout_subset(n: int) -> torch.Tensor:
    """``n`` held-out digits (n <= 1000), class-balanced: digit i % 10, the (i // 10)-th of its class.

    A prefix of the n = 1000 ordering, so a smaller subset is contained in a larger one.
    """
    from .data import HELD_OUT_PER_CLASS
    from .metrics import heldout_digits

    x, y = heldout_digits()
    n = _pos_int("n", n, 1, len(x))
    starts = [int((y < c).sum()) for c in range(10)]
    idx = [starts[i % 10] + i // 10 for i in range(n)]
    assert all(i // 10 < HELD_OUT_PER_CLASS for i in range(n))
    return x[idx]


def reconstruction_errors(model, x0: torch.Tensor, steps: int, *, spacing="uniform", convention="source",
                          refine: int = 0, batch_size: int | None = None,
                          device=None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Encode x0 with ``invert`` and decode with ``sample`` (eta 0), both over the same ``steps``
    timesteps and ``spacing`` (``convention`` and ``refine`` go to ``invert``; the encoder makes
    ``steps * (1 + refine)`` model calls, the decoder ``steps``).

    Returns (per-image per-dimension MSE (n,), reconstructions (n, *shape) on the CPU, seconds).
    """
    import fastddim

    t0 = time.perf_counter()
    z = fastddim.invert(model, x0, steps, spacing=spacing, convention=convention, refine=refine,
                        batch_size=batch_size, device=device, progress=False)
    xr = fastddim.sample(model, x_T=z, steps=steps, eta=0.0, spacing=spacing, batch_size=batch_size,
                         device=device, progress=False).cpu()
    mse = ((xr.double() - x0.cpu().double()) ** 2).flatten(1).mean(1)
    return mse, xr, time.perf_counter() - t0


def _mse_stats(mse: torch.Tensor, seconds: float) -> dict[str, float]:
    """Summary of per-image MSEs (n,): mean, its standard error, median, max, and the time taken."""
    k = len(mse)
    return {"mse": float(mse.mean()), "se": float(mse.std() / math.sqrt(k)) if k > 1 else float("nan"),
            "median": float(mse.median()), "max": float(mse.max()), "seconds": seconds}


def _mean_std(v: Sequence[float]) -> tuple[float, float]:
    m = sum(v) / len(v)
    s = math.sqrt(sum((a - m) ** 2 for a in v) / (len(v) - 1)) if len(v) > 1 else float("nan")
    return m, s


# ----------------------------------------------------------------------------- figures
def _grid(x: torch.Tensor, rows: int, cols: int, pad: int = 2):
    """(rows*cols, 1, H, W) in [-1, 1] -> (rows*(H+pad)+pad, cols*(W+pad)+pad) numpy in [0, 1]."""
    x = ((x.detach().cpu().float().clamp(-1, 1) + 1) / 2)[:, 0]
    h, w = x.shape[-2:]
    g = torch.ones(rows * (h + pad) + pad, cols * (w + pad) + pad)
    for k in range(min(len(x), rows * cols)):
        r, c = divmod(k, cols)
        g[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = x[k]
    return g.numpy()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _image_figure(path: Path, grid, row_labels: Sequence[str], title: str, cell: int) -> None:
    plt = _plt()
    h, w = grid.shape
    fig, ax = plt.subplots(figsize=(w / 40 + 1.2, h / 40 + 0.5), dpi=100)
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([2 + cell / 2 + i * (cell + 2) for i in range(len(row_labels))])
    ax.set_yticklabels(row_labels, fontsize=8)
    ax.set_title(title, fontsize=9)
    for s in ax.spines.values():
        s.set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def figure_consistency(model, out: Path, steps=TABLE1_STEPS, spacing="quad", n: int = 8, seed: int = 0,
                       batch_size=None, device=None) -> Path:
    """One x_T (samples 0..n-1 of ``seed``) decoded with eta 0 at each S: the paper's consistency claim."""
    import fastddim

    rows = [fastddim.sample(model, n, s, eta=0.0, spacing=spacing, seed=seed, batch_size=batch_size,
                            device=device, progress=False).cpu() for s in steps]
    path = out / FIGURES["consistency"]
    _image_figure(path, _grid(torch.cat(rows), len(steps), n), [f"S={s}" for s in steps],
                  f"same x_T, eta=0, {spacing} spacing", 32)
    return path


def figure_interpolation(model, out: Path, pairs: int = 5, num: int = 9, steps: int = 50, spacing="quad",
                         seed: int = 0, device=None) -> Path:
    """Slerp between the x_T of samples 2p and 2p+1 of ``seed``, decoded with eta 0 (paper Fig. 6)."""
    import fastddim
    from .noise import normal

    rows = []
    for p in range(pairs):
        z = normal(seed, 1000 + 2 * p, 2, 0, _MNIST_SHAPE)
        rows.append(fastddim.interpolate(model, z[0], z[1], num=num, steps=steps, spacing=spacing, device=device,
                                         progress=False).cpu())
    path = out / FIGURES["interpolation"]
    _image_figure(path, _grid(torch.cat(rows), pairs, num), [f"pair {p}" for p in range(pairs)],
                  f"slerp(z0, z1), alpha = 0 .. 1, S={steps}, eta=0", 32)
    return path


def figure_reconstructions(x0: torch.Tensor, recons: dict[int, torch.Tensor], out: Path, n: int = 8) -> Path:
    keys = [s for s in sorted(recons) if len(recons[s]) >= n]
    rows = [x0[:n]] + [recons[s][:n] for s in keys]
    path = out / FIGURES["reconstructions"]
    _image_figure(path, _grid(torch.cat(rows), len(rows), n), ["held-out"] + [f"S={s}" for s in keys],
                  "invert then sample (eta=0, uniform)", 32)
    return path


def figure_table1(res: dict, out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    for eta in res["etas"]:
        xs, ms, ss = [], [], []
        for s in res["steps"]:
            c = res["cells"].get(_cell_key(s, eta))
            if c and c["fd"]:
                m, sd = _mean_std(c["fd"])
                xs.append(s), ms.append(m), ss.append(0 if math.isnan(sd) else sd)
        if xs:
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=f"eta={_eta_str(eta)}")
    if res.get("real"):
        m, _ = _mean_std(res["real"])
        ax.axhline(m, color="gray", ls="--", lw=1, label="real train digits")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(bottom=0)
    ax.set_xticks(list(res["steps"]))
    ax.set_xticklabels([str(s) for s in res["steps"]])
    ax.set_xlabel("S (model calls)")
    ax.set_ylabel("FD to held-out (classifier features)")
    ax.set_title(f"Table 1 on MNIST: n={res['n']} per cell, {res['spacing']} spacing", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / FIGURES["table1"]
    fig.savefig(path)
    plt.close(fig)
    return path


def figure_table2(res: dict, out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    rows = [(s, res["rows"][str(s)]) for s in res["steps"] if str(s) in res["rows"]]
    if rows:
        ax.errorbar([s for s, _ in rows], [r["mse"] for _, r in rows], yerr=[r["se"] for _, r in rows],
                    marker="o", capsize=3, label="fastddim, Euler encoder, MNIST held-out ([-1, 1])")
    ref = [(s, r["refined"]) for s, r in rows if r.get("refined")]
    if ref:
        ax.errorbar([s for s, _ in ref], [r["mse"] for _, r in ref], yerr=[r["se"] for _, r in ref],
                    marker="^", capsize=3, label=f"fastddim, refined encoder (refine={res.get('refine')})")
    for v, vr in res.get("variants", {}).items():
        vs = [s for s in res["variant_steps"] if str(s) in vr]
        ax.plot(vs, [vr[str(s)]["mse"] for s in vs], marker=".", ls=":", label=f"diagnostic: {v}")
    ps = [s for s in res["steps"] if s in PAPER_TABLE2]
    ax.plot(ps, [PAPER_TABLE2[s] for s in ps], "s--", color="gray", label="paper, CIFAR-10")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("S (model calls to encode, and again to decode)")
    ax.set_ylabel("per-dimension MSE")
    ax.set_title("Table 2: reconstruction error", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / FIGURES["table2"]
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- report
def _cell_key(steps: int, eta) -> str:
    return f"{steps}/{_eta_str(eta)}"


def _fmt_ms(v: Sequence[float], want: int, digits: int = 2) -> str:
    if not v:
        return "not run"
    m, s = _mean_std(v)
    txt = f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"
    return txt if len(v) >= want else f"{txt} ({len(v)} of {want} seeds)"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} with {torch.get_num_threads()} "
            f"thread(s), Python {platform.python_version()}, {platform.system()}")


def _write_report(path: Path, st: dict) -> None:
    L: list[str] = []
    a = L.append
    a("# The DDIM paper's tables, remade on the packaged MNIST model")
    a("")
    a(f"Made by `{st['command']}`  ")
    a(f"Machine: {st['machine']}  ")
    a(f"Model: {st['model_desc']}  ")
    a(f"Started {st['started']}; {'finished' if st['done'] else 'STILL RUNNING or interrupted: cells marked not run are missing'}"
      f" after {st['elapsed'] / 60:.1f} min. Throughput while sampling: {st['throughput']:.0f} network evaluations"
      " (one image, one timestep) per second.")
    a("")
    a("**The quality metric is not Inception FID.** It is the FID formula (Frechet distance between "
      "Gaussians fitted to features) in the 64-d penultimate layer of a small MNIST classifier the project "
      "trained on the 4,000 training digits, measured against the 1,000 held-out digits "
      "(`fastddim.metrics.fd_to_heldout`, [docs/metrics.md](metrics.md)). Its scale has nothing to do with "
      "CIFAR-10 FIDs; compare orderings only. Like FID it is biased upward at small n, so every cell uses the "
      "same n, and the row 'real train digits' shows the value real data gets at that n (the floor).")
    a("")
    t1 = st.get("table1")
    if t1:
        want = len(t1["seeds"])
        a(f"## Table 1: FD to held-out digits (lower is better)")
        a("")
        a(f"Spacing `{t1['spacing']}` (the paper's CIFAR-10 choice), n = {t1['n']} samples per cell, "
          f"mean ± std over {want} seed(s) {t1['seeds']}. Within a seed every cell starts from the same x_T.")
        a("")
        src = st.get("table1_from")
        if src:
            a(f"This table was measured by an earlier run and read from its raw results (`--table1-from {src['path']}`): "
              f"`{src['command']}`, started {src['started']} on {src['machine']}.")
            a("")
        a("| eta \\ S | " + " | ".join(str(s) for s in t1["steps"]) + " |")
        a("|---|" + "---|" * len(t1["steps"]))
        for eta in t1["etas"]:
            cells = [_fmt_ms(t1["cells"].get(_cell_key(s, eta), {}).get("fd", []), want) for s in t1["steps"]]
            a(f"| {_eta_str(eta)} | " + " | ".join(cells) + " |")
        if t1.get("real"):
            a(f"| real train digits (n = {t1['n']}) | " + " | ".join([_fmt_ms(t1["real"], want)] * len(t1["steps"])) + " |")
        a("| *paper, CIFAR-10 FID, eta = 0* | " + " | ".join(str(PAPER_TABLE1[0.0].get(s, "")) for s in t1["steps"]) + " |")
        a("")
        obs = _table1_observations(t1)
        if obs:
            a("Observed: " + " ".join(obs))
            a("")
        h = t1["cells"].get(_cell_key(max(t1["steps"]), 0.0), {}).get("hist")
        if h:
            a(f"Class histogram of the S = {max(t1['steps'])}, eta = 0 samples (seed {t1['seeds'][0]}, "
              f"digits 0..9): {h[0]}.")
            a("")
        a(f"Table 1 time: {t1['seconds'] / 60:.1f} min for {t1['evals']:,} network evaluations.")
        a("")
    t2 = st.get("table2")
    if t2:
        a("## Table 2: reconstruction error of held-out digits")
        a("")
        K = t2.get("refine", 0)
        a("Encode with `fastddim.invert` and decode with `fastddim.sample` (S steps, eta = 0), spacing `uniform`. "
          "Per-dimension MSE with images in [-1, 1] (± standard error over images). On a [0, 1] scale the MSE "
          "would be 4x smaller; the comparison uses the larger [-1, 1] number. Held-out digits are class-balanced; "
          "the smaller sets are prefixes of the larger.")
        a("")
        a("- **Euler encoder (the paper's)**: `invert(S)`, the DDIM step run forward with eps at the source "
          "timestep; S model calls.")
        if K:
            a(f"- **Refined encoder**: `invert(S, refine={K})`, {K} fixed-point iteration(s) per step that move "
              "each point towards the one the decoder's step maps back onto the previous point; "
              f"{1 + K}S model calls. Not in the paper: it solves for the latent of the S-step decoder "
              "instead of integrating the ODE forward.")
        a("")
        head = "| S | images | paper, CIFAR-10 | Euler: MSE | median | max | at or below paper |"
        line = "|---|---|---|---|---|---|---|"
        if K:
            head += f" refine={K}: MSE | median | max | at or below paper |"
            line += "---|---|---|---|"
        a(head + " seconds |")
        a(line + "---|")

        def mse_cells(r, p):
            ok = "" if p == "" else ("yes" if r["mse"] <= p else "**no**")
            return f" {r['mse']:.2e} ± {r['se']:.1e} | {r['median']:.2e} | {r['max']:.2e} | {ok} |"

        for s in t2["steps"]:
            r = t2["rows"].get(str(s))
            p = PAPER_TABLE2.get(s, "")
            if r is None:
                a(f"| {s} | {t2['n_for'][str(s)]} | {p} | not run |" + " |" * (3 + 4 * bool(K)) + " |")
                continue
            rr = r.get("refined")
            row = f"| {s} | {r['n']} | {p} |" + mse_cells(r, p)
            if K:
                row += mse_cells(rr, p) if rr else " not run | | | |"
            a(row + f" {r['seconds'] + (rr['seconds'] if rr else 0):.0f} |")
        a("")
        done = [s for s in t2["steps"] if str(s) in t2["rows"] and s in PAPER_TABLE2]
        if done:
            per_encoder = [("the Euler encoder", {s: t2["rows"][str(s)] for s in done})]
            if K:
                per_encoder.append((f"the refine={K} encoder", {s: t2["rows"][str(s)]["refined"] for s in done
                                                               if "refined" in t2["rows"][str(s)]}))
            obs = []
            for name, got in per_encoder:
                miss = [s for s, r in got.items() if r["mse"] > PAPER_TABLE2[s]]
                obs.append(f"{name} is at or below the paper's CIFAR-10 value at {len(got) - len(miss)} of "
                           f"{len(got)} step counts" + (f" (not at S = {', '.join(map(str, miss))})" if miss else ""))
            a("Observed: " + "; ".join(obs) + ".")
            a("")
        if t2["variants"]:
            vs = t2["variant_steps"]
            a(f"Diagnostic: the same round trip with other settings (first {t2['variant_n']} images, mean MSE, "
              "median in brackets). `source`/`target`: where the encoder evaluates eps (see `fastddim.invert`); "
              "the decoder uses the same spacing.")
            a("")
            a("| spacing:convention | " + " | ".join(f"S = {s}" for s in vs) + " |")
            a("|---|" + "---|" * len(vs))
            base = " | ".join(f"{t2['rows'][str(s)]['mse']:.2e} ({t2['rows'][str(s)]['median']:.1e})"
                              if t2["rows"].get(str(s), {}).get("n") == t2["variant_n"] else "-" for s in vs)
            a(f"| uniform:source (the table above) | {base} |")
            for v, rows in t2["variants"].items():
                cells = [f"{rows[str(s)]['mse']:.2e} ({rows[str(s)]['median']:.1e})" if str(s) in rows else "not run"
                         for s in vs]
                a(f"| {v} | " + " | ".join(cells) + " |")
            a("")
        a(f"Table 2 time: {t2['seconds'] / 60:.1f} min for {t2['evals']:,} network evaluations.")
        a("")
    figs = st.get("figures") or {}
    if figs:
        a("## Figures")
        a("")
        titles = {
            "consistency": "Consistency: the same x_T decoded with S = 10, 20, 50, 100 (eta = 0)",
            "interpolation": "Interpolation: slerp between two x_T, decoded with eta = 0",
            "reconstructions": "Reconstructions: held-out digits, encoded and decoded at each S",
            "table1": "Table 1 as a plot",
            "table2": "Table 2 as a plot (log scale, with the paper's column)",
        }
        order = ["consistency", "interpolation", "reconstructions", "table1", "table2"]
        for k, name in sorted(figs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
            a(f"- {titles.get(k, k)}: [{name}]({name})")
            a("")
            a(f"  ![{k}]({name})")
            a("")
    a("## How to remake this")
    a("")
    a("```")
    a(st["command"])
    a("```")
    a("")
    a("Sample counts: " + st["counts"] + ".")
    a("")
    raw = {k: st[k] for k in ("table1", "table2") if st.get(k)}
    if raw:  # every number behind the tables, for re-plotting without re-sampling
        a("<!-- raw results (JSON): " + json.dumps(raw, default=str).replace("--", "- -") + " -->")
        a("")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(L))
    tmp.replace(path)


def _table1_observations(t1: dict) -> list[str]:
    out = []
    means = {k: _mean_std(v["fd"])[0] for k, v in t1["cells"].items() if v.get("fd")}
    s0 = min(t1["steps"])
    row = {_eta_str(e): means.get(_cell_key(s0, e)) for e in t1["etas"]}
    if all(v is not None for v in row.values()) and len(row) > 1:
        best = min(row, key=row.get)
        worst = max(row, key=row.get)
        out.append(f"at S = {s0} the best eta is {best} and the worst is {worst}.")
    for e in t1["etas"]:
        col = [means.get(_cell_key(s, e)) for s in t1["steps"]]
        if all(v is not None for v in col) and len(col) > 1:
            mono = all(b <= a for a, b in zip(col, col[1:]))
            if not mono:
                out.append(f"eta = {_eta_str(e)} does not improve monotonically with S.")
    if len(out) == 1 and len(t1["etas"]) > 1 and all(
            means.get(_cell_key(s, e)) is not None for s in t1["steps"] for e in t1["etas"]):
        out.append("Every eta improves monotonically with S.")
    return out


# ----------------------------------------------------------------------------- the driver
def evaluate(
    model="mnist",
    *,
    table1: bool = False,
    table2: bool = False,
    figures: bool = False,
    n: int = 128,
    seeds=1,
    steps: int | None = None,
    eta=None,
    spacing: str | None = None,
    out: str | os.PathLike = "docs",
    device=None,
    batch_size: int | None = 128,
    table1_steps: Sequence[int] = TABLE1_STEPS,
    table1_etas: Sequence = TABLE1_ETAS,
    table2_steps: Sequence[int] = TABLE2_STEPS,
    table2_n: int = 64,
    table2_n_long: int = 16,
    table2_long_from: int = 200,
    table2_variants: Sequence[str] | str = (),
    table2_variant_steps: Sequence[int] = (10, 20, 50),
    table2_refine: int = 1,
    table1_from: str | os.PathLike | None = None,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the measurements; with any of table1/table2/figures, write ``out/paper_tables.md``.

    Args:
        model: a model object (``sample_shape`` (1, 32, 32), ``schedule``), a packaged name
            (``"mnist"``) or a checkpoint path.
        table1, table2, figures: which parts to make. With none, measure one setting
            (``steps``, default 50; ``eta``, default 0) and return its FD (mean, std over seeds).
        n: samples per Table 1 cell (and for the single setting); >= 2.
        seeds: a count k (seeds 0..k-1) or a list of seeds.
        spacing: Table 1 and the single setting ("quad" by default). Table 2 always uses "uniform".
        out: directory of the report and figures.
        batch_size: samples per model call (results do not depend on it).
        table2_n: images for Table 2 rows with S < ``table2_long_from``; ``table2_n_long`` for the rest.
        table2_refine: K > 0 adds, for every Table 2 row, the round trip through
            ``invert(refine=K)`` (S * (1 + K) encoder calls) next to the paper's plain encoder.
        table1_from: a ``paper_tables.md`` written earlier by this function: take Table 1 from its
            raw results instead of measuring it again (it must be of the same model; implies
            ``table1``). Lets a long Table 1 run be combined with a later Table 2.
        command: the command line to print in the report (the CLI fills it in).
        log: progress lines (default: print to stderr).

    Returns:
        A dict with keys ``single`` / ``table1`` / ``table2`` / ``figures`` (those made), ``report``
        (its path or None) and ``seconds``.

    Raises:
        ValueError: a bad argument (checked before any sampling).
    """
    from . import metrics

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    table1 = table1 or table1_from is not None
    make_report = table1 or table2 or figures
    n = _pos_int("n", n, 2)
    seed_list = parse_seeds(seeds)
    if batch_size is not None:
        batch_size = _pos_int("batch_size", batch_size)
    if make_report and (steps is not None or eta is not None):
        raise ValueError("--steps/--eta choose the single setting; they do not apply with --table1/--table2/--figures "
                         "(use --table1-steps/--table1-etas)")
    spacing1 = "quad" if spacing is None else spacing
    from .plan import SPACINGS

    if spacing1 not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing1!r}")
    t1_steps = _int_list("table1_steps", table1_steps, 1, 1000)
    t1_etas = [parse_eta(e) for e in (table1_etas.split(",") if isinstance(table1_etas, str) else table1_etas)]
    if not t1_etas:
        raise ValueError("table1_etas: expected at least one eta")
    t2_steps = _int_list("table2_steps", table2_steps, 1, 1000)
    table2_n = _pos_int("table2_n", table2_n, 1, 1000)
    table2_n_long = _pos_int("table2_n_long", table2_n_long, 1, 1000)
    table2_long_from = _pos_int("table2_long_from", table2_long_from, 1)
    t2_variants = _variants(table2_variants)
    t2v_steps = _int_list("table2_variant_steps", table2_variant_steps, 1, 1000) if t2_variants else []
    table2_refine = _pos_int("table2_refine", table2_refine, 0, 100)
    t1_loaded = _load_table1(table1_from) if table1_from is not None else None
    if not make_report:
        steps = 50 if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        eta = parse_eta(0.0 if eta is None else eta)
    out = Path(out)
    if make_report:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out must be a directory, got the file {out}")
    model, model_desc = _load(model, device)
    _check_model(model)
    if t1_loaded is not None and t1_loaded["model_desc"] != model_desc:
        raise ValueError(f"table1_from: {table1_from} was made with the model {t1_loaded['model_desc']!r}, "
                         f"not {model_desc!r}")
    T = len(model.schedule.alphas_cumprod) if hasattr(model.schedule, "alphas_cumprod") else 1000
    for s in t1_steps + t2_steps + t2v_steps + ([steps] if not make_report else []):
        if s > T:
            raise ValueError(f"steps {s} exceed the model's T = {T}")
    metrics.heldout_features()  # load the classifier and the held-out statistics once, up front
    if device is None:
        device = next((p.device for p in model.parameters()), None) if isinstance(model, torch.nn.Module) else None

    t_start = time.perf_counter()
    result: dict[str, Any] = {"report": None}
    if not make_report:
        fds, hists = [], []
        for sd in seed_list:
            c = fd_of_setting(model, n, steps, eta, spacing=spacing1, seed=sd, batch_size=batch_size, device=device)
            fds.append(c["fd"])
            hists.append(c["hist"])
            log(f"seed {sd}: FD {c['fd']:.3f}  ({c['seconds']:.1f} s, {c['evals'] / c['seconds']:.0f} evals/s)")
        m, s = _mean_std(fds)
        result["single"] = {"n": n, "steps": steps, "eta": eta, "spacing": spacing1, "seeds": seed_list,
                            "fd": fds, "mean": m, "std": s, "hist": hists}
        result["seconds"] = time.perf_counter() - t_start
        return result

    out.mkdir(parents=True, exist_ok=True)
    report = out / REPORT
    t2_nfor = {str(s): (table2_n if s < table2_long_from else table2_n_long) for s in t2_steps}
    measure_t1 = table1 and t1_loaded is None
    t1_evals_plan = sum(len(seed_list) * n * _calls(model, s, e, spacing1) for s in t1_steps for e in t1_etas) if measure_t1 else 0
    t2_evals_plan = (sum((4 + table2_refine if table2_refine else 2) * t2_nfor[str(s)] * s for s in t2_steps)
                     + len(t2_variants) * sum(2 * table2_n * s for s in t2v_steps)) if table2 else 0
    counts = []
    if t1_loaded is not None:
        counts.append(f"Table 1: taken from {table1_from} ({t1_loaded['table1']['evals']:,} network evaluations there)")
    elif table1:
        counts.append(f"Table 1: {len(t1_steps) * len(t1_etas)} cells x {len(seed_list)} seed(s) x {n} samples "
                      f"= {len(t1_steps) * len(t1_etas) * len(seed_list) * n:,} samples ({t1_evals_plan:,} network evaluations), "
                      f"plus {len(seed_list)} x {n} real training digits")
    if table2:
        counts.append("Table 2: " + ", ".join(f"S={s}: {t2_nfor[str(s)]}" for s in t2_steps)
                      + " held-out digits" + (f", each also through the refine={table2_refine} encoder"
                                              if table2_refine else "")
                      + (f", and {table2_n} for each diagnostic setting" if t2_variants else "")
                      + f" ({t2_evals_plan:,} network evaluations)")
    if figures:
        counts.append("figures: 8 samples x 4 step counts, 5 interpolations x 9 points at S = 50")
    st: dict[str, Any] = {
        "command": command or _python_command(table1, table2, figures, n, seed_list, spacing, out, batch_size),
        "machine": _machine(), "model_desc": model_desc,
        "started": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "done": False, "elapsed": 0.0, "throughput": 0.0, "counts": "; ".join(counts) or "none",
        "figures": {},
        "table1_from": None if t1_loaded is None else {k: t1_loaded[k] for k in ("path", "command", "machine", "started")},
    }
    evals_done = [0, 0.0]  # network evaluations, seconds spent sampling

    def flush():
        st["elapsed"] = time.perf_counter() - t_start
        st["throughput"] = evals_done[0] / evals_done[1] if evals_done[1] else 0.0
        _write_report(report, st)

    log(f"plan: {t1_evals_plan + t2_evals_plan:,} network evaluations for the tables; report -> {report}")
    if t1_loaded is not None:
        t1 = st["table1"] = t1_loaded["table1"]
        log(f"table1: taken from {table1_from}")
        if figures:
            st["figures"]["table1"] = figure_table1(t1, out).name
        flush()
        result["table1"] = t1
    elif table1:
        t1 = {"steps": t1_steps, "etas": t1_etas, "seeds": seed_list, "n": n, "spacing": spacing1, "cells": {},
              "real": [], "seconds": 0.0, "evals": 0}
        st["table1"] = t1
        from .metrics import _digits

        xtr = _digits("train")[0]
        for sd in seed_list:  # the floor: real digits the classifier was trained on, n at a time
            g = torch.Generator().manual_seed(sd)
            t1["real"].append(metrics.fd_to_heldout(xtr[torch.randperm(len(xtr), generator=g)[:n]]))
        t0 = time.perf_counter()
        for s in t1_steps:
            for e in t1_etas:
                cell = t1["cells"].setdefault(_cell_key(s, e), {"fd": [], "hist": []})
                for sd in seed_list:
                    c = fd_of_setting(model, n, s, e, spacing=spacing1, seed=sd, batch_size=batch_size, device=device)
                    cell["fd"].append(c["fd"])
                    cell["hist"].append(c["hist"])
                    t1["evals"] += c["evals"]
                    evals_done[0] += c["evals"]
                    evals_done[1] += c["seconds"]
                    t1["seconds"] = time.perf_counter() - t0
                    log(f"table1 S={s} eta={_eta_str(e)} seed={sd}: FD {c['fd']:.3f} ({c['seconds']:.0f} s; "
                        f"{t1['evals']:,}/{t1_evals_plan:,} evals, {(time.perf_counter() - t_start) / 60:.1f} min)")
                    flush()
        if figures:
            st["figures"]["table1"] = figure_table1(t1, out).name
            flush()
        result["table1"] = t1
    if table2:
        t2 = {"steps": t2_steps, "n_for": t2_nfor, "rows": {}, "seconds": 0.0, "evals": 0, "refine": table2_refine,
              "n_common": min(t2_nfor.values()), "variants": {}, "variant_steps": t2v_steps, "variant_n": table2_n}
        st["table2"] = t2
        x_all = heldout_subset(max(t2_nfor.values()))
        recons = {}
        t0 = time.perf_counter()

        def t2_count(evals: int, seconds: float) -> None:
            t2["evals"] += evals
            evals_done[0] += evals
            evals_done[1] += seconds
            t2["seconds"] = time.perf_counter() - t0
        for s in t2_steps:
            k = t2_nfor[str(s)]
            mse, xr, sec = reconstruction_errors(model, x_all[:k], s, batch_size=batch_size, device=device)
            recons[s] = xr
            row = t2["rows"][str(s)] = {"n": k, "common": float(mse[:t2["n_common"]].mean()), **_mse_stats(mse, sec)}
            t2_count(2 * k * s, sec)
            msg = f"table2 S={s} n={k}: MSE {row['mse']:.2e}"
            if table2_refine:
                mse_r, _, sec_r = reconstruction_errors(model, x_all[:k], s, refine=table2_refine,
                                                        batch_size=batch_size, device=device)
                row["refined"] = _mse_stats(mse_r, sec_r)
                t2_count((2 + table2_refine) * k * s, sec_r)
                msg += f", refine={table2_refine}: {row['refined']['mse']:.2e}"
            log(msg + f" ({time.perf_counter() - t0:.0f} s, {(time.perf_counter() - t_start) / 60:.1f} min)")
            flush()
        for v in t2_variants:
            sp, conv = v.split(":")
            rows = t2["variants"].setdefault(v, {})
            for s in t2v_steps:
                mse, _, sec = reconstruction_errors(model, x_all[:table2_n], s, spacing=sp, convention=conv,
                                                    batch_size=batch_size, device=device)
                rows[str(s)] = _mse_stats(mse, sec)
                t2_count(2 * table2_n * s, sec)
                log(f"table2 variant {v} S={s} n={table2_n}: MSE {float(mse.mean()):.2e} ({sec:.0f} s)")
                flush()
        if figures:
            st["figures"]["table2"] = figure_table2(t2, out).name
            st["figures"]["reconstructions"] = figure_reconstructions(x_all, recons, out).name
            flush()
        result["table2"] = t2
    if figures:
        t0 = time.perf_counter()
        st["figures"]["consistency"] = figure_consistency(model, out, t1_steps, spacing1, batch_size=batch_size,
                                                          device=device).name
        flush()
        st["figures"]["interpolation"] = figure_interpolation(model, out, spacing=spacing1, device=device).name
        log(f"figures: {time.perf_counter() - t0:.0f} s")
    st["done"] = True
    flush()
    result.update(figures=dict(st["figures"]), report=str(report), seconds=time.perf_counter() - t_start)
    log(f"wrote {report} in {(time.perf_counter() - t_start) / 60:.1f} min")
    return result


_RAW_PREFIX = "<!-- raw results (JSON): "


def _load_table1(path) -> dict:
    """Table 1 and its provenance from a report written by ``evaluate`` (its raw-results line)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ValueError(f"table1_from: cannot read {p}: {e.strerror or e}") from None
    raw = next((ln for ln in text.splitlines() if ln.startswith(_RAW_PREFIX)), None)
    if raw is None:
        raise ValueError(f"table1_from: {p} has no raw results (not a report written by fastddim eval)")
    try:
        data = json.loads(raw[len(_RAW_PREFIX):].rsplit(" -->", 1)[0].replace("- -", "--"))
        t1 = data["table1"]
        ok = isinstance(t1["cells"], dict) and t1["steps"] and t1["etas"] and t1["seeds"]
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ValueError(f"table1_from: {p} holds no Table 1 results")
    if any(len(t1["cells"].get(_cell_key(s, e), {}).get("fd", [])) < len(t1["seeds"])
           for s in t1["steps"] for e in t1["etas"]):
        raise ValueError(f"table1_from: {p} holds an unfinished Table 1")

    def line(prefix):
        hit = next((ln for ln in text.splitlines() if ln.startswith(prefix)), "")
        return hit[len(prefix):].rstrip().removesuffix("  ").strip()

    cmd = line("Made by ")
    return {"table1": t1, "path": str(p), "command": cmd.strip("`"), "machine": line("Machine: "),
            "started": line("Started ").split(";")[0], "model_desc": line("Model: ")}


def _variants(v) -> list[str]:
    from .plan import SPACINGS

    items = [p for p in v.replace(" ", "").split(",") if p] if isinstance(v, str) else list(v)
    for it in items:
        sp, _, conv = str(it).partition(":")
        if sp not in SPACINGS or conv not in ("source", "target"):
            raise ValueError(f"table2_variants: expected spacing:convention with spacing in {SPACINGS} and "
                             f"convention source or target, got {it!r}")
    return [str(i) for i in items]


def _calls(model, steps: int, eta, spacing: str) -> int:
    from .plan import make_plan

    return len(make_plan(model.schedule, steps, eta=eta, spacing=spacing).timesteps)


def _python_command(table1, table2, figures, n, seeds, spacing, out, batch_size) -> str:
    flags = [f for f, on in (("--table1", table1), ("--table2", table2), ("--figures", figures)) if on]
    parts = ["fastddim eval", *flags, f"--n {n}", f"--seeds {','.join(map(str, seeds))}", f"--out {out}"]
    if spacing:
        parts.append(f"--spacing {spacing}")
    if batch_size:
        parts.append(f"--batch-size {batch_size}")
    return " ".join(parts) + "   (equivalent of a Python call to fastddim.evaluate.evaluate)"


def _load(model, device):
    """(model, description) from a model object, a packaged name or a checkpoint path."""
    if not isinstance(model, (str, os.PathLike)):
        if not callable(model):
            raise ValueError(f"model must be a callable model, a packaged name or a checkpoint path, got {type(model).__name__}")
        return model, f"`{type(model).__name__}` passed in by the caller"
    spec = os.fspath(model)
    try:
        from .cli import CliError, load_model
    except ImportError:
        from .pretrained import pretrained

        m = pretrained(spec, device=device)
    else:
        try:
            m = load_model(spec, device)
        except CliError as e:
            raise ValueError(str(e)) from None
    desc = f"`{spec}`"
    if isinstance(m, torch.nn.Module):
        desc += f" ({sum(p.numel() for p in m.parameters()):,} parameters"
        sched = getattr(m, "schedule", None)
        if sched is not None and hasattr(sched, "alphas_cumprod"):
            desc += f", T = {len(sched.alphas_cumprod)}"
        desc += ")"
        from .pretrained import KNOWN, _WEIGHTS_DIR

        f = _WEIGHTS_DIR / KNOWN[spec] if spec in KNOWN else Path(spec)
        if f.is_file():
            import hashlib

            desc += f", weights {f.name} sha256 {hashlib.sha256(f.read_bytes()).hexdigest()[:12]}"
    return m, desc


# ----------------------------------------------------------------------------- CLI
def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``fastddim eval`` options to ``parser``."""
    g = parser.add_argument_group("what to make (default: the metric for one setting)")
    g.add_argument("--table1", action="store_true", help="FD for S x eta (paper Table 1), mean ± std over seeds")
    g.add_argument("--table2", action="store_true", help="reconstruction MSE of held-out digits (paper Table 2)")
    g.add_argument("--figures", action="store_true", help="consistency, interpolation, reconstruction and table plots (PNG)")
    parser.add_argument("--model", default="mnist", help="packaged name, checkpoint path or module:attr (default mnist)")
    parser.add_argument("--n", type=int, default=128, help="samples per Table 1 cell / for the single setting (default 128)")
    parser.add_argument("--seeds", default="1", help="number of seeds k (0..k-1) or a comma list (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="S for the single setting (default 50)")
    parser.add_argument("--eta", default=None, help="eta for the single setting: a number >= 0 or sigma_hat (default 0)")
    parser.add_argument("--spacing", default=None, help="timestep spacing for Table 1 / the single setting (default quad)")
    parser.add_argument("--table1-steps", default=",".join(map(str, TABLE1_STEPS)), help="(default %(default)s)")
    parser.add_argument("--table1-etas", default=",".join(_eta_str(e) for e in TABLE1_ETAS), help="(default %(default)s)")
    parser.add_argument("--table2-steps", default=",".join(map(str, TABLE2_STEPS)), help="(default %(default)s)")
    parser.add_argument("--table2-n", type=int, default=64, help="held-out digits per Table 2 row below --table2-long-from (default 64)")
    parser.add_argument("--table2-n-long", type=int, default=16, help="held-out digits for the long rows (default 16)")
    parser.add_argument("--table2-long-from", type=int, default=200, help="S from which a row is long (default 200)")
    parser.add_argument("--table2-variants", default="",
                        help="diagnostic Table 2 rows for other spacing:convention pairs, e.g. quad:source,uniform:target")
    parser.add_argument("--table2-variant-steps", default="10,20,50", help="S for the diagnostic rows (default %(default)s)")
    parser.add_argument("--table2-refine", type=int, default=1, metavar="K",
                        help="also round-trip every Table 2 row through invert(refine=K); 0 to skip (default 1)")
    parser.add_argument("--table1-from", default=None, metavar="REPORT",
                        help="take Table 1 from the raw results of an earlier paper_tables.md (same model)")
    parser.add_argument("--out", default="docs", help="directory for paper_tables.md and the PNGs (default docs)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=128, help="samples per model call (default 128)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the single setting's result as JSON")


def run_eval(args: argparse.Namespace) -> int:
    """The ``fastddim eval`` command: ``args`` from a parser set up by ``add_eval_arguments``."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    cmd = "fastddim " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if prog in ("fastddim", "__main__.py", "cli.py") else None
    if cmd and args.threads is None:
        cmd += f"   (torch threads: {torch.get_num_threads()})"
    res = evaluate(
        args.model, table1=args.table1, table2=args.table2, figures=args.figures, n=args.n, seeds=args.seeds,
        steps=args.steps, eta=args.eta, spacing=args.spacing, out=args.out, device=args.device,
        batch_size=args.batch_size, table1_steps=args.table1_steps, table1_etas=args.table1_etas,
        table2_steps=args.table2_steps, table2_n=args.table2_n, table2_n_long=args.table2_n_long,
        table2_long_from=args.table2_long_from, table2_variants=args.table2_variants,
        table2_variant_steps=args.table2_variant_steps, table2_refine=args.table2_refine,
        table1_from=args.table1_from, command=cmd,
    )
    single = res.get("single")
    if single is not None:
        if getattr(args, "json", False):
            print(json.dumps(single))
        else:
            spread = "" if math.isnan(single["std"]) else f" ± {single['std']:.3f} over {len(single['seeds'])} seeds"
            print(f"FD to held-out MNIST (classifier features, not Inception FID): {single['mean']:.3f}{spread}  "
                  f"[n={single['n']}, S={single['steps']}, eta={_eta_str(single['eta'])}, spacing={single['spacing']}]")
            print(f"class histogram (digits 0..9, seed {single['seeds'][0]}): {single['hist'][0]}")
    else:
        print(res["report"])
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastddim.evaluate", description=__doc__.split("\n\n")[0])
    add_eval_arguments(p)
    return run_eval(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
