"""``fastddim train``: train a U-Net on MNIST (DDPM loss) and write a checkpoint; a class-conditional
one (``--model mnist-cond``) learns the digit labels with label dropout, for classifier-free guidance."""
from __future__ import annotations

import os
import sys

from ..paths import output_file
from . import common as c


def add(sub) -> None:
    p = sub.add_parser(
        "train", help="train a U-Net on MNIST (DDPM loss) and write a checkpoint", formatter_class=c.FMT,
        description="Train an eps-prediction U-Net on the 4,000 MNIST training digits (1x32x32) with the DDPM "
                    "objective; the checkpoint works with --model.",
        epilog="examples:\n"
               "  fastddim train --steps 4000 --out mnist.safetensors --log-file train.log\n"
               "  fastddim train --steps 8000 --out mnist.safetensors --resume     # continue to 8000\n"
               "  fastddim train --steps 4000 --out mnist.safetensors --overwrite  # start over, replacing it\n"
               "  fastddim train --model mnist-cond --label-dropout 0.1 --out mnist-cond.safetensors\n"
               "  fastddim sample --model mnist.safetensors -n 64 -o samples.png\n\n"
               "An existing --out is never replaced without --resume or --overwrite. After Ctrl-C,\n"
               "--resume continues from the last checkpoint (written every --save-every steps).",
    )
    p.add_argument("--model", default="mnist",
                   help="U-Net preset 'mnist', 'mnist-cond' (conditioned on the digit: 10 classes and a null label) "
                        "or a UNetConfig .json file with in_channels 1 and resolution 32 (the data is MNIST; the "
                        "3-channel 'cifar10' preset needs other data: use the Python API)")
    p.add_argument("--label-dropout", type=c.float_type(0, 1), default=None, metavar="P",
                   help="class-conditional models: replace each training label by the null label with probability "
                        "P, so the model also learns the unconditional prediction that guidance needs (default 0.1; "
                        "refused for an unconditional model)")
    p.add_argument("--schedule", choices=("linear", "scaled_linear", "cosine"), default="linear",
                   help="noise schedule (default linear, T=1000)")
    p.add_argument("--steps", type=c.positive_int, default=4000, help="total optimizer steps (default 4000)")
    p.add_argument("--batch-size", "-b", type=c.positive_int, default=64, help="images per step (default 64)")
    p.add_argument("--lr", type=c.nonneg_float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--warmup", type=c.nonneg_int, default=100, help="linear warm-up steps (default 100)")
    p.add_argument("--weight-decay", type=c.nonneg_float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--ema-decay", type=c.float_type(0, 1), default=0.999, help="EMA decay in [0, 1] (default 0.999)")
    p.add_argument("--grad-clip", type=c.nonneg_float, default=1.0, help="max gradient norm, 0 = off (default 1)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="after the warm-up: constant, or a half cosine down to --min-lr at --steps (default constant)")
    p.add_argument("--min-lr", type=c.nonneg_float, default=0.0, help="the cosine's final rate (default 0)")
    p.add_argument("--loss-weighting", choices=("uniform", "min-snr"), default="uniform",
                   help="eps loss per t: uniform (DDPM) or min(SNR, gamma) / SNR (Hang et al. 2023; default uniform)")
    p.add_argument("--snr-gamma", type=c.float_type(1e-6), default=5.0, help="min-SNR's gamma, > 0 (default 5)")
    p.add_argument("--autocast", choices=("bf16",), default=None,
                   help="run forward and backward under bfloat16 autocast (weights, optimizer, loss stay float32)")
    p.add_argument("--seed", type=c.seed_type, default=0, help="seed of init, batches and noise (default 0)")
    p.add_argument("--out", "-o", default="checkpoint.safetensors",
                   help="checkpoint path, missing folders made (default checkpoint.safetensors)")
    p.add_argument("--save-every", type=c.positive_int, default=500, help="write the checkpoint every N steps (default 500)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    g.add_argument("--overwrite", action="store_true", help="start over, replacing an existing --out")
    p.add_argument("--log-file", default=None, help="append step, loss, images/s, elapsed every --log-every steps")
    p.add_argument("--log-every", type=c.positive_int, default=50, help="(default 50)")
    c.add_device(p)
    c.add_threads(p)
    c.add_progress(p)
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        from ..train import TrainingInterrupted, train
    except ImportError as e:
        raise c.CliError(f"training is unavailable: {e}") from None
    output_file(args.out, "--out")
    if args.log_file is not None:
        output_file(args.log_file, "--log-file")
    if os.path.exists(args.out) and not (args.resume or args.overwrite):
        raise c.CliError(f"--out {args.out} exists: add --resume to continue training it, or --overwrite to start "
                       "over and replace it")
    try:
        summary = train(
            model=_train_model(args.model), data="mnist", schedule=args.schedule, steps=args.steps,
            batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
            ema_decay=args.ema_decay, grad_clip=args.grad_clip, seed=args.seed, out=args.out,
            save_every=args.save_every, resume=args.resume, overwrite=args.overwrite, log_file=args.log_file,
            log_every=args.log_every, device=args.device, threads=c.threads(args), label_dropout=args.label_dropout,
            lr_schedule=args.lr_schedule, min_lr=args.min_lr, loss_weighting=args.loss_weighting,
            snr_gamma=args.snr_gamma, autocast=args.autocast,
            progress=args.progress if args.progress is not None else sys.stderr.isatty(),
        )
    except TrainingInterrupted as e:
        if e.saved_step is None:
            raise c.CliError(f"interrupted at step {e.step}, before the first checkpoint (--save-every "
                           f"{args.save_every}): nothing was saved; run the command again to start over", 130) from None
        raise c.CliError(f"interrupted at step {e.step}; {e.path} holds step {e.saved_step}: run the same command "
                       "with --resume to continue from there", 130) from None
    if summary["already_done"]:
        print(f"{summary['path']} is already at step {summary['step']} (--steps {args.steps}): nothing to do")
        return 0
    print(f"step {summary['step']}: loss {summary['loss']:.4f}, {summary['images_per_s']:.1f} images/s, "
          f"{summary['seconds']:.0f} s; wrote {summary['path']}")
    return 0


def _train_model(spec: str):
    """--model of train: a preset name, or a UNetConfig read from a .json file."""
    if not spec.endswith(".json"):
        return spec
    import json

    if not os.path.isfile(spec):
        raise c.CliError(f"model config file not found: {spec}")
    try:
        with open(spec) as f:
            return json.load(f)
    except ValueError as e:
        raise c.CliError(f"{spec}: not valid JSON ({e})") from None
