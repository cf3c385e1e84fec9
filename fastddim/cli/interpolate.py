"""``fastddim interpolate``: decode a spherical interpolation between two noise seeds (paper fig. 6)."""
from __future__ import annotations

from . import common as c


def add(sub) -> None:
    p = sub.add_parser(
        "interpolate", help="decode a spherical interpolation between two noise seeds (paper fig. 6)",
        formatter_class=c.FMT,
        description="Slerp between the x_T of two seeds and decode each point with DDIM (eta = 0), or with "
                    "DPM-Solver++(2M) (--solver dpm++2m).",
        epilog="examples:\n"
               "  fastddim interpolate --seed 1 --seed2 2 --num 11 --steps 50 -o path.png\n"
               "  fastddim interpolate --seed 0 --index 3 --index2 7 --num 9 -o path.npz\n\n"
               "The endpoints equal 'fastddim sample -n 1 --seed A --first-index I'.",
    )
    p.add_argument("--seed", type=c.seed_type, default=0, help="seed of the first endpoint (default 0)")
    p.add_argument("--seed2", type=c.seed_type, default=1, help="seed of the second endpoint (default 1)")
    p.add_argument("--index", type=c.nonneg_int, default=0, help="sample index of the first endpoint (default 0)")
    p.add_argument("--index2", type=c.nonneg_int, default=None,
                   help="sample index of the second endpoint (default: --index)")
    p.add_argument("--num", type=c.int_type(2), default=11,
                   help="number of images, both endpoints included, >= 2 (default 11)")
    p.add_argument("-o", "--output", default="interpolation.png", help=".png (one row), .npz or folder/")
    c.add_common(p, steps_default=50, solver=True)
    p.set_defaults(func=run)


def run(args) -> int:
    import fastddim

    from ..images import save_images, to_uint8
    from ..noise import normal

    c.image_output(args.output)
    how = c.solver_kwargs(args)
    model, dev, backend = c.load(args)
    shape = tuple(model.sample_shape)
    # The endpoints are exactly the x_T that 'fastddim sample --seed A --first-index I' draws.
    z0 = normal(args.seed, args.index, 1, 0, shape)[0]
    z1 = normal(args.seed2, args.index2 if args.index2 is not None else args.index, 1, 0, shape)[0]
    x, seconds = c.timed(dev, lambda: fastddim.interpolate(
        model, z0, z1, num=args.num, steps=args.steps, batch_size=args.batch_size,
        device=dev, dtype=c.dtype(args.dtype), progress=args.progress, backend=backend, **how,
    ))
    what = save_images(args.output, to_uint8(x), nrow=args.num)
    print(f"{args.num} images in {seconds:.2f} s: {c.fmt_rate(args.num, seconds)} ({dev}, {args.solver}, S={args.steps})")
    print(f"wrote {what}")
    return 0
