"""The settings of one ``evaluate`` call, checked before anything is loaded or sampled. Lists may
come as sequences or as the CLI's comma strings ("10,20,50").
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..checks import check_eta, check_int, check_int_list

__all__ = ["Settings", "check_settings"]


@dataclass(frozen=True)
class Settings:
    """The checked arguments of one ``evaluate`` call."""
    table1: bool
    table2: bool
    figures: bool
    n: int
    seeds: list
    steps: int | None
    eta: float | str | None
    spacing: str
    out: Path
    batch_size: int | None
    t1_steps: list
    t1_etas: list
    t2_steps: list
    t2_n_for: dict
    t2_variants: list
    t2_variant_steps: list
    t2_variant_n: int
    t2_refine: int
    table1_from: str | os.PathLike | None
    table2_from: str | os.PathLike | None = None
    solver: str = "ddim"

    @property
    def report(self) -> bool:
        return self.table1 or self.table2 or self.figures


def _ints(name: str, v, lo: int, hi: int | None = None) -> list[int]:
    """A list of ints from a sequence or a comma string ("10,20,50")."""
    if isinstance(v, str):
        try:
            v = [int(p) for p in v.replace(" ", "").split(",") if p]
        except ValueError:
            raise ValueError(f"{name}: expected a comma list of ints, got {v!r}") from None
    return check_int_list(name, v, lo, hi)


def _eta(v) -> float | str:
    """An eta from a number, "sigma_hat" or a string holding a number."""
    if isinstance(v, str) and v != "sigma_hat":
        try:
            v = float(v)
        except ValueError:
            raise ValueError(f"eta must be a number >= 0 or 'sigma_hat', got {v!r}") from None
    return check_eta(v)


def _seeds(v) -> list[int]:
    """Seeds from a count k (seeds 0..k-1), a list, or a string "3" / "0,5,9"."""
    if isinstance(v, str):
        try:
            nums = [int(p, 0) for p in v.replace(" ", "").split(",") if p]
        except ValueError:
            raise ValueError(f"seeds: expected a count (e.g. 3) or a comma list (e.g. 0,5,9), got {v!r}") from None
        v = nums[0] if len(nums) == 1 and "," not in v else nums
    if isinstance(v, int) and not isinstance(v, bool):
        return list(range(check_int("seeds (a count)", v, 1)))
    return check_int_list("seeds", v, 0, 2**64 - 1, unique=True)


def _variants(v) -> list[str]:
    from ..plan import SPACINGS

    items = [p for p in v.replace(" ", "").split(",") if p] if isinstance(v, str) else [str(i) for i in v]
    for it in items:
        sp, _, conv = it.partition(":")
        if sp not in SPACINGS or conv not in ("source", "target"):
            raise ValueError(f"table2_variants: expected spacing:convention with spacing in {SPACINGS} and "
                             f"convention source or target, got {it!r}")
    return items


def check_settings(*, table1, table2, figures, n, seeds, steps, eta, spacing, out, batch_size, table1_steps,
                   table1_etas, table2_steps, table2_n, table2_n_long, table2_long_from, table2_variants,
                   table2_variant_steps, table2_refine, table1_from, table2_from=None,
                   solver="ddim") -> Settings:
    """Every argument checked, before anything is loaded or sampled."""
    from ..engine import check_solver
    from ..plan import DPM_SPACINGS, SPACINGS

    make_report = table1 or table2 or figures
    if make_report and (steps is not None or eta is not None):
        raise ValueError("--steps/--eta choose the single setting; they do not apply with --table1/--table2/--figures "
                         "(use --table1-steps/--table1-etas)")
    solver = check_solver(solver, 0.0 if eta is None else _eta(eta))
    if make_report and solver != "ddim":
        # Table 1's axis is eta, which the deterministic DPM solver does not have; Table 2 is DDIM inversion
        raise ValueError(f"solver={solver!r}: the tables and figures are the DDIM paper's (Table 1 runs S x eta); "
                         f"measure the solver as a single setting (--steps S --solver {solver})")
    spacing = ("quad" if solver == "ddim" else "linspace") if spacing is None else spacing
    allowed = SPACINGS if solver == "ddim" else DPM_SPACINGS
    if spacing not in allowed:
        raise ValueError(f"spacing must be one of {allowed} for solver {solver!r}, got {spacing!r}")
    etas = [_eta(e) for e in (table1_etas.split(",") if isinstance(table1_etas, str) else table1_etas)]
    if not etas:
        raise ValueError("table1_etas: expected at least one eta")
    t2_steps = _ints("table2_steps", table2_steps, 1, 1000)
    table2_n, n_long = check_int("table2_n", table2_n, 1, 1000), check_int("table2_n_long", table2_n_long, 1, 1000)
    long_from = check_int("table2_long_from", table2_long_from, 1)
    variants = _variants(table2_variants)
    return Settings(
        table1=table1, table2=table2, figures=figures, n=check_int("n", n, 2), seeds=_seeds(seeds),
        steps=None if make_report else check_int("steps", 50 if steps is None else steps, 1),
        eta=None if make_report else _eta(0.0 if eta is None else eta), spacing=spacing, out=Path(out),
        batch_size=None if batch_size is None else check_int("batch_size", batch_size, 1),
        t1_steps=_ints("table1_steps", table1_steps, 1, 1000), t1_etas=etas, t2_steps=t2_steps,
        t2_n_for={str(s): (table2_n if s < long_from else n_long) for s in t2_steps},
        t2_variants=variants, t2_variant_n=table2_n,
        t2_variant_steps=_ints("table2_variant_steps", table2_variant_steps, 1, 1000) if variants else [],
        t2_refine=check_int("table2_refine", table2_refine, 0, 100), table1_from=table1_from,
        table2_from=table2_from, solver=solver)
