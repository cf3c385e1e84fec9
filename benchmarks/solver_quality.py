"""Quality per model call: DDIM (eta 0) against DPM-Solver++(2M) on the built-in MNIST model.

    python benchmarks/solver_quality.py --n 500 --seeds 2 --model mnist-v1 --out docs/solvers.json

Each cell draws n samples with ``fastddim.sample`` (seed s, samples 0..n-1) and measures the
Frechet distance in the project's MNIST classifier features against held-out digits
(``fastddim.metrics``, as ``fastddim eval`` and docs/paper_tables.md do; not Inception FID), through
``fastddim.paper.measure.fd_of_setting``. One torch thread (set before any work). The raw results go to
the JSON (rewritten after every cell); the markdown table is printed at the end, rendered from it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

# the settings compared: label -> fastddim.sample keyword arguments
SETTINGS = {
    "ddim quad": dict(solver="ddim", spacing="quad"),  # the project's Table 1 spacing (the paper's CIFAR-10 one)
    "ddim trailing": dict(solver="ddim", spacing="trailing"),
    "dpm++2m": dict(solver="dpm++2m", spacing=None),  # diffusers' defaults (linspace)
    "dpm++2m karras": dict(solver="dpm++2m", spacing=None, use_karras_sigmas=True),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", default="5,10,20")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma list of %(default)s")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--backend", default="torch", help="the step's backend (default torch: the bit-exact reference)")
    p.add_argument("--out", default="docs/solvers.json")
    p.add_argument("--model", default="mnist", help="packaged name or checkpoint (docs/solvers.json: mnist-v1)")
    args = p.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(__file__))
    import fastddim
    from fastddim.paper.measure import fd_of_setting
    from machine import versions

    labels = [s for s in args.settings.split(",") if s]
    unknown = [s for s in labels if s not in SETTINGS]
    if unknown:
        p.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    steps = [int(s) for s in args.steps.split(",")]
    model = fastddim.pretrained(args.model)
    res = {"command": "python " + " ".join(sys.argv), "machine": versions(), "model": args.model, "n": args.n,
           "seeds": list(range(args.seeds)), "backend": args.backend, "settings": {k: SETTINGS[k] for k in labels},
           "metric": "Frechet distance in the MNIST classifier's features to held-out digits (fastddim.metrics)",
           "started": time.strftime("%Y-%m-%d %H:%M %Z"), "cells": []}
    t_all = time.perf_counter()
    for S in steps:
        for label in labels:
            kw = dict(SETTINGS[label])
            for seed in res["seeds"]:
                c = fd_of_setting(model, args.n, S, 0.0, seed=seed, batch_size=args.batch_size,
                                  backend=args.backend, **kw)
                cell = {"setting": label, "steps": S, "seed": seed, "fd": c["fd"], "seconds": round(c["seconds"], 2),
                        "evals": c["evals"], "hist": c["hist"]}
                res["cells"].append(cell)
                res["elapsed_s"] = round(time.perf_counter() - t_all, 1)
                with open(args.out, "w") as f:
                    json.dump(res, f, indent=1)
                print(f"S={S} {label} seed {seed}: FD {c['fd']:.3f} ({c['seconds']:.0f} s)", flush=True)
    print(table(res))
    return 0


def table(res: dict) -> str:
    """Markdown: FD mean ± std over the seeds, one row per S, one column per setting."""
    labels = list(res["settings"])
    steps = sorted({c["steps"] for c in res["cells"]})
    lines = ["| S (model calls) | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for S in steps:
        row = []
        for lab in labels:
            fds = [c["fd"] for c in res["cells"] if c["steps"] == S and c["setting"] == lab]
            m = sum(fds) / len(fds)
            sd = math.sqrt(sum((v - m) ** 2 for v in fds) / (len(fds) - 1)) if len(fds) > 1 else float("nan")
            row.append(f"{m:.2f} ± {sd:.2f}")
        lines.append(f"| {S} | " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
