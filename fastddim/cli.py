"""The ``fastddim`` command line (also ``python -m fastddim``). See docs/cli.md.

    fastddim sample -n 64 --steps 10 -o samples.png
    fastddim invert -i samples.npz --steps 50 -o latents.npz
    fastddim interpolate --seed 1 --seed2 2 --num 11 --steps 50 -o path.png
    fastddim generate --n 50000 --steps 10 --out run/
    fastddim train --steps 4000 --out mnist.safetensors

One ``_add_<cmd>(sub)`` / ``cmd_<cmd>(args)`` pair per command, on top of the library: argument
types are built on ``fastddim.checks`` (a bad value reads the same from Python and from a shell),
models come from ``fastddim.pretrained.load_model``, output paths are checked by
``fastddim.paths`` before any model is loaded or called, and the jobs live in ``fastddim.generate``
and ``fastddim.train``.

Every command takes ``--model``: a packaged model name (default ``mnist``), the path of a
checkpoint written by ``fastddim train``, or ``module:attr`` / ``path/to/file.py:attr`` naming
a model object (a ``torch.nn.Module`` or anything with ``sample_shape``) or a zero-argument
factory returning one.

Errors a user can make print one line, ``fastddim: error: ...``, and exit with 2 (bad command
line) or 1 (a problem found while running); 130 after Ctrl-C. ``FASTDDIM_DEBUG=1`` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

from .checks import check_device, check_eta, check_float, check_int, check_seed
from .paths import output_file, output_folder
from .plan import SPACINGS
from .pretrained import load_model  # noqa: F401  (fastddim.cli.load_model: the name used before it moved)

PROG = "fastddim"
DEBUG_ENV = "FASTDDIM_DEBUG"
DTYPES = ("float32", "bfloat16", "float16")
_FMT = argparse.RawDescriptionHelpFormatter


class CliError(Exception):
    """A user error found while running: printed as one line, exit status ``code``."""

    def __init__(self, msg: str, code: int = 1):
        super().__init__(msg)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), naming the --help to read."""

    def error(self, message: str):  # noqa: D401
        sys.stderr.write(f"{PROG}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


# ------------------------------------------------------------------------------ value types
def _typed(check: Callable, parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """An argparse type: ``parse`` the string (failing: "expected WHAT"), then the library's ``check``."""

    def convert(s: str):
        try:
            v = parse(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        try:
            return check(v)
        except (TypeError, ValueError) as e:  # argparse names the option; the check's name is left out
            raise argparse.ArgumentTypeError(str(e).lstrip(": ")) from None

    return convert


def _int_type(lo: int, hi: int | None = None):
    return _typed(lambda v: check_int("", v, lo, hi), lambda s: int(s, 0), "an integer")


def _float_type(lo: float | None = None, hi: float | None = None):
    return _typed(lambda v: check_float("", v, lo, hi), float, "a number")


_positive_int = _int_type(1)
_nonneg_int = _int_type(0)
_nonneg_float = _float_type(0)
_seed = _typed(check_seed, lambda s: int(s, 0), "an integer seed")
_eta = _typed(check_eta, lambda s: s if s == "sigma_hat" else float(s), "a number >= 0 or 'sigma_hat'")
_device = _typed(lambda d: check_device("", d), str, "a device")


# ------------------------------------------------------------------------------ shared helpers
def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def _fmt_rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.1f} images/s" if seconds > 0 else "inf images/s"


def _load(args, device=None):
    """(model, device, backend) for a sampling command: the ``--model`` on the device (default
    ``--device``) with its weights in ``--dtype``, and the ``--backend`` resolved there."""
    import torch

    from .dispatch import resolve_backend

    dev = check_device("--device", device if device is not None else args.device)
    model = load_model(args.model, dev)
    if args.dtype != "float32" and isinstance(model, torch.nn.Module):
        model = model.to(_dtype(args.dtype))  # the state x_t stays float32
    try:
        backend = resolve_backend(args.backend, dev)
    except RuntimeError as e:
        raise CliError(str(e)) from None
    return model, dev, backend


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _timed(dev, fn: Callable):
    """(fn(), seconds), the device's queued work included."""
    import torch

    t0 = time.perf_counter()
    out = fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return out, time.perf_counter() - t0


def _image_output(path: str, arg: str = "-o") -> str:
    """An image output: a folder (ending in '/' or existing) or a .png / .npz file; checked now."""
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        return output_folder(path, arg)
    if os.path.splitext(path)[1].lower() not in (".png", ".npz"):
        raise CliError(f"{arg} {path!r}: use a .png (grid), .npz, or a folder (ending in '/')", 2)
    return output_file(path, arg)


def _common(p: argparse.ArgumentParser, *, steps_default: int = 10, latents: bool = False) -> None:
    """The options every sampling command has. ``latents``: --steps and --spacing default to what
    a --latents file records (None here, resolved by the command)."""
    also = ", or what --latents records" if latents else ""
    p.add_argument("--model", metavar="NAME|PATH|MODULE:ATTR", default=None,
                   help="packaged model name (default: mnist), a checkpoint from 'fastddim train', "
                        "or module:attr / file.py:attr naming a model or a factory")
    p.add_argument("--steps", "-S", type=_positive_int, default=None if latents else steps_default,
                   help=f"number of DDIM steps S = model calls per image (default {steps_default}{also})")
    p.add_argument("--spacing", choices=SPACINGS, default=None if latents else "uniform",
                   help=f"which timesteps the S steps visit (default uniform{also}; the paper's CIFAR-10 numbers "
                        "use quad)")
    p.add_argument("--batch-size", "-b", type=_positive_int, default=None,
                   help="images per model call (results do not depend on it)")
    p.add_argument("--device", type=_device, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype of the model's weights and input (the state stays float32; default float32)")
    p.add_argument("--backend", default="auto",
                   help="step implementation: auto, torch, triton, cpp, cuda (default auto; see fastddim.info())")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: when stderr is a terminal)")


def _add_labels(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--class-label", type=_nonneg_int, default=None, metavar="K",
                   help="for a class-conditional model: label K for every image, passed as "
                        "model(x, t, class_labels=...)")
    g.add_argument("--classes", type=_positive_int, default=None, metavar="C",
                   help="for a class-conditional model: spread the images over C classes, image i (its global "
                        "index) gets label i %% C")


# ---------------------------------------------------------------------------------- sample
def _add_sample(sub) -> None:
    p = sub.add_parser(
        "sample", help="draw images and write a PNG grid, an .npz or a folder of PNGs", formatter_class=_FMT,
        description="Draw n images with DDIM from the model and write them.",
        epilog="examples:\n"
               "  fastddim sample -n 64 --steps 10 -o samples.png          # 8x8 grid\n"
               "  fastddim sample -n 1000 --steps 50 --eta 1 -o out.npz     # arr_0: uint8 (n, H, W, C)\n"
               "  fastddim sample -n 16 -o pngs/                            # 000000.png ... 000015.png\n"
               "  fastddim sample --model ckpt.safetensors --spacing quad -o q.png\n"
               "  fastddim sample --latents latents.npz -o recon.png   # decode 'fastddim invert' output\n"
               "  fastddim sample --model my.py:cond --classes 10 -n 100 -o grid.png   # image i: label i % 10\n\n"
               "Image i depends only on (seed, i): -n, --batch-size and --first-index do not change it.\n"
               "Missing folders of -o are made.",
    )
    p.add_argument("-n", type=_positive_int, default=None, help="number of images (default 64, or all --latents)")
    p.add_argument("-o", "--output", default="samples.png", help=".png grid, .npz, or a folder/ (default samples.png)")
    p.add_argument("--eta", type=_eta, default=0.0, help="0 = DDIM (default), 1 = DDPM, or sigma_hat")
    p.add_argument("--seed", type=_seed, default=0, help="noise seed (default 0)")
    p.add_argument("--first-index", type=_nonneg_int, default=0, help="global index of the first image (default 0)")
    p.add_argument("--latents", default=None, metavar="NPZ",
                   help="decode these x_T (from 'fastddim invert') instead of noise, with the steps and spacing "
                        "the file records unless given")
    p.add_argument("--nrow", type=_positive_int, default=None, help="images per grid row (default ceil(sqrt(n)))")
    _add_labels(p)
    _common(p, latents=True)
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    import fastddim

    from .generate import sample_range
    from .images import save_images, to_uint8

    _image_output(args.output)
    x_T, steps, spacing = None, args.steps or 10, args.spacing or "uniform"
    if args.latents is not None:
        x_T, steps, spacing = _load_latents(args.latents, args.steps, args.spacing)
        if args.n is not None and args.n != x_T.shape[0]:
            raise CliError(f"-n {args.n} does not match the {x_T.shape[0]} latents in {args.latents}", 2)
    n = x_T.shape[0] if x_T is not None else args.n or 64
    model, dev, backend = _load(args)
    x, seconds = _timed(dev, lambda: sample_range(
        model, args.first_index, args.first_index + n, args.batch_size, class_label=args.class_label,
        classes=args.classes, x_T=x_T, steps=steps, eta=args.eta, spacing=spacing, seed=args.seed, device=dev,
        dtype=_dtype(args.dtype), progress=args.progress, backend=backend,
    ))
    what = save_images(args.output, to_uint8(x), nrow=args.nrow, first_index=args.first_index)
    ran = fastddim.info()["last_run"].get("backend", backend)
    print(f"{n} images in {seconds:.2f} s: {_fmt_rate(n, seconds)} ({ran} backend, {dev}, S={steps})")
    print(f"wrote {what}")
    return 0


def _load_latents(path: str, steps: int | None, spacing: str | None):
    """(x_T, steps, spacing) from a latents file: the steps and spacing it records are used
    unless given, and a given value that differs is refused."""
    import zipfile

    import numpy as np
    import torch

    if not os.path.isfile(path):
        raise CliError(f"latents file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise CliError(f"cannot read latents from {path}: not an .npz file (write latents with 'fastddim invert')")
    try:
        with np.load(path, allow_pickle=False) as z:
            a = z["latents" if "latents" in z.files else "arr_0"]
            rec = {k: z[k].item() for k in ("steps", "spacing") if k in z.files and z[k].ndim == 0}
    except Exception as e:  # a damaged zip, a missing arr_0, an object array...
        raise CliError(f"cannot read latents from {path}: not a float array arr_0 ({type(e).__name__})") from None
    if a.ndim < 2 or a.dtype.kind != "f":
        raise CliError(f"{path}: latents must be a float array (n, C, H, W), got {a.dtype} {a.shape}")
    for opt, given, key in (("--steps", steps, "steps"), ("--spacing", spacing, "spacing")):
        if given is not None and key in rec and given != rec[key]:
            raise CliError(f"{opt} {given} conflicts with {path}, which was inverted with {key} {rec[key]}; "
                           f"leave {opt} out to decode with it", 2)
    steps = steps or int(rec.get("steps", 10))
    spacing = spacing or str(rec.get("spacing", "uniform"))
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)), steps, spacing


# ---------------------------------------------------------------------------------- invert
def _add_invert(sub) -> None:
    p = sub.add_parser(
        "invert", help="encode images to latents x_T with the DDIM ODE (paper sec. 5.4)", formatter_class=_FMT,
        description="Encode images to latents by running the deterministic DDIM step forward in time.",
        epilog="examples:\n"
               "  fastddim invert -i digit.png --steps 50 -o latents.npz\n"
               "  fastddim invert -i samples.npz --steps 100 -o latents.npz   # arr_0: uint8 (n, H, W, C)\n"
               "  fastddim sample --latents latents.npz -o recon.png          # decodes with the same steps/spacing\n"
               "  fastddim invert -i digit.png --steps 10 --refine 1 -o latents.npz   # near-exact round trip at S = 10\n\n"
               "Images must match the model's shape; latents are written as arr_0 float32 (n, C, H, W).",
    )
    p.add_argument("-i", "--input", nargs="+", required=True, metavar="FILE",
                   help="image files (PNG, ...) and/or .npz files with arr_0 uint8 (n, H, W, C)")
    p.add_argument("-o", "--output", default="latents.npz", help="output .npz (default latents.npz)")
    p.add_argument("--convention", choices=("source", "target"), default="source",
                   help="where eps is evaluated: source (the paper's, default) or target (diffusers')")
    p.add_argument("--refine", type=_nonneg_int, default=0, metavar="K",
                   help="fixed-point iterations per step, one model call each, that make the S-step decoder "
                        "land back on the image (default 0: the paper's encoder)")
    _common(p, steps_default=50)
    p.set_defaults(func=cmd_invert)


def cmd_invert(args) -> int:
    import numpy as np

    import fastddim

    from .images import from_uint8, load_images, save_npz

    if not args.output.lower().endswith(".npz"):
        raise CliError(f"-o {args.output!r}: latents are written as .npz", 2)
    output_file(args.output, "-o")
    model, dev, _ = _load(args)
    shape = tuple(model.sample_shape)
    x0 = from_uint8(load_images(args.input, channels=shape[0]))
    if tuple(x0.shape[1:]) != shape:
        raise CliError(f"input images are {tuple(x0.shape[1:])} (C, H, W); the model takes {shape}")
    z, seconds = _timed(dev, lambda: fastddim.invert(
        model, x0, steps=args.steps, spacing=args.spacing, batch_size=args.batch_size, device=dev,
        dtype=_dtype(args.dtype), progress=args.progress, convention=args.convention, refine=args.refine,
    ))
    save_npz(args.output, arr_0=z.cpu().numpy(), steps=np.int64(args.steps), spacing=np.str_(args.spacing),
             convention=np.str_(args.convention), refine=np.int64(args.refine), model=np.str_(args.model or "mnist"))
    n = x0.shape[0]
    print(f"{n} images inverted in {seconds:.2f} s: {_fmt_rate(n, seconds)} ({dev}, S={args.steps}, "
          f"refine={args.refine}: {args.steps * (1 + args.refine)} model calls per image)")
    print(f"wrote {args.output} (arr_0: float32 latents {tuple(z.shape)}; decode with "
          f"'fastddim sample --latents {args.output}', which uses the recorded --steps {args.steps} "
          f"--spacing {args.spacing})")
    return 0


# ----------------------------------------------------------------------------- interpolate
def _add_interpolate(sub) -> None:
    p = sub.add_parser(
        "interpolate", help="decode a spherical interpolation between two noise seeds (paper fig. 6)",
        formatter_class=_FMT,
        description="Slerp between the x_T of two seeds and decode each point with DDIM (eta = 0).",
        epilog="examples:\n"
               "  fastddim interpolate --seed 1 --seed2 2 --num 11 --steps 50 -o path.png\n"
               "  fastddim interpolate --seed 0 --index 3 --index2 7 --num 9 -o path.npz\n\n"
               "The endpoints equal 'fastddim sample -n 1 --seed A --first-index I'.",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of the first endpoint (default 0)")
    p.add_argument("--seed2", type=_seed, default=1, help="seed of the second endpoint (default 1)")
    p.add_argument("--index", type=_nonneg_int, default=0, help="sample index of the first endpoint (default 0)")
    p.add_argument("--index2", type=_nonneg_int, default=None, help="sample index of the second endpoint (default: --index)")
    p.add_argument("--num", type=_int_type(2), default=11, help="number of images, both endpoints included, >= 2 (default 11)")
    p.add_argument("-o", "--output", default="interpolation.png", help=".png (one row), .npz or folder/")
    _common(p, steps_default=50)
    p.set_defaults(func=cmd_interpolate)


def cmd_interpolate(args) -> int:
    import fastddim

    from .images import save_images, to_uint8
    from .noise import normal

    _image_output(args.output)
    model, dev, backend = _load(args)
    shape = tuple(model.sample_shape)
    # The endpoints are exactly the x_T that 'fastddim sample --seed A --first-index I' draws.
    z0 = normal(args.seed, args.index, 1, 0, shape)[0]
    z1 = normal(args.seed2, args.index2 if args.index2 is not None else args.index, 1, 0, shape)[0]
    x, seconds = _timed(dev, lambda: fastddim.interpolate(
        model, z0, z1, num=args.num, steps=args.steps, spacing=args.spacing, batch_size=args.batch_size,
        device=dev, dtype=_dtype(args.dtype), progress=args.progress, backend=backend,
    ))
    what = save_images(args.output, to_uint8(x), nrow=args.num)
    print(f"{args.num} images in {seconds:.2f} s: {_fmt_rate(args.num, seconds)} ({dev}, S={args.steps})")
    print(f"wrote {what}")
    return 0


# -------------------------------------------------------------------------------- generate
def _add_generate(sub) -> None:
    from .shards import DEFAULT_SHARD_SIZE

    p = sub.add_parser(
        "generate", help="make many images (e.g. 50k for FID), resumable, one process or torchrun",
        formatter_class=_FMT,
        description="Make n images into a folder: shards/shard-NNNNN.npz as they finish, then samples.npz "
                    "(arr_0 uint8 (n, H, W, C)) and manifest.json. Re-run the same command to resume.",
        epilog="examples:\n"
               "  fastddim generate --n 50000 --steps 10 --out run/\n"
               "  torchrun --nproc_per_node=8 -m fastddim generate -n 50000 --steps 10 --out run/\n"
               "  fastddim generate --n 50000 --steps 100 --spacing quad --model ckpt.safetensors --out q100/\n"
               "  fastddim generate -n 10000 --model my.py:cond --classes 10 --out cond/   # 1,000 per class\n\n"
               "The result is byte-identical for any number of processes, batch size and interruptions\n"
               "on one device type (on the CPU each process runs --threads torch threads, default 1).\n"
               "A folder holding another configuration is refused.",
    )
    p.add_argument("-n", "--n", "--num-samples", dest="n", type=_positive_int, required=True,
                   help="number of images (under torchrun write -n or --num-samples: torchrun's own "
                        "parser takes --n for an abbreviation of its options)")
    p.add_argument("--out", "-o", required=True, help="output folder (made if missing)")
    p.add_argument("--eta", type=_eta, default=0.0, help="0 = DDIM (default), 1 = DDPM, or sigma_hat")
    p.add_argument("--seed", type=_seed, default=0, help="noise seed (default 0)")
    p.add_argument("--shard-size", type=_positive_int, default=DEFAULT_SHARD_SIZE,
                   help=f"images per shard file (default {DEFAULT_SHARD_SIZE}); part of the configuration")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads per process (default 1); part of the configuration, so the bytes "
                        "do not depend on the number of processes")
    _add_labels(p)
    _common(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from .generate import StoppedForTest, generate, init_distributed

    output_folder(args.out, "--out")
    try:
        rank, world, dev = init_distributed(args.device)
    except ValueError as e:
        raise CliError(str(e)) from None
    model, dev, backend = _load(args, dev)
    try:
        m = generate(
            model, args.n, args.steps, args.out, eta=args.eta, spacing=args.spacing, seed=args.seed,
            batch_size=args.batch_size, shard_size=args.shard_size, device=dev,
            dtype=_dtype(args.dtype), backend=backend, model_name=args.model or "mnist",
            progress=args.progress, threads=args.threads, class_label=args.class_label, classes=args.classes,
        )
    except StoppedForTest as e:
        raise CliError(str(e), 3) from None
    except KeyboardInterrupt:
        raise CliError(f"interrupted; the finished shards in {args.out} are kept: run the same command again "
                       "to resume", 130) from None
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0 and m is not None:
        made, secs = m["this_call"]["images_made"], m["this_call"]["seconds"]
        if made and secs:
            print(f"made {made} images in {secs:.1f} s on {world} process(es): {_fmt_rate(made, secs)}")
        elif not made:
            print(f"nothing to make: every shard in {args.out} was already there")
        print(f"wrote {os.path.join(args.out, 'samples.npz')} ({m['n']} images, arr_0 uint8 NHWC) "
              f"and {os.path.join(args.out, 'manifest.json')}")
    return 0


# ----------------------------------------------------------------------------------- train
def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a U-Net on MNIST (DDPM loss) and write a checkpoint", formatter_class=_FMT,
        description="Train an eps-prediction U-Net on the 4,000 MNIST training digits (1x32x32) with the DDPM "
                    "objective; the checkpoint works with --model.",
        epilog="examples:\n"
               "  fastddim train --steps 4000 --out mnist.safetensors --log-file train.log\n"
               "  fastddim train --steps 8000 --out mnist.safetensors --resume     # continue to 8000\n"
               "  fastddim train --steps 4000 --out mnist.safetensors --overwrite  # start over, replacing it\n"
               "  fastddim sample --model mnist.safetensors -n 64 -o samples.png\n\n"
               "An existing --out is never replaced without --resume or --overwrite. After Ctrl-C,\n"
               "--resume continues from the last checkpoint (written every --save-every steps).",
    )
    p.add_argument("--model", default="mnist",
                   help="U-Net preset 'mnist' or a UNetConfig .json file with in_channels 1 and resolution 32 "
                        "(the data is MNIST; the 3-channel 'cifar10' preset needs other data: use the Python API)")
    p.add_argument("--schedule", choices=("linear", "scaled_linear", "cosine"), default="linear",
                   help="noise schedule (default linear, T=1000)")
    p.add_argument("--steps", type=_positive_int, default=4000, help="total optimizer steps (default 4000)")
    p.add_argument("--batch-size", "-b", type=_positive_int, default=64, help="images per step (default 64)")
    p.add_argument("--lr", type=_nonneg_float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--warmup", type=_nonneg_int, default=100, help="linear warm-up steps (default 100)")
    p.add_argument("--weight-decay", type=_nonneg_float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--ema-decay", type=_float_type(0, 1), default=0.999, help="EMA decay in [0, 1] (default 0.999)")
    p.add_argument("--grad-clip", type=_nonneg_float, default=1.0, help="max gradient norm, 0 = off (default 1)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of init, batches and noise (default 0)")
    p.add_argument("--out", "-o", default="checkpoint.safetensors",
                   help="checkpoint path, missing folders made (default checkpoint.safetensors)")
    p.add_argument("--save-every", type=_positive_int, default=500, help="write the checkpoint every N steps (default 500)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    g.add_argument("--overwrite", action="store_true", help="start over, replacing an existing --out")
    p.add_argument("--log-file", default=None, help="append step, loss, images/s, elapsed every --log-every steps")
    p.add_argument("--log-every", type=_positive_int, default=50, help="(default 50)")
    p.add_argument("--device", type=_device, default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    try:
        from .train import TrainingInterrupted, train
    except ImportError as e:
        raise CliError(f"training is unavailable: {e}") from None
    output_file(args.out, "--out")
    if args.log_file is not None:
        output_file(args.log_file, "--log-file")
    if os.path.exists(args.out) and not (args.resume or args.overwrite):
        raise CliError(f"--out {args.out} exists: add --resume to continue training it, or --overwrite to start "
                       "over and replace it")
    try:
        summary = train(
            model=_train_model(args.model), data="mnist", schedule=args.schedule, steps=args.steps,
            batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
            ema_decay=args.ema_decay, grad_clip=args.grad_clip, seed=args.seed, out=args.out,
            save_every=args.save_every, resume=args.resume, overwrite=args.overwrite, log_file=args.log_file,
            log_every=args.log_every, device=args.device, threads=args.threads,
            progress=args.progress if args.progress is not None else sys.stderr.isatty(),
        )
    except TrainingInterrupted as e:
        if e.saved_step is None:
            raise CliError(f"interrupted at step {e.step}, before the first checkpoint (--save-every "
                           f"{args.save_every}): nothing was saved; run the command again to start over", 130) from None
        raise CliError(f"interrupted at step {e.step}; {e.path} holds step {e.saved_step}: run the same command "
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
        raise CliError(f"model config file not found: {spec}")
    try:
        with open(spec) as f:
            return json.load(f)
    except ValueError as e:
        raise CliError(f"{spec}: not valid JSON ({e})") from None


# ------------------------------------------------------------------------------ the parser
def build_parser() -> argparse.ArgumentParser:
    fmt = _FMT
    parser = _Parser(
        prog=PROG, formatter_class=fmt,
        description="Fast DDIM sampling (Song et al. 2021) for trained diffusion models.",
        epilog="examples:\n"
               "  fastddim sample -n 64 --steps 10 -o samples.png\n"
               "  fastddim generate --n 50000 --steps 10 --out run/\n"
               "  fastddim <command> --help\n\n"
               "FASTDDIM_DEBUG=1 shows tracebacks instead of one-line errors.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"fastddim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in (_add_sample, _add_invert, _add_interpolate, _add_generate, _add_train):
        add(sub)
    _add_eval(sub)
    return parser


def _add_eval(sub) -> None:
    from .paper import DEFAULT_OUT, TABLE1_ETAS, TABLE1_STEPS, TABLE2_STEPS
    from .paper.tables import eta_str

    p = sub.add_parser(
        "eval", help="metrics and the DDIM paper's Tables 1 and 2 on the MNIST model (fastddim.paper)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure sample quality (FD in an MNIST classifier's features, not Inception FID) for one "
                    "setting, or remake the paper's Tables 1 and 2 and figures as a report.",
        epilog="examples:\n"
               "  fastddim eval -n 256 --steps 10 --eta 0                    # the metric for one setting\n"
               "  fastddim eval --table1 -n 512 --seeds 2 --out runs/t1      # the long part alone (Table 1)\n"
               "  fastddim eval --table2 --figures --table1-from runs/t1/paper_tables.json --out report/\n"
               f"  fastddim eval --table1 --table2 --figures                  # everything, into ./{DEFAULT_OUT}/\n\n"
               "A report is OUT/paper_tables.md, rendered from OUT/paper_tables.json (every number, rewritten\n"
               "after each cell), plus the PNGs with --figures. See docs/cli.md and docs/paper_tables.md.",
    )
    g = p.add_argument_group("what to make (default: the metric for one setting)")
    g.add_argument("--table1", action="store_true", help="FD for S x eta (paper Table 1), mean ± std over seeds")
    g.add_argument("--table2", action="store_true", help="reconstruction MSE of held-out digits (paper Table 2)")
    g.add_argument("--figures", action="store_true", help="consistency, interpolation, reconstruction and table plots (PNG)")
    p.add_argument("--model", default="mnist", help="packaged name, checkpoint path or module:attr (default mnist)")
    p.add_argument("-n", "--n", type=_positive_int, default=128,
                   help="samples per Table 1 cell / for the single setting (default 128)")
    p.add_argument("--seeds", default="1", help="number of seeds k (0..k-1) or a comma list (default 1)")
    p.add_argument("--steps", "-S", type=_positive_int, default=None, help="S for the single setting (default 50)")
    p.add_argument("--eta", type=_eta, default=None,
                   help="eta for the single setting: a number >= 0 or sigma_hat (default 0)")
    p.add_argument("--spacing", choices=SPACINGS, default=None,
                   help="timestep spacing for Table 1 / the single setting (default quad)")
    p.add_argument("--table1-steps", default=",".join(map(str, TABLE1_STEPS)), help="(default %(default)s)")
    p.add_argument("--table1-etas", default=",".join(eta_str(e) for e in TABLE1_ETAS), help="(default %(default)s)")
    p.add_argument("--table2-steps", default=",".join(map(str, TABLE2_STEPS)), help="(default %(default)s)")
    p.add_argument("--table2-n", type=_positive_int, default=64,
                   help="held-out digits per Table 2 row below --table2-long-from (default 64)")
    p.add_argument("--table2-n-long", type=_positive_int, default=16, help="held-out digits for the long rows (default 16)")
    p.add_argument("--table2-long-from", type=_positive_int, default=200, help="S from which a row is long (default 200)")
    p.add_argument("--table2-variants", default="",
                   help="diagnostic Table 2 rows for other spacing:convention pairs, e.g. quad:source,uniform:target")
    p.add_argument("--table2-variant-steps", default="10,20,50", help="S for the diagnostic rows (default %(default)s)")
    p.add_argument("--table2-refine", type=_nonneg_int, default=1, metavar="K",
                   help="also round-trip every Table 2 row through invert(refine=K); 0 to skip (default 1)")
    p.add_argument("--table1-from", default=None, metavar="JSON",
                   help="take Table 1 from the paper_tables.json of an earlier run of the same model")
    p.add_argument("--out", "-o", default=DEFAULT_OUT,
                   help=f"folder for paper_tables.md, paper_tables.json and the PNGs, made if missing "
                        f"(default ./{DEFAULT_OUT})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--batch-size", "-b", type=_positive_int, default=128, help="samples per model call (default 128)")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the single setting's result as JSON")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    import json
    import shlex

    import torch

    from .paper import evaluate, single_summary

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cmd = None  # the report prints the command line when run as `fastddim`; from Python it writes its own
    if os.path.basename(sys.argv[0] if sys.argv else "") in ("fastddim", "__main__.py", "cli.py"):
        cmd = "fastddim " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        cmd += f"   (torch threads: {torch.get_num_threads()})" if args.threads is None else ""
    res = evaluate(
        args.model, table1=args.table1, table2=args.table2, figures=args.figures, n=args.n, seeds=args.seeds,
        steps=args.steps, eta=args.eta, spacing=args.spacing, out=args.out, device=args.device,
        batch_size=args.batch_size, table1_steps=args.table1_steps, table1_etas=args.table1_etas,
        table2_steps=args.table2_steps, table2_n=args.table2_n, table2_n_long=args.table2_n_long,
        table2_long_from=args.table2_long_from, table2_variants=args.table2_variants,
        table2_variant_steps=args.table2_variant_steps, table2_refine=args.table2_refine,
        table1_from=args.table1_from, command=cmd,
    )
    if res.get("single") is None:
        print(res["report"])
    else:
        print(json.dumps(res["single"]) if args.json else single_summary(res["single"]))
    return 0


# ------------------------------------------------------------------------------ entry point
def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 runtime error, 2 usage error, 130 Ctrl-C)."""
    debug = os.environ.get(DEBUG_ENV) == "1"
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        if debug:
            raise
        return _fail(str(e), e.code)
    except KeyboardInterrupt:
        if debug:
            raise
        return _fail("interrupted", 130)
    except Exception as e:
        if debug:
            raise
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            return _fail("out of memory on the device; use a smaller --batch-size", 1)
        # The library reports bad arguments and bad files with these; anything else is a bug.
        if isinstance(e, (ValueError, TypeError, FileNotFoundError, OSError, FloatingPointError)):
            return _fail(_one_line(e), 1)
        raise


def _fail(msg: str, code: int) -> int:
    sys.stdout.flush()
    sys.stderr.write(f"{PROG}: error: {msg}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
