"""``fastddim sample``: draw images and write a PNG grid, an .npz or a folder of PNGs."""
from __future__ import annotations

import os

from . import common as c
from . import guidance as g


def add(sub) -> None:
    p = sub.add_parser(
        "sample", help="draw images and write a PNG grid, an .npz or a folder of PNGs", formatter_class=c.FMT,
        description="Draw n images with DDIM (or DPM-Solver++(2M), --solver dpm++2m) from the model and write them.",
        epilog="examples:\n"
               "  fastddim sample -n 64 --steps 10 -o samples.png          # 8x8 grid\n"
               "  fastddim sample -n 1000 --steps 50 --eta 1 -o out.npz     # arr_0: uint8 (n, H, W, C)\n"
               "  fastddim sample -n 16 -o pngs/                            # 000000.png ... 000015.png\n"
               "  fastddim sample --model ckpt.safetensors --spacing quad -o q.png\n"
               "  fastddim sample -n 64 --steps 10 --solver dpm++2m -o dpm.png   # DPM-Solver++(2M)\n"
               "  fastddim sample --latents latents.npz -o recon.png   # decode 'fastddim invert' output\n"
               "  fastddim sample --model my.py:cond --classes 10 -n 100 -o grid.png   # image i: label i % 10\n"
               "  fastddim sample --model mnist-cond --class-label 7 --guidance-scale 3 -o sevens.png   # guided\n\n"
               "Image i depends only on (seed, i): -n, --batch-size and --first-index do not change it.\n"
               "Missing folders of -o are made.",
    )
    p.add_argument("-n", type=c.positive_int, default=None, help="number of images (default 64, or all --latents)")
    p.add_argument("-o", "--output", default="samples.png", help=".png grid, .npz, or a folder/ (default samples.png)")
    p.add_argument("--eta", type=c.eta_type, default=0.0, help="0 = DDIM (default), 1 = DDPM, or sigma_hat")
    p.add_argument("--seed", type=c.seed_type, default=0, help="noise seed (default 0)")
    p.add_argument("--first-index", type=c.nonneg_int, default=0, help="global index of the first image (default 0)")
    p.add_argument("--latents", default=None, metavar="NPZ",
                   help="decode these x_T (from 'fastddim invert') instead of noise, with the steps and spacing "
                        "the file records unless given")
    p.add_argument("--nrow", type=c.positive_int, default=None, help="images per grid row (default ceil(sqrt(n)))")
    c.add_labels(p)
    c.add_common(p, latents=True, solver=True)
    g.add_guidance(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import fastddim

    from ..generate import sample_range
    from ..images import save_images, to_uint8

    c.image_output(args.output)
    how = c.solver_kwargs(args)
    guided = g.guidance_kwargs(args)
    x_T, steps = None, args.steps or 10
    if args.latents is not None:
        if args.solver != "ddim":
            raise c.CliError(f"--solver {args.solver}: --latents were inverted with the DDIM ODE and decode with it; "
                             "leave --solver out", 2)
        x_T, steps, how["spacing"] = load_latents(args.latents, args.steps, args.spacing)
        if args.n is not None and args.n != x_T.shape[0]:
            raise c.CliError(f"-n {args.n} does not match the {x_T.shape[0]} latents in {args.latents}", 2)
    n = x_T.shape[0] if x_T is not None else args.n or 64
    model, dev, backend = c.load(args)
    how.update(g.with_uncond(model, args, guided))
    with c.model_errors_name_labels(args):
        x, seconds = c.timed(dev, lambda: sample_range(
            model, args.first_index, args.first_index + n, args.batch_size, class_label=args.class_label,
            classes=args.classes, x_T=x_T, steps=steps, eta=args.eta, seed=args.seed, device=dev,
            dtype=c.dtype(args.dtype), progress=args.progress, backend=backend, **how,
        ))
    what = save_images(args.output, to_uint8(x), nrow=args.nrow, first_index=args.first_index)
    ran = fastddim.info()["last_run"].get("backend", backend)
    print(f"{n} images in {seconds:.2f} s: {c.fmt_rate(n, seconds)} ({ran} backend, {dev}, {args.solver}, S={steps}"
          f"{g.describe(guided)})")
    print(f"wrote {what}")
    return 0


def load_latents(path: str, steps: int | None, spacing: str | None):
    """(x_T, steps, spacing) from a latents file: the steps and spacing it records are used
    unless given, and a given value that differs is refused."""
    import zipfile

    import numpy as np
    import torch

    if not os.path.isfile(path):
        raise c.CliError(f"latents file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise c.CliError(f"cannot read latents from {path}: not an .npz file (write latents with 'fastddim invert')")
    try:
        with np.load(path, allow_pickle=False) as z:
            a = z["latents" if "latents" in z.files else "arr_0"]
            rec = {k: z[k].item() for k in ("steps", "spacing") if k in z.files and z[k].ndim == 0}
    except Exception as e:  # a damaged zip, a missing arr_0, an object array...
        raise c.CliError(f"cannot read latents from {path}: not a float array arr_0 ({type(e).__name__})") from None
    if a.ndim < 2 or a.dtype.kind != "f":
        raise c.CliError(f"{path}: latents must be a float array (n, C, H, W), got {a.dtype} {a.shape}")
    for opt, given, key in (("--steps", steps, "steps"), ("--spacing", spacing, "spacing")):
        if given is not None and key in rec and given != rec[key]:
            raise c.CliError(f"{opt} {given} conflicts with {path}, which was inverted with {key} {rec[key]}; "
                             f"leave {opt} out to decode with it", 2)
    steps = steps or int(rec.get("steps", 10))
    spacing = spacing or str(rec.get("spacing", "uniform"))
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)), steps, spacing
