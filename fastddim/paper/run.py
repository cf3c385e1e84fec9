"""``evaluate(...)``: check the settings, load the model, measure, and keep the raw results and the
report up to date after every cell. The measuring is in ``measure``, the drawing in ``figures``,
the markdown in ``report``.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import figures as figs
from . import measure, report, results, tables
from ..paths import output_folder
from .settings import Settings, check_settings
from .tables import TABLE1_ETAS, TABLE1_STEPS, TABLE2_STEPS

__all__ = ["evaluate", "DEFAULT_OUT"]

DEFAULT_OUT = "paper_eval"  # a folder named for the job, in the current directory


def evaluate(
    model="mnist", *, table1: bool = False, table2: bool = False, figures: bool = False, n: int = 128, seeds=1,
    steps: int | None = None, eta=None, spacing: str | None = None, out: str | os.PathLike = DEFAULT_OUT,
    device=None, batch_size: int | None = 128, table1_steps: Sequence[int] | str = TABLE1_STEPS,
    table1_etas: Sequence | str = TABLE1_ETAS, table2_steps: Sequence[int] | str = TABLE2_STEPS, table2_n: int = 64,
    table2_n_long: int = 16, table2_long_from: int = 200, table2_variants: Sequence[str] | str = (),
    table2_variant_steps: Sequence[int] | str = (10, 20, 50), table2_refine: int = 1,
    table1_from: str | os.PathLike | None = None, table2_from: str | os.PathLike | None = None,
    command: str | None = None,
    log: Callable[[str], None] | None = None, solver: str = "ddim",
) -> dict[str, Any]:
    """Run the measurements; with any of table1/table2/figures, write ``out/paper_tables.md`` and its
    raw results ``out/paper_tables.json`` (both rewritten after every cell, so an interrupted run
    keeps what it measured).

    Args:
        model: a model object (``sample_shape`` (1, 32, 32), ``schedule``), or what the CLI's
            ``--model`` takes (a packaged name such as ``"mnist"``, a checkpoint path, ``module:attr``),
            loaded by ``fastddim.pretrained.load_model`` on ``device`` (default CUDA if available).
        table1, table2, figures: which parts to make. With none, measure one setting
            (``steps``, default 50; ``eta``, default 0) and return its FD (mean, std over seeds).
        n: samples per Table 1 cell (and for the single setting); >= 2.
        seeds: a count k (seeds 0..k-1), a list of seeds, or a string "3" / "0,5,9".
        spacing: Table 1 and the single setting ("quad" by default; "linspace" for solver
            "dpm++2m"). Table 2 always uses "uniform".
        solver: the single setting's sampler, "ddim" (default) or "dpm++2m" (DPM-Solver++(2M); eta
            must stay 0). The tables and figures are the DDIM paper's: they refuse another solver.
        out: folder of the report, its JSON and the figures (default ``paper_eval``); made with its
            parents before the model is loaded (``fastddim.paths.output_folder``), refused when part
            of the path is a file.
        batch_size: samples per model call (results do not depend on it).
        table1_steps, table1_etas, table2_steps, table2_variant_steps: lists, or comma strings.
        table2_n: images for Table 2 rows with S < ``table2_long_from``; ``table2_n_long`` for the rest.
        table2_variants: diagnostic rows, "spacing:convention" pairs (e.g. "quad:target").
        table2_refine: K > 0 adds, for every Table 2 row, the round trip through
            ``invert(refine=K)`` (S * (1 + K) encoder calls) next to the paper's plain encoder.
        table1_from: the ``paper_tables.json`` of an earlier run of the same model: take Table 1 from
            it instead of measuring it again (implies ``table1``). An unfinished one (an interrupted
            run, or a table spread over sessions) is continued: the (cell, seed) pairs it lacks are
            measured, in its own settings (steps, etas, seeds, n, spacing), and the result equals
            a table made in one run.
        table2_from: the same for Table 2 (implies ``table2``): an unfinished one is continued row
            by row in its own settings (steps, images per row, refine, variants).
        command: the command line to print in the report (the CLI fills it in).
        log: progress lines (default: print to stderr).

    Returns:
        A dict with ``single`` / ``table1`` / ``table2`` / ``figures`` (those made), ``report`` (its
        path or None) and ``seconds``.

    Raises:
        ValueError: a bad argument or output folder (checked before any model call).
    """
    cfg = check_settings(
        table1=table1 or table1_from is not None, table2=table2 or table2_from is not None, figures=figures, n=n,
        seeds=seeds, steps=steps, eta=eta, spacing=spacing, out=out, batch_size=batch_size,
        table1_steps=table1_steps, table1_etas=table1_etas, table2_steps=table2_steps, table2_n=table2_n,
        table2_n_long=table2_n_long, table2_long_from=table2_long_from,
        table2_variants=table2_variants, table2_variant_steps=table2_variant_steps, table2_refine=table2_refine,
        table1_from=table1_from, table2_from=table2_from, solver=solver)
    loaded = {k: results.load_table(p, k) for k, p in (("table1", table1_from), ("table2", table2_from))
              if p is not None}
    if cfg.report:
        output_folder(cfg.out, "out")
    model, desc = _load(model, device)
    _check_model(model, desc, cfg, loaded)
    from .. import metrics

    metrics.heldout_features()  # load the classifier and the held-out statistics once, up front
    if device is None and isinstance(model, torch.nn.Module):
        device = next((p.device for p in model.parameters()), None)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if not cfg.report:
        return _run_single(model, cfg, device, log)
    command = command or _python_command(cfg)
    return _run_report(model, cfg, loaded, _provenance(command, desc, loaded), device, log)


def _check_model(model, desc: str, cfg: Settings, loaded: dict[str, dict]) -> None:
    measure.check_model(model)
    for key, earlier in loaded.items():
        if earlier["model_desc"] != desc:
            raise ValueError(f"{key}_from: {earlier['path']} was made with the model {earlier['model_desc']!r}, "
                             f"not {desc!r}")
    T = len(model.schedule.alphas_cumprod) if hasattr(model.schedule, "alphas_cumprod") else 1000
    for s in cfg.t1_steps + cfg.t2_steps + cfg.t2_variant_steps + ([cfg.steps] if cfg.steps else []):
        if s > T:
            raise ValueError(f"steps {s} exceed the model's T = {T}")


# ------------------------------------------------------------------------------ the model and provenance
def _load(model, device) -> tuple[Any, str]:
    """(model, description) from a model object or a name; the description identifies the weights,
    so that ``table1_from`` / ``table2_from`` can refuse a table of another model."""
    if not isinstance(model, (str, os.PathLike)):
        if not callable(model):
            raise ValueError(f"model must be a callable model, a packaged name or a checkpoint path, "
                             f"got {type(model).__name__}")
        return model, f"`{type(model).__name__}` passed in by the caller"
    from ..pretrained import load_model

    spec = os.fspath(model)
    m = load_model(spec, device)
    return m, _describe(m, spec)


def _describe(m, spec: str) -> str:
    desc = f"`{spec}`"
    if isinstance(m, torch.nn.Module):
        desc += f" ({sum(p.numel() for p in m.parameters()):,} parameters"
        sched = getattr(m, "schedule", None)
        if sched is not None and hasattr(sched, "alphas_cumprod"):
            desc += f", T = {len(sched.alphas_cumprod)}"
        desc += ")"
        from ..pretrained import _WEIGHTS_DIR, KNOWN

        f = _WEIGHTS_DIR / KNOWN[spec] if spec in KNOWN else Path(spec)
        if f.is_file():
            import hashlib

            # 12 hex digits: the form earlier reports carry, so their Table 1 stays reusable
            desc += f", weights {f.name} sha256 {hashlib.sha256(f.read_bytes()).hexdigest()[:12]}"
    return desc


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} with {torch.get_num_threads()} "
            f"thread(s), Python {platform.python_version()}, {platform.system()}")


def _python_command(cfg: Settings) -> str:
    flags = [f for f, on in (("--table1", cfg.table1), ("--table2", cfg.table2), ("--figures", cfg.figures)) if on]
    parts = ["fastddim eval", *flags, f"-n {cfg.n}", f"--seeds {','.join(map(str, cfg.seeds))}", f"--out {cfg.out}",
             f"--spacing {cfg.spacing}"]
    if cfg.batch_size:
        parts.append(f"--batch-size {cfg.batch_size}")
    return " ".join(parts) + "   (equivalent of a Python call to fastddim.paper.evaluate)"


def _provenance(command: str, desc: str, loaded: dict[str, dict]) -> dict:
    keep = ("path", "command", "machine", "started", "finished", "earlier")  # "earlier": the whole chain
    return {"command": command, "machine": _machine(), "model_desc": desc,
            "started": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            **{f"{key}_from": {k: loaded[key][k] for k in keep} if key in loaded else None
               for key in ("table1", "table2")}}


# ------------------------------------------------------------------------------ the runs
def _run_single(model, cfg: Settings, device, log) -> dict:
    t0 = time.perf_counter()
    fds, hists = [], []
    for sd in cfg.seeds:
        c = measure.fd_of_setting(model, cfg.n, cfg.steps, cfg.eta, spacing=cfg.spacing, seed=sd,
                                  batch_size=cfg.batch_size, device=device, solver=cfg.solver)
        fds.append(c["fd"])
        hists.append(c["hist"])
        log(f"seed {sd}: FD {c['fd']:.3f}  ({c['seconds']:.1f} s, {c['evals'] / c['seconds']:.0f} evals/s)")
    m, s = tables.mean_std(fds)
    single = {"n": cfg.n, "steps": cfg.steps, "eta": cfg.eta, "spacing": cfg.spacing, "solver": cfg.solver, "seeds": cfg.seeds,
              "fd": fds, "mean": m, "std": s, "hist": hists}
    return {"report": None, "single": single, "seconds": time.perf_counter() - t0}


def _plan(model, cfg: Settings, loaded: dict[str, dict]) -> tuple[int, str]:
    """(network evaluations planned, the 'Sample counts' sentence of the report)."""
    seeds, n = len(cfg.seeds), cfg.n
    t1 = _table1_evals(model, cfg, loaded.get("table1"))
    t2 = _table2_evals(cfg, loaded.get("table2"))
    counts = []
    if "table1" in loaded:
        counts.append(_taken(loaded["table1"], "table1", t1))
    elif cfg.table1:
        cells = len(cfg.t1_steps) * len(cfg.t1_etas)
        counts.append(f"Table 1: {cells} cells x {seeds} seed(s) x {n} samples = {cells * seeds * n:,} samples "
                      f"({t1:,} network evaluations), plus {seeds} x {n} real training digits")
    if "table2" in loaded:
        counts.append(_taken(loaded["table2"], "table2", t2))
    elif cfg.table2:
        K, nf = cfg.t2_refine, cfg.t2_n_for
        counts.append("Table 2: " + ", ".join(f"S={s}: {nf[str(s)]}" for s in cfg.t2_steps) + " held-out digits"
                      + (f", each also through the refine={K} encoder" if K else "")
                      + (f", and {cfg.t2_variant_n} for each diagnostic setting" if cfg.t2_variants else "")
                      + f" ({t2:,} network evaluations)")
    if cfg.figures:
        counts.append("figures: 8 samples x 4 step counts, 5 interpolations x 9 points at S = 50")
    return t1 + t2, "; ".join(counts) or "none"


def _taken(earlier: dict, key: str, evals: int) -> str:
    """The 'Sample counts' part of a table taken from an earlier run (``evals``: what it still needs)."""
    return (f"Table {key[-1]}: taken from {earlier['path']} ({earlier[key]['evals']:,} network evaluations there"
            + ("" if earlier["finished"] else f", continued here: {evals:,} more") + ")")


def _table1_evals(model, cfg: Settings, earlier: dict | None) -> int:
    """Network evaluations Table 1 still needs: all of it, or what an unfinished earlier one lacks
    in its own settings."""
    if earlier is None:
        return sum(len(cfg.seeds) * cfg.n * measure.model_calls(model, s, e, cfg.spacing)
                   for s in cfg.t1_steps for e in cfg.t1_etas) if cfg.table1 else 0
    t = earlier["table1"]
    return sum((len(t["seeds"]) - len(t["cells"].get(tables.cell_key(s, e), {}).get("fd", [])))
               * t["n"] * measure.model_calls(model, s, e, t["spacing"]) for s in t["steps"] for e in t["etas"])


def _table2_evals(cfg: Settings, earlier: dict | None) -> int:
    """Network evaluations Table 2 still needs (an encoder makes S(1 + K) calls, the decoder S)."""
    if earlier is None:
        if not cfg.table2:
            return 0
        t = tables.new_table2(cfg.t2_steps, cfg.t2_n_for, cfg.t2_refine, cfg.t2_variants, cfg.t2_variant_steps,
                              cfg.t2_variant_n)
    else:
        t = earlier["table2"]
    K = t["refine"]

    def per_image(s: int) -> int:  # calls per image of row S's missing parts
        row = t["rows"].get(str(s), {})
        return s * ((2 if not row else 0) + (2 + K if K and "refined" not in row else 0))

    return (sum(t["n_for"][str(s)] * per_image(s) for s in t["steps"])
            + sum(2 * t["variant_n"] * s for done in t["variants"].values() for s in t["variant_steps"]
                  if str(s) not in done))


class _Run:
    """The raw results of a report run, saved with the report after every measured cell."""

    def __init__(self, out: Path, st: dict, planned: int, log: Callable[[str], None]):
        self.out, self.st, self.planned, self.log = out, st, planned, log
        self.t_start = time.perf_counter()
        self.evals, self.sampling_s = 0, 0.0

    def minutes(self) -> float:
        return (time.perf_counter() - self.t_start) / 60

    def progress(self, evals: int, seconds: float, msg: str) -> None:
        self.evals += evals
        self.sampling_s += seconds
        self.log(f"{msg} [{self.evals:,}/{self.planned:,} evals, {self.minutes():.1f} min]")
        self.save()

    def save(self) -> Path:
        self.st["elapsed"] = time.perf_counter() - self.t_start
        self.st["throughput"] = self.evals / self.sampling_s if self.sampling_s else 0.0
        return report.write(self.out, self.st)


def _run_report(model, cfg: Settings, loaded: dict[str, dict], prov: dict, device, log) -> dict:
    planned, counts = _plan(model, cfg, loaded)
    st = {**prov, "done": False, "elapsed": 0.0, "throughput": 0.0, "counts": counts, "figures": {}}
    run, out, kw = _Run(cfg.out, st, planned, log), cfg.out, dict(batch_size=cfg.batch_size, device=device)
    log(f"plan: {planned:,} network evaluations for the tables; report -> {out / report.REPORT}")
    if "table1" in loaded:
        st["table1"] = loaded["table1"]["table1"]
        log(f"table1: taken from {cfg.table1_from}"
            + ("" if loaded["table1"]["finished"] else ", unfinished: continuing it"))
    elif cfg.table1:
        st["table1"] = tables.new_table1(cfg.t1_steps, cfg.t1_etas, cfg.seeds, cfg.n, cfg.spacing)
    if st.get("table1"):
        measure.measure_table1(model, st["table1"], run.progress, **kw)
        if cfg.figures:
            st["figures"]["table1"] = figs.table1(st["table1"], out).name
    run.save()
    if cfg.table2:
        _table2(model, cfg, loaded.get("table2"), st, run, kw)
    if cfg.figures:
        _image_figures(model, cfg, st, run, kw)
    st["done"] = True
    path = run.save()
    log(f"wrote {path} and {out / results.RESULTS} in {run.minutes():.1f} min")
    res = {k: st[k] for k in ("table1", "table2") if st.get(k)}
    return {**res, "figures": dict(st["figures"]), "report": str(path),
            "seconds": time.perf_counter() - run.t_start}


def _table2(model, cfg: Settings, earlier: dict | None, st: dict, run: _Run, kw: dict) -> None:
    """Measure Table 2 (or what an earlier one lacks) and draw its figures; the reconstruction
    figure's rows not measured here (taken from ``earlier``) are remade for its few digits."""
    if earlier is not None:
        st["table2"] = t2 = earlier["table2"]
        run.log(f"table2: taken from {cfg.table2_from}"
                + ("" if earlier["finished"] else ", unfinished: continuing it"))
    else:
        st["table2"] = t2 = tables.new_table2(cfg.t2_steps, cfg.t2_n_for, cfg.t2_refine, cfg.t2_variants,
                                              cfg.t2_variant_steps, cfg.t2_variant_n)
    x_all = measure.heldout_subset(max(t2["n_for"].values()))
    recons = measure.measure_table2(model, t2, x_all, run.progress, **kw)
    if cfg.figures:
        n = figs.RECONSTRUCTION_DIGITS
        for s in t2["steps"]:
            if s not in recons and t2["n_for"][str(s)] >= n:
                recons[s] = measure.reconstruction_errors(model, x_all[:n], s, **kw)[1]
        st["figures"]["table2"] = figs.table2(t2, cfg.out).name
        st["figures"]["reconstructions"] = figs.reconstructions(x_all, recons, cfg.out).name
        run.save()


def _image_figures(model, cfg: Settings, st: dict, run: _Run, kw: dict) -> None:
    t0 = time.perf_counter()
    x = measure.consistency_images(model, cfg.t1_steps, cfg.spacing, **kw)
    st["figures"]["consistency"] = figs.consistency(x, cfg.t1_steps, cfg.spacing, cfg.out).name
    run.save()
    x = measure.interpolation_images(model, pairs=5, steps=50, spacing=cfg.spacing, device=kw["device"])
    st["figures"]["interpolation"] = figs.interpolation(x, 5, 50, cfg.out).name
    run.log(f"figures: {time.perf_counter() - t0:.0f} s")
