"""The raw results of a run as a JSON file beside its report: written atomically after every cell,
read back to render the report or to reuse Table 1 (``--table1-from``). Never parsed out of markdown.

The file (``paper_tables.json``) is one object:

    {"format": "fastddim-paper-results/1",
     "command": str, "machine": str, "model_desc": str, "started": str,   # provenance
     "done": bool, "elapsed": seconds, "throughput": network evaluations per second of sampling,
     "counts": str (what was planned), "figures": {kind: file name},
     "table1_from": null or {"path", "command", "machine", "started"},
     "table1": see fastddim.paper.tables (absent when not made), "table2": likewise}

Numbers a run could not define (a standard error over one image) are written as NaN, which
Python's json reads back.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..images import atomic_write
from . import tables

__all__ = ["RESULTS", "FORMAT", "save", "load", "load_table1"]

RESULTS = "paper_tables.json"
FORMAT = "fastddim-paper-results/1"


def save(path: str | os.PathLike, st: dict) -> None:
    """Write the raw results ``st`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    text = json.dumps({"format": FORMAT, **st}, indent=1)
    with atomic_write(os.fspath(path)) as f:
        f.write(text.encode() + b"\n")


def load(path: str | os.PathLike, what: str = "results") -> dict:
    """The raw results in ``path``; ``ValueError`` starting with ``what`` if it is not such a file."""
    p = Path(path)
    if p.suffix.lower() == ".md":
        raise ValueError(f"{what}: {p} is a markdown report; pass the raw results written beside it "
                         f"({p.with_suffix('.json').name}). Reports made before the raw results moved to JSON "
                         "hold them on their '<!-- raw results (JSON): ...' line")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {p}: {e.strerror or e}") from None
    try:
        st = json.loads(data)
    except ValueError:  # also bytes that are not UTF-8
        st = None
    if not isinstance(st, dict) or st.get("format") != FORMAT:
        raise ValueError(f"{what}: {p} is not a raw-results file written by fastddim eval "
                         f"(expected a JSON object with format {FORMAT!r})")
    return st


def load_table1(path: str | os.PathLike) -> dict:
    """Table 1 of an earlier run and its provenance: ``{"table1", "path", "command", "machine",
    "started", "model_desc", "finished"}``. An unfinished Table 1 (an interrupted run, or one spread
    over sessions) is returned too, ``finished`` False: ``evaluate`` measures what it lacks."""
    st = load(path, "table1_from")
    t1 = st.get("table1")
    try:
        ok = isinstance(t1["cells"], dict) and bool(t1["steps"] and t1["etas"] and t1["seeds"])
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise ValueError(f"table1_from: {path} holds no Table 1 results")
    return {"table1": t1, "path": str(path), "finished": tables.table1_complete(t1),
            **{k: str(st.get(k, "")) for k in ("command", "machine", "started", "model_desc")}}
