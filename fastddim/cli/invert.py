"""``fastddim invert``: encode images to latents x_T with the DDIM ODE (paper sec. 5.4)."""
from __future__ import annotations

from ..paths import output_file
from . import common as c
from . import guidance as g


def add(sub) -> None:
    p = sub.add_parser(
        "invert", help="encode images to latents x_T with the DDIM ODE (paper sec. 5.4)", formatter_class=c.FMT,
        description="Encode images to latents by running the deterministic DDIM step forward in time.",
        epilog="examples:\n"
               "  fastddim invert -i digit.png --steps 50 -o latents.npz\n"
               "  fastddim invert -i samples.npz --steps 100 -o latents.npz   # arr_0: uint8 (n, H, W, C)\n"
               "  fastddim sample --latents latents.npz -o recon.png          # decodes with the same steps/spacing\n"
               "  fastddim invert -i digit.png --steps 10 --refine 1 -o latents.npz   # near-exact round trip at S = 10\n"
               "  fastddim invert -i seven.png --model mnist-cond --class-label 7 --guidance-scale 2 -o z.npz\n\n"
               "Images must match the model's shape; latents are written as arr_0 float32 (n, C, H, W).",
    )
    p.add_argument("-i", "--input", nargs="+", required=True, metavar="FILE",
                   help="image files (PNG, ...) and/or .npz files with arr_0 uint8 (n, H, W, C)")
    p.add_argument("-o", "--output", default="latents.npz", help="output .npz (default latents.npz)")
    p.add_argument("--convention", choices=("source", "target"), default="source",
                   help="where eps is evaluated: source (the paper's, default) or target (diffusers')")
    p.add_argument("--refine", type=c.nonneg_int, default=0, metavar="K",
                   help="fixed-point iterations per step, one model call each, that make the S-step decoder "
                        "land back on the image (default 0: the paper's encoder)")
    c.add_labels(p)
    c.add_common(p, steps_default=50)
    g.add_guidance(p, methods=("cfg",))  # CFG++ inversion is not built
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    import fastddim

    from ..generate import class_labels
    from ..images import from_uint8, load_images, save_npz

    if not args.output.lower().endswith(".npz"):
        raise c.CliError(f"-o {args.output!r}: latents are written as .npz", 2)
    output_file(args.output, "-o")
    guided = g.guidance_kwargs(args)
    model, dev, _ = c.load(args)
    guided = g.with_uncond(model, args, guided)
    shape = tuple(model.sample_shape)
    x0 = from_uint8(load_images(args.input, channels=shape[0]))
    if tuple(x0.shape[1:]) != shape:
        raise c.CliError(f"input images are {tuple(x0.shape[1:])} (C, H, W); the model takes {shape}")
    labels = class_labels(0, x0.shape[0], class_label=args.class_label, classes=args.classes, device=dev)
    with c.model_errors_name_labels(args):
        z, seconds = c.timed(dev, lambda: fastddim.invert(
            model, x0, steps=args.steps, spacing=args.spacing, batch_size=args.batch_size, device=dev,
            dtype=c.dtype(args.dtype), progress=args.progress, convention=args.convention, refine=args.refine,
            model_kwargs=None if labels is None else {"class_labels": labels}, **guided,
        ))
    save_npz(args.output, arr_0=z.cpu().numpy(), steps=np.int64(args.steps), spacing=np.str_(args.spacing),
             convention=np.str_(args.convention), refine=np.int64(args.refine), model=np.str_(args.model or "mnist"))
    n = x0.shape[0]
    print(f"{n} images inverted in {seconds:.2f} s: {c.fmt_rate(n, seconds)} ({dev}, S={args.steps}, "
          f"refine={args.refine}: {args.steps * (1 + args.refine)} model calls per image{g.describe(guided)})")
    print(f"wrote {args.output} (arr_0: float32 latents {tuple(z.shape)}; decode with "
          f"'fastddim sample --latents {args.output}{_condition(args)}', which uses the recorded --steps "
          f"{args.steps} --spacing {args.spacing})")
    return 0


def _condition(args) -> str:
    """The label and guidance options to decode with: the ones the latents were inverted with."""
    opts = [c.label_option(args) or ""]
    if args.guidance_scale != 1:
        opts.append(f"--guidance-scale {args.guidance_scale:g}")
    if args.guidance_rescale:
        opts.append(f"--guidance-rescale {args.guidance_rescale:g}")
    if args.guidance_interval is not None:
        opts.append("--guidance-interval {:g} {:g}".format(*args.guidance_interval))
    return "".join(f" {o}" for o in opts if o)
