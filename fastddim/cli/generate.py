"""``fastddim generate``: many images (e.g. 50k for an FID), resumable, one process or torchrun."""
from __future__ import annotations

import os

from ..paths import output_folder
from . import common as c
from . import guidance as g


def add(sub) -> None:
    from ..shards import DEFAULT_SHARD_SIZE

    p = sub.add_parser(
        "generate", help="make many images (e.g. 50k for FID), resumable, one process or torchrun",
        formatter_class=c.FMT,
        description="Make n images into a folder: shards/shard-NNNNN.npz as they finish, then samples.npz "
                    "(arr_0 uint8 (n, H, W, C)) and manifest.json. Re-run the same command to resume.",
        epilog="examples:\n"
               "  fastddim generate --n 50000 --steps 10 --out run/\n"
               "  torchrun --nproc_per_node=8 -m fastddim generate -n 50000 --steps 10 --out run/\n"
               "  fastddim generate --n 50000 --steps 100 --spacing quad --model ckpt.safetensors --out q100/\n"
               "  fastddim generate --n 50000 --steps 10 --solver dpm++2m --out dpm10/\n"
               "  fastddim generate -n 10000 --model my.py:cond --classes 10 --out cond/   # 1,000 per class\n"
               "  fastddim generate -n 10000 --model mnist-cond --classes 10 --guidance-scale 2 --out cfg2/\n\n"
               "The result is byte-identical for any number of processes, batch size and interruptions\n"
               "on one device type (on the CPU each process runs --threads torch threads, default 1).\n"
               "A folder holding another configuration is refused.",
    )
    p.add_argument("-n", "--n", "--num-samples", dest="n", type=c.positive_int, required=True,
                   help="number of images (under torchrun write -n or --num-samples: torchrun's own "
                        "parser takes --n for an abbreviation of its options)")
    p.add_argument("--out", "-o", required=True, help="output folder (made if missing)")
    p.add_argument("--eta", type=c.eta_type, default=0.0, help="0 = DDIM (default), 1 = DDPM, or sigma_hat")
    p.add_argument("--seed", type=c.seed_type, default=0, help="noise seed (default 0)")
    p.add_argument("--shard-size", type=c.positive_int, default=DEFAULT_SHARD_SIZE,
                   help=f"images per shard file (default {DEFAULT_SHARD_SIZE}); part of the configuration")
    c.add_labels(p)
    c.add_common(p, threads_note="; per process, and part of the configuration, so the bytes do not depend "
                                 "on the number of processes", solver=True)
    g.add_guidance(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..generate import StoppedForTest, generate, init_distributed

    output_folder(args.out, "--out")
    how = c.solver_kwargs(args)
    guided = g.guidance_kwargs(args)
    try:
        rank, world, dev = init_distributed(args.device)
    except ValueError as e:
        raise c.CliError(str(e)) from None
    model, dev, backend = c.load(args, dev)
    how.update(g.with_uncond(model, args, guided))
    try:
        with c.model_errors_name_labels(args):
            m = generate(
                model, args.n, args.steps, args.out, eta=args.eta, seed=args.seed, **how,
                batch_size=args.batch_size, shard_size=args.shard_size, device=dev,
                dtype=c.dtype(args.dtype), backend=backend, model_name=args.model or "mnist",
                progress=args.progress, threads=c.threads(args), class_label=args.class_label,
                classes=args.classes,
            )
    except StoppedForTest as e:
        raise c.CliError(str(e), 3) from None
    except KeyboardInterrupt:
        raise c.CliError(f"interrupted; the finished shards in {args.out} are kept: run the same command again "
                         "to resume", 130) from None
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0 and m is not None:
        _report(args.out, world, m)
    return 0


def _report(out: str, world: int, m: dict) -> None:
    """What this call did: made images, assembled existing shards, or nothing (already complete)."""
    made, secs = m["this_call"]["images_made"], m["this_call"]["seconds"]
    if m["this_call"].get("already_complete"):
        return  # the library said so; nothing was written
    if made and secs:
        print(f"made {made} images in {secs:.1f} s on {world} process(es): {c.fmt_rate(made, secs)}")
    elif not made:
        print(f"nothing to make: every shard in {out} was already there")
    print(f"wrote {os.path.join(out, 'samples.npz')} ({m['n']} images, arr_0 uint8 NHWC) "
          f"and {os.path.join(out, 'manifest.json')}")
