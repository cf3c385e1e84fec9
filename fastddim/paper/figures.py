"""The report's figures (PNG): image grids and plots of the two tables. Draws only; nothing here samples.

matplotlib is imported inside the functions (``Agg`` backend), so importing ``fastddim.paper`` needs
no matplotlib unless figures are made. Every file is written atomically.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from ..images import atomic_write
from . import tables

__all__ = ["FIGURES", "RECONSTRUCTION_DIGITS", "consistency", "interpolation", "reconstructions", "table1", "table2"]

FIGURES = {
    "consistency": "fig_consistency.png",
    "interpolation": "fig_interpolation.png",
    "table1": "fig_table1.png",
    "table2": "fig_table2.png",
    "reconstructions": "fig_reconstructions.png",
}
RECONSTRUCTION_DIGITS = 8  # held-out digits shown in the reconstruction figure (one of each of 0..7)


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

    matplotlib.use("Agg")  # no display on the machines that make reports
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _plt()
    fig.tight_layout()
    with atomic_write(str(path)) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


def _image_figure(path: Path, grid, row_labels: Sequence[str], title: str, cell: int) -> Path:
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
    return _save(fig, path)


def consistency(images: torch.Tensor, steps: Sequence[int], spacing: str, out: Path) -> Path:
    """``images`` from ``measure.consistency_images``: one row per S."""
    n = len(images) // len(steps)
    return _image_figure(out / FIGURES["consistency"], _grid(images, len(steps), n), [f"S={s}" for s in steps],
                         f"same x_T, eta=0, {spacing} spacing", 32)


def interpolation(images: torch.Tensor, pairs: int, steps: int, out: Path) -> Path:
    """``images`` from ``measure.interpolation_images``: one row per pair."""
    num = len(images) // pairs
    return _image_figure(out / FIGURES["interpolation"], _grid(images, pairs, num), [f"pair {p}" for p in range(pairs)],
                         f"slerp(z0, z1), alpha = 0 .. 1, S={steps}, eta=0", 32)


def reconstructions(x0: torch.Tensor, recons: dict[int, torch.Tensor], out: Path,
                    n: int = RECONSTRUCTION_DIGITS) -> Path:
    """The first ``n`` held-out digits x0 (N, 1, 32, 32) and their round trips at each S (those with n images)."""
    keys = [s for s in sorted(recons) if len(recons[s]) >= n]
    rows = [x0[:n]] + [recons[s][:n] for s in keys]
    return _image_figure(out / FIGURES["reconstructions"], _grid(torch.cat(rows), len(rows), n),
                         ["held-out"] + [f"S={s}" for s in keys], "invert then sample (eta=0, uniform)", 32)


def table1(t1: dict, out: Path) -> Path:
    """FD against S, one line per eta (mean ± std over seeds), and the real-digit floor."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    for eta in t1["etas"]:
        xs, ms, ss = [], [], []
        for s in t1["steps"]:
            c = t1["cells"].get(tables.cell_key(s, eta))
            if c and c["fd"]:
                m, sd = tables.mean_std(c["fd"])
                xs.append(s), ms.append(m), ss.append(0 if math.isnan(sd) else sd)
        if xs:
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=f"eta={tables.eta_str(eta)}")
    if t1.get("real"):
        ax.axhline(tables.mean_std(t1["real"])[0], color="gray", ls="--", lw=1, label="real train digits")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(bottom=0)
    ax.set_xticks(list(t1["steps"]))
    ax.set_xticklabels([str(s) for s in t1["steps"]])
    ax.set_xlabel("S (model calls)")
    ax.set_ylabel("FD to held-out (classifier features)")
    ax.set_title(f"Table 1 on MNIST: n={t1['n']} per cell, {t1['spacing']} spacing", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, out / FIGURES["table1"])


def table2(t2: dict, out: Path) -> Path:
    """Reconstruction MSE against S (log-log) per encoder, the diagnostic rows, and the paper's column."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    rows = [(s, t2["rows"][str(s)]) for s in t2["steps"] if str(s) in t2["rows"]]
    if rows:
        ax.errorbar([s for s, _ in rows], [r["mse"] for _, r in rows], yerr=[r["se"] for _, r in rows],
                    marker="o", capsize=3, label="fastddim, Euler encoder, MNIST held-out ([-1, 1])")
    ref = [(s, r["refined"]) for s, r in rows if r.get("refined")]
    if ref:
        ax.errorbar([s for s, _ in ref], [r["mse"] for _, r in ref], yerr=[r["se"] for _, r in ref],
                    marker="^", capsize=3, label=f"fastddim, refined encoder (refine={t2.get('refine')})")
    for v, vr in t2.get("variants", {}).items():
        vs = [s for s in t2["variant_steps"] if str(s) in vr]
        ax.plot(vs, [vr[str(s)]["mse"] for s in vs], marker=".", ls=":", label=f"diagnostic: {v}")
    ps = [s for s in t2["steps"] if s in tables.PAPER_TABLE2]
    ax.plot(ps, [tables.PAPER_TABLE2[s] for s in ps], "s--", color="gray", label="paper, CIFAR-10")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("S (model calls to encode, and again to decode)")
    ax.set_ylabel("per-dimension MSE")
    ax.set_title("Table 2: reconstruction error", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, out / FIGURES["table2"])
