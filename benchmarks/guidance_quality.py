"""Classifier-free guidance on the built-in conditional model (mnist-cond): quality against the scale.

    python benchmarks/guidance_quality.py --out docs/guidance.json       # the cells (resumes; one thread)
    python benchmarks/guidance_quality.py --out docs/guidance.json --report   # markdown tables from the JSON
    python benchmarks/guidance_quality.py --figure docs/fig_guidance.png      # the README grid
    python benchmarks/guidance_quality.py --out docs/guidance.json --n 100 --diagnose  # pixels, rescale ratio

Each cell draws n samples with ``fastddim.sample`` (DDIM, eta 0, the default spacing, seed 0), the
requested digits ``arange(n) % 10`` as ``model_kwargs`` and the null label as ``uncond_kwargs``, and
measures them with ``fastddim.metrics`` (the MNIST classifier docs/training.md's unguided numbers
came from): the share the classifier reads as the requested digit (overall and per digit), and the
Frechet distance in its 64-d features to the 1,000 held-out digits (not Inception FID). A diversity
number beside them: the within-class feature spread, sqrt(trace(cov)) of the features of the
samples asked for one digit, averaged over the digits (the held-out digits, grouped by their true
label, give the reference). The raw results go to the JSON, rewritten atomically after every cell;
a rerun skips the cells it already holds.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import torch

SEED = 0
# 1.25 added after the first pass: FD had already risen at 1.5 (docs/guidance.md)
SCALES = (1.0, 1.25, 1.5, 2.0, 3.0, 5.0)
FIGURE_SCALES = (1.0, 2.0, 4.0)
FIGURE_STEPS = 20


def cells() -> dict[str, dict]:
    """label -> {"steps": S, "guide": fastddim.sample's guidance keywords}, in the order they run:
    the S = 10 sweep and its variants first, so an interrupted run still has one complete table."""
    out = {}

    def add(label, steps, **guide):
        out[label] = {"steps": steps, "guide": guide}

    for w in SCALES:
        add(f"cfg w={w:g} S=10", 10, guidance_scale=w)
    add("cfg w=3 S=10 interval (200, 800)", 10, guidance_scale=3.0, guidance_interval=(200, 800))
    add("cfg w=5 S=10 rescale 0.7", 10, guidance_scale=5.0, guidance_rescale=0.7)
    for w in SCALES:
        add(f"cfg w={w:g} S=20", 20, guidance_scale=w)
    for lam in (0.2, 0.5, 0.8):
        add(f"cfg++ lambda={lam:g} S=10", 10, guidance="cfg++", guidance_scale=lam)
    return out


def guided_sample(model, n: int, steps: int, *, backend: str, null_label: int | None = None, seed: int = SEED,
                  **guide) -> torch.Tensor:
    """(n, 1, 32, 32) samples of digits ``arange(n) % 10``, the null label (default the model's
    ``null_class_label``) as the unconditional half."""
    import fastddim

    null = model.null_class_label if null_label is None else null_label
    return fastddim.sample(model, n, steps, seed=seed, backend=backend, progress=False,
                           model_kwargs={"class_labels": torch.arange(n) % 10},
                           uncond_kwargs={"class_labels": torch.tensor([null])}, **guide)


def class_spread(feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the digits of sqrt(trace(cov)) of the features (N, 64) of each label's rows."""
    from fastddim import metrics

    return sum(float(metrics.feature_stats(feats[labels == d])[1].trace()) ** 0.5 for d in range(10)) / 10


def quality(x: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy (overall and per digit), FD to held-out and within-class spread of samples x (n, 1, 32, 32)
    asked for ``labels`` (n,)."""
    from fastddim import metrics

    f, pred = metrics.features_and_predictions(x)
    fd = metrics.frechet_from_stats(*metrics.feature_stats(f), *metrics.feature_stats(metrics.heldout_features()))
    right = pred == labels
    return {"accuracy": float(right.float().mean()), "fd": fd, "spread": class_spread(f, labels),
            "correct_per_digit": [int(right[labels == d].sum()) for d in range(10)],
            "asked_per_digit": [int((labels == d).sum()) for d in range(10)],
            "predicted_hist": torch.bincount(pred, minlength=10).tolist()}


def measure(model, n: int, steps: int, backend: str, guide: dict, seed: int = SEED) -> dict:
    """One cell: sample, time it, read what ran from ``fastddim.info()``, measure the quality."""
    import fastddim

    t0 = time.perf_counter()
    x = guided_sample(model, n, steps, backend=backend, seed=seed, **guide)
    seconds = time.perf_counter() - t0
    last = fastddim.info()["last_run"]
    ran = {k: last.get(k) for k in ("backend", "timesteps", "guidance", "guidance_rescale", "guidance_interval",
                                     "guided_steps", "model_calls_per_sample", "batch_size")}
    return {"steps": steps, "guide": {k: list(v) if isinstance(v, tuple) else v for k, v in guide.items()},
            "seed": seed, "seconds": round(seconds, 1), "ran": ran, "commit": commit(), **quality(x, torch.arange(n) % 10)}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save(path: str, res: dict) -> None:
    from fastddim.images import atomic_write

    with atomic_write(path) as f:
        f.write(json.dumps(res, indent=1).encode())


def run_cells(args) -> None:
    from fastddim import metrics
    from fastddim.pretrained import pretrained
    from machine import versions

    model = pretrained("mnist-cond")
    res = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            res = json.load(f)
    if res.get("n", args.n) != args.n:
        sys.exit(f"--n {args.n}: {args.out} holds cells of n = {res['n']}; use another --out")
    hx, hy = metrics.heldout_digits()
    res.update({"n": args.n, "seed": SEED, "eta": 0.0, "backend": args.backend, "model": "mnist-cond",
                "metric": "fastddim.metrics: MNIST classifier accuracy on the requested digit; Frechet distance "
                          "in its 64-d features to the 1,000 held-out digits (not Inception FID)",
                "heldout_spread": class_spread(metrics.heldout_features(), hy), "heldout_n": len(hx)})
    res.setdefault("cells", {})
    res.setdefault("sessions", []).append({"command": "python " + shlex.join(sys.argv), "commit": commit(),
                                           "machine": versions(), "started": time.strftime("%Y-%m-%d %H:%M %Z")})
    t_all = time.perf_counter()
    for label, c in cells().items():
        if args.only and args.only not in label:
            continue
        label = label if args.seed == SEED else f"{label} seed {args.seed}"  # another seed: a cell of its own
        if label in res["cells"]:
            continue
        cell = measure(model, args.n, c["steps"], args.backend, c["guide"], args.seed)
        res["cells"][label] = cell
        res["sessions"][-1]["wall_s"] = round(time.perf_counter() - t_all, 1)
        save(args.out, res)
        print(f"{label}: accuracy {cell['accuracy']:.3f} FD {cell['fd']:.2f} spread {cell['spread']:.2f} "
              f"calls/sample {cell['ran']['model_calls_per_sample']} ({cell['seconds']:.0f} s)", flush=True)


def report(res: dict) -> str:
    """Markdown tables from the JSON: the (w, S) grid, the other cells, per-digit accuracy at S = 10."""
    cs = res["cells"]

    def row(label):
        c = cs[label]
        return (f"| {label} | {100 * c['accuracy']:.1f}% | {c['fd']:.2f} | {c['spread']:.2f} | "
                f"{c['ran']['model_calls_per_sample']} | {c['seconds']:.0f} |")

    lines = ["| cell | requested digit read | FD to held-out | within-class spread | model calls / sample | seconds |",
             "|---|---|---|---|---|---|"]
    lines += [row(label) for label in cells() if label in cs]
    lines += [row(label) for label in cs if label not in cells()]  # other seeds
    lines += ["", f"Held-out digits' within-class spread: {res['heldout_spread']:.2f}.", "",
              "| cell | " + " | ".join(str(d) for d in range(10)) + " |", "|---|" + "---|" * 10]
    for label in cells():
        if label in cs and label.endswith("S=10") and label.startswith("cfg w"):
            c = cs[label]
            acc = [f"{100 * k / a:.0f}" for k, a in zip(c["correct_per_digit"], c["asked_per_digit"])]
            lines.append(f"| {label} | " + " | ".join(acc) + " |")
    return "\n".join(lines)


def pixel_stats(x: torch.Tensor) -> dict:
    """Ink (share of pixels > 0), mean value and share outside [-1, 1] of images x (n, 1, 32, 32)."""
    return {"ink": float((x > 0).float().mean()), "mean": float(x.mean()),
            "outside": float((x.abs() > 1).float().mean())}


def rescale_ratios(model, n: int, steps: int, w: float) -> dict[int, list[float]]:
    """t -> [mean, min, max] over n samples of the rescale's per-sample ratio std(c) / std(g)
    (what guidance_rescale moves the guided output by) along the w-guided trajectory, read from
    the model's doubled calls (unconditional half first)."""
    from fastddim.guidance import rescale_ratio_torch

    seen = {}

    def spy(x, t, **kw):
        out = model(x, t, **kw)
        h = out.shape[0] // 2
        r = rescale_ratio_torch(out[:h], out[h:], w)
        seen.setdefault(int(t.flatten()[0]), []).append(r)
        return out

    spy.schedule, spy.sample_shape = model.schedule, model.sample_shape
    guided_sample(spy, n, steps, backend="torch", guidance_scale=w, null_label=model.null_class_label)
    return {t: [float(r.mean()), float(r.min()), float(r.max())] for t, r in ((t, torch.cat(v)) for t, v in seen.items())}


def diagnose(args) -> None:
    """Two measurements behind docs/guidance.md's reading of the table, saved under "diagnostics"."""
    from fastddim import metrics
    from fastddim.pretrained import pretrained

    model = pretrained("mnist-cond")
    n = args.n
    diag = {"n": n, "steps": 10, "command": "python " + shlex.join(sys.argv), "commit": commit(),
            "pixels": {"held-out": pixel_stats(metrics.heldout_digits()[0])}}
    for w in (1.0, 2.0, 5.0):
        diag["pixels"][f"w={w:g}"] = pixel_stats(guided_sample(model, n, 10, backend=args.backend, guidance_scale=w))
    diag["rescale_ratio_w5"] = rescale_ratios(model, n, 10, 5.0)
    with open(args.out) as f:
        res = json.load(f)
    res["diagnostics"] = diag
    save(args.out, res)
    print(json.dumps(diag, indent=1))


def figure(path: str, backend: str) -> None:
    """One row per w in FIGURE_SCALES, digits 0..9 left to right, the same x_T per column."""
    from fastddim import images
    from fastddim.pretrained import pretrained

    model = pretrained("mnist-cond")
    rows = [guided_sample(model, 10, FIGURE_STEPS, backend=backend, guidance_scale=w) for w in FIGURE_SCALES]
    images.save_png(path, images.make_grid(images.to_uint8(torch.cat(rows)), nrow=10))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="samples per cell (a multiple of 10: n/10 per digit)")
    p.add_argument("--backend", default="torch", help="the step's backend (default torch: the bit-exact reference)")
    p.add_argument("--out", default="docs/guidance.json")
    p.add_argument("--seed", type=int, default=SEED, help="sampling seed (another than %(default)s: cells labelled '... seed N')")
    p.add_argument("--only", default="", help="run only the cells whose label contains this")
    p.add_argument("--report", action="store_true", help="print the markdown tables of --out and exit")
    p.add_argument("--figure", default=None, help="write the README grid to this PNG and exit")
    p.add_argument("--diagnose", action="store_true",
                   help="pixel statistics at w 1/2/5 and the rescale ratio along w = 5, n samples, into --out's JSON")
    args = p.parse_args()
    if args.n < 20 or args.n % 10:
        p.error(f"--n must be a multiple of 10 and >= 20, got {args.n}")
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.report:
        with open(args.out) as f:
            print(report(json.load(f)))
    elif args.diagnose:
        diagnose(args)
    elif args.figure:
        figure(args.figure, args.backend)
    else:
        run_cells(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
