"""Where the paper's Euler encoder loses the image: its error step by step, per digit class.

    python benchmarks/inversion_steps.py --models mnist mnist-v1 --steps 10 20 --n 256 \
        --out docs/runs/table2_n256/inversion_steps.json

Table 2 measures the round trip x0 -> invert(S) -> sample(S) as a whole. This splits it: at each
encoder step p_{k-1} -> p_k (``fastddim.reference.invert_points``, convention "source") one
fixed-point iteration (``reference.refine_invert_step``) finds the point x^(1) from which the
decoder's step lands on p_{k-1} far more closely than from the Euler point x^(0); the decoder
started at x^(0) misses p_{k-1} by exactly sqrt(a_src / a_dst) (x^(0) - x^(1)) (x^(1) inverts the
decoder's step for the eps evaluated at x^(0), and that step is linear in its start), which is
(x^(0) - x^(1)) / sqrt(a_dst) in the units of the clean image. The JSON holds, per model, S and
step, the timesteps and that miss's per-dimension mean square over all images and per digit class
(image i is a digit i % 10, as Table 2's). The Euler path itself is checked against
``fastddim.invert``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import fastddim
from fastddim import reference
from fastddim.contract import model_output
from fastddim.paper.measure import heldout_subset

from machine import versions


def per_class(v: torch.Tensor) -> dict[str, float]:
    """v (n,) per image -> {"all": mean, "0": mean of digit 0's images, ...}."""
    return {"all": float(v.mean()), **{str(c): float(v[c::10].mean()) for c in range(10)}}


@torch.inference_mode()
def step_misses(model, x0: torch.Tensor, steps: int) -> list[dict]:
    """The Euler encoder's steps on x0 (n, 1, 32, 32) with S = ``steps`` (uniform spacing): one
    dict per step with t_eval, t_dst and the decoder's miss in clean-image units (per class)."""
    run = fastddim.prepare(model, len(x0), steps, spacing="uniform")
    points = reference.invert_points(run.plan, model.schedule.alphas_cumprod, "source")

    def net(x, t):  # the model as the sampler calls it (e.g. a v head's output, which the plan converts)
        return model_output(run.model, x, t, {})

    x, rows = x0.float(), []
    for p in points:
        out = net(x, torch.full((len(x),), p.t_eval))
        x_euler = reference.ddim_invert_step(x, out, p, run.plan)
        x_fixed = reference.refine_invert_step(net, x, x_euler, p, run.plan, 1)
        miss = ((x_euler - x_fixed) / p.dst[0]).square().flatten(1).mean(1)
        rows.append({"t_eval": p.t_eval, "t_dst": p.t_dst, "miss_mse": per_class(miss)})
        x = x_euler
    want = fastddim.invert(model, x0, steps, spacing="uniform", progress=False)
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)  # the same Euler path as Table 2's
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mnist", "mnist-v1"])
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    x0 = heldout_subset(args.n)
    t0 = time.perf_counter()
    res = {"command": "python benchmarks/inversion_steps.py " + " ".join(argv or sys.argv[1:]), "n": args.n,
           "machine": versions(), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "models": {}}
    for name in args.models:
        model = fastddim.pretrained(name)
        res["models"][name] = {str(s): step_misses(model, x0, s) for s in args.steps}
        for s, rows in res["models"][name].items():
            print(f"{name}, S = {s}: " + ", ".join(f"t {r['t_eval']}->{r['t_dst']}: {r['miss_mse']['all']:.2e}"
                                                   for r in rows))
    res["seconds"] = time.perf_counter() - t0
    args.out.write_text(json.dumps(res, indent=1))

if __name__ == "__main__":
    main()
