"""The raw results of a run as a JSON file beside its report: written atomically after every cell,
read back to render the report or to reuse or continue a table (``--table1-from``, ``--table2-from``).
Never parsed out of markdown.

The file (``paper_tables.json``) is one object:

    {"format": "fastddim-paper-results/1",
     "command": str, "machine": str, "model_desc": str, "started": str,   # provenance
     "done": bool, "elapsed": seconds, "throughput": network evaluations per second of sampling,
     "counts": str (what was planned), "figures": {kind: file name},
     "table1_from", "table2_from": null or {"path", "command", "machine", "started", "finished",
                                            "earlier": that file's own "table1_from" / "table2_from"},
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

__all__ = ["RESULTS", "FORMAT", "save", "load", "load_table"]

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


# What makes a stored table usable, and when it is finished (tables.py documents the keys).
_TABLES = {
    "table1": (lambda t: isinstance(t["cells"], dict) and bool(t["steps"] and t["etas"] and t["seeds"]),
               tables.table1_complete),
    "table2": (lambda t: isinstance(t["rows"], dict) and isinstance(t["variants"], dict) and bool(t["steps"])
               and all(str(s) in t["n_for"] for s in t["steps"]), tables.table2_complete),
}


def load_table(path: str | os.PathLike, key: str) -> dict:
    """Table ``key`` ("table1" or "table2") of an earlier run and its provenance: ``{key, "path",
    "command", "machine", "started", "model_desc", "finished", "earlier"}`` ("earlier": where that
    run had the table from, its ``{key}_from``, or None). An unfinished table (an
    interrupted run, or one spread over sessions) is returned too, ``finished`` False: ``evaluate``
    measures what it lacks. Errors start with ``"{key}_from:"``."""
    usable, complete = _TABLES[key]
    st = load(path, f"{key}_from")
    t = st.get(key)
    try:
        ok = usable(t)
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise ValueError(f"{key}_from: {path} holds no Table {key[-1]} results")
    return {key: t, "path": str(path), "finished": complete(t), "earlier": st.get(f"{key}_from"),
            **{k: str(st.get(k, "")) for k in ("command", "machine", "started", "model_desc")}}
