"""``paper_tables.md``, rendered from a run's raw results (``fastddim.paper.results``).

``render(st) -> str`` is a pure function of the raw-results dict; ``write(out, st)`` saves the JSON
and then the markdown rendered from it, both atomically, so the two always agree.
"""
from __future__ import annotations

from pathlib import Path

from ..images import atomic_write
from . import results, tables
from .tables import PAPER_TABLE1, PAPER_TABLE2, cell_key, eta_str, fmt_mean_std

__all__ = ["REPORT", "render", "write"]

REPORT = "paper_tables.md"
_FIGURE_TITLES = {  # in the order the report shows them
    "consistency": "Consistency: the same x_T decoded with S = 10, 20, 50, 100 (eta = 0)",
    "interpolation": "Interpolation: slerp between two x_T, decoded with eta = 0",
    "reconstructions": "Reconstructions: held-out digits, encoded and decoded at each S",
    "table1": "Table 1 as a plot",
    "table2": "Table 2 as a plot (log scale, with the paper's column)",
}


def write(out: Path, st: dict) -> Path:
    """Save ``st`` as ``out/paper_tables.json`` and render ``out/paper_tables.md`` from it; returns the report."""
    results.save(out / results.RESULTS, st)
    path = out / REPORT
    with atomic_write(str(path)) as f:
        f.write(render(st).encode())
    return path


def render(st: dict) -> str:
    """The markdown report of raw results ``st`` (see ``fastddim.paper.results`` for its keys)."""
    parts = [_header(st)]
    if st.get("table1"):
        parts.append(_table1(st["table1"], st.get("table1_from")))
    if st.get("table2"):
        t2 = st["table2"]
        parts += [_table2_intro(t2, st.get("table2_from")), _table2_rows(t2), _table2_variants(t2)]
        parts.append(f"Table 2 time: {t2['seconds'] / 60:.1f} min for {t2['evals']:,} "
                     "network evaluations.\n\n")
    parts += [_figures(st.get("figures") or {}), _remake(st)]
    return "".join(parts)


def _header(st: dict) -> str:
    state = "finished" if st["done"] else "STILL RUNNING or interrupted: cells marked not run are missing"
    return (
        "# The DDIM paper's tables, remade on the packaged MNIST model\n\n"
        f"Made by `{st['command']}`  \nMachine: {st['machine']}  \nModel: {st['model_desc']}  \n"
        f"Started {st['started']}; {state} after {st['elapsed'] / 60:.1f} min. "
        + (f"Throughput while sampling: {st['throughput']:.0f} network evaluations (one image, one timestep) per "
           "second.\n\n" if st["throughput"] else "No table cell was sampled by this run.\n\n")
        + "**The quality metric is not Inception FID.** It is the FID formula (Frechet distance between "
        "Gaussians fitted to features) in the 64-d penultimate layer of a small MNIST classifier the project "
        "trained on the 4,000 training digits, measured against the 1,000 held-out digits "
        "(`fastddim.metrics.fd_to_heldout`, described in fastddim's docs/metrics.md). Its scale has nothing to do with "
        "CIFAR-10 FIDs; compare orderings only. Like FID it is biased upward at small n, so every cell uses the "
        "same n, and the row 'real train digits' shows the value real data gets at that n (the floor).\n\n"
    )


def _table1(t1: dict, src: dict | None) -> str:
    want = len(t1["seeds"])
    L = ["## Table 1: FD to held-out digits (lower is better)", "",
         f"Spacing `{t1['spacing']}` (the paper's CIFAR-10 choice), n = {t1['n']} samples per cell, "
         f"mean ± std over {want} seed(s) {t1['seeds']}. Within a seed every cell starts from the same x_T.", ""]
    L += _earlier(src, "table1")
    L.append("| eta \\ S | " + " | ".join(str(s) for s in t1["steps"]) + " |")
    L.append("|---|" + "---|" * len(t1["steps"]))
    for eta in t1["etas"]:
        cells = [fmt_mean_std(t1["cells"].get(cell_key(s, eta), {}).get("fd", []), want) for s in t1["steps"]]
        L.append(f"| {eta_str(eta)} | " + " | ".join(cells) + " |")
    if t1.get("real"):
        L.append(f"| real train digits (n = {t1['n']}) | "
                 + " | ".join([fmt_mean_std(t1["real"], want)] * len(t1["steps"])) + " |")
    L += ["| *paper, CIFAR-10 FID, eta = 0* | " + " | ".join(str(PAPER_TABLE1[0.0].get(s, "")) for s in t1["steps"])
          + " |", ""]
    obs = tables.table1_observations(t1)
    if obs:
        L += ["Observed: " + " ".join(obs), ""]
    claims = tables.table1_claims(t1)
    if claims:
        L += ["The paper's claims, checked seed by seed:", "", *[f"- {c}" for c in claims], ""]
    L += _table1_balance(t1)
    L += [f"Table 1 time: {t1['seconds'] / 60:.1f} min for {t1['evals']:,} network evaluations.", ""]
    return "\n".join(L) + "\n"


def _table1_balance(t1: dict) -> list[str]:
    """Class balance per cell: the rarest and the commonest digit with their shares (all seeds)."""
    bal = tables.table1_class_balance(t1)
    if not bal:
        return []
    L = ["Class balance (the classifier's label for each sample, all seeds together): the rarest and the "
         "commonest digit and their shares of the samples; the training and held-out digits are 10% each.", "",
         "| eta \\ S | " + " | ".join(str(s) for s in t1["steps"]) + " |", "|---|" + "---|" * len(t1["steps"])]
    for eta in t1["etas"]:
        cells = [bal.get(cell_key(s, eta)) for s in t1["steps"]]
        L.append(f"| {eta_str(eta)} | " + " | ".join(
            f"{c[0]}: {100 * c[1]:.1f}%, {c[2]}: {100 * c[3]:.1f}%" if c else "not run" for c in cells) + " |")
    return L + [""]


def _earlier(src: dict | None, key: str) -> list[str]:
    """The lines saying that a table was taken from (or begun by) an earlier run."""
    if not src:
        return []
    how = "begun" if src.get("finished") is False else "measured"
    line = (f"This table was {how} by an earlier run and read from its raw results (`--{key}-from "
            f"{src['path']}`): `{src['command']}`, started {src['started']} on {src['machine']}"
            + ("; this run measured the cells it lacked." if how == "begun" else "."))
    src = src.get("earlier")
    while src:  # the runs before it, each read by the next (as far as the files recorded them)
        line += f" That run had the table from `{src['command']}`, started {src['started']}."
        src = src.get("earlier")
    return [line, ""]


def _table2_intro(t2: dict, src: dict | None) -> str:
    K = t2.get("refine", 0)
    L = ["## Table 2: reconstruction error of held-out digits", "",
         "Encode with `fastddim.invert` and decode with `fastddim.sample` (S steps, eta = 0), spacing `uniform`. "
         "Per-dimension MSE with images in [-1, 1] (± standard error over images). On a [0, 1] scale the MSE "
         "would be 4x smaller; the comparison uses the larger [-1, 1] number. Held-out digits are class-balanced; "
         "the smaller sets are prefixes of the larger.", "", *_earlier(src, "table2"),
         "- **Euler encoder (the paper's)**: `invert(S)`, the DDIM step run forward with eps at the source "
         "timestep; S model calls."]
    if K:
        L.append(f"- **Refined encoder**: `invert(S, refine={K})`, {K} fixed-point iteration(s) per step that move "
                 "each point towards the one the decoder's step maps back onto the previous point; "
                 f"{1 + K}S model calls. Not in the paper: it solves for the latent of the S-step decoder "
                 "instead of integrating the ODE forward.")
    return "\n".join(L) + "\n\n"


def _mse_cells(r: dict, p) -> str:
    ok = "" if p == "" else ("yes" if r["mse"] <= p else "**no**")
    return f" {r['mse']:.2e} ± {r['se']:.1e} | {r['median']:.2e} | {r['max']:.2e} | {ok} |"


def _table2_rows(t2: dict) -> str:
    K = t2.get("refine", 0)
    head = "| S | images | paper, CIFAR-10 | Euler: MSE | median | max | at or below paper |"
    line = "|---|---|---|---|---|---|---|"
    if K:
        head += f" refine={K}: MSE | median | max | at or below paper |"
        line += "---|---|---|---|"
    L = [head + " seconds |", line + "---|"]
    for s in t2["steps"]:
        r = t2["rows"].get(str(s))
        p = PAPER_TABLE2.get(s, "")
        if r is None:
            L.append(f"| {s} | {t2['n_for'][str(s)]} | {p} | not run |" + " |" * (3 + 4 * bool(K)) + " |")
            continue
        rr = r.get("refined")
        row = f"| {s} | {r['n']} | {p} |" + _mse_cells(r, p)
        if K:
            row += _mse_cells(rr, p) if rr else " not run | | | |"
        L.append(row + f" {r['seconds'] + (rr['seconds'] if rr else 0):.0f} |")
    L.append("")
    obs = tables.table2_observations(t2)
    if obs:
        L += ["Observed: " + "; ".join(obs) + ".", ""]
    return "\n".join(L + _table2_digits(t2)) + "\n"


def _table2_digits(t2: dict) -> list[str]:
    """Which digits fail: the Euler encoder's mean MSE per class, the worst class in bold."""
    by = tables.table2_by_digit(t2)
    if not by:
        return []
    L = ["Which digits fail: the Euler encoder's mean MSE per digit class (worst in bold).", "",
         "| S | " + " | ".join(map(str, range(10))) + " |", "|---|" + "---|" * 10]
    for s, v in by.items():
        worst = max(range(10), key=v.__getitem__)
        L.append(f"| {s} | " + " | ".join(f"**{m:.2e}**" if c == worst else f"{m:.2e}" for c, m in enumerate(v)) + " |")
    return L + [""]


def _table2_variants(t2: dict) -> str:
    if not t2["variants"]:
        return ""
    vs = t2["variant_steps"]

    def cell(r: dict) -> str:
        return f"{r['mse']:.2e} ({r['median']:.1e})"

    base = " | ".join(cell(t2["rows"][str(s)]) if t2["rows"].get(str(s), {}).get("n") == t2["variant_n"] else "-"
                      for s in vs)
    L = [f"Diagnostic: the same round trip with other settings (first {t2['variant_n']} images, mean MSE, "
         "median in brackets). `source`/`target`: where the encoder evaluates eps (see `fastddim.invert`); "
         "the decoder uses the same spacing.", "",
         "| spacing:convention | " + " | ".join(f"S = {s}" for s in vs) + " |", "|---|" + "---|" * len(vs),
         f"| uniform:source (the table above) | {base} |"]
    for v, rows in t2["variants"].items():
        L.append(f"| {v} | " + " | ".join(cell(rows[str(s)]) if str(s) in rows else "not run" for s in vs) + " |")
    return "\n".join(L) + "\n\n"


def _figures(figs: dict) -> str:
    if not figs:
        return ""
    order = list(_FIGURE_TITLES)
    L = ["## Figures", ""]
    for k, name in sorted(figs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
        L += [f"- {_FIGURE_TITLES.get(k, k)}: [{name}]({name})", "", f"  ![{k}]({name})", ""]
    return "\n".join(L) + "\n"


def _remake(st: dict) -> str:
    L = ["## How to remake this", "", "```", st["command"], "```", "", "Sample counts: " + st["counts"] + ".", ""]
    if st.get("table1") or st.get("table2"):
        L += [f"Every number behind the tables (for re-plotting without re-sampling, or for `--table1-from` / "
              "`--table2-from`): "
              f"[{results.RESULTS}]({results.RESULTS}).", ""]
    return "\n".join(L)
