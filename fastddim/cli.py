"""The ``fastddim`` command line (also ``python -m fastddim``). See docs/cli.md.

    fastddim sample -n 64 --steps 10 -o samples.png
    fastddim invert -i samples.npz --steps 50 -o latents.npz
    fastddim interpolate --seed 1 --seed2 2 --num 11 --steps 50 -o path.png
    fastddim generate --n 50000 --steps 10 --out run/
    fastddim train --steps 4000 --out mnist.safetensors

Every command takes ``--model``: a packaged model name (default ``mnist``), the path of a
checkpoint written by ``fastddim train``, or ``module:attr`` / ``path/to/file.py:attr`` naming
a model object (a ``torch.nn.Module`` or anything with ``sample_shape``) or a zero-argument
factory returning one. All models go through :func:`load_model`.

Errors a user can make print one line, ``fastddim: error: ...``, and exit with 2 (bad command
line) or 1 (a problem found while running). ``FASTDDIM_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import sys
import time
from typing import Any

PROG = "fastddim"
DEBUG_ENV = "FASTDDIM_DEBUG"
SPACINGS = ("uniform", "quad", "leading", "trailing", "linspace")
DTYPES = ("float32", "bfloat16", "float16")


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
def _positive_int(s: str) -> int:
    try:
        v = int(s, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _seed(s: str) -> int:
    try:
        v = int(s, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {s!r}") from None
    if not 0 <= v < 2**64:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2**64), got {v}")
    return v


def _eta(s: str) -> float | str:
    if s == "sigma_hat":
        return s
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'sigma_hat', got {s!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 or 'sigma_hat', got {s!r}")
    return v


def _nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s!r}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


# ----------------------------------------------------------------------------- model loading
def load_model(spec: str | None, device: str | None = None):
    """The model a ``--model`` value names, on ``device`` (default: CUDA if available, else CPU).

    ``spec``:
      - None or a packaged name (``"mnist"``): ``fastddim.pretrained.pretrained(name)``;
      - an existing file: a checkpoint written by ``fastddim train`` (``pretrained(path)``);
      - ``module:attr`` or ``path/to/file.py:attr``: the object ``attr``; if it is a
        ``torch.nn.Module`` or has ``sample_shape`` it is the model, otherwise it is called with
        no arguments and must return one. The model needs ``sample_shape`` and ``schedule``.
    Modules are put in eval mode and moved to ``device``.
    """
    import torch

    dev = _device(device)
    if spec is not None and not os.path.exists(spec) and ":" in spec:
        model = _import_model(spec)
        if isinstance(model, torch.nn.Module):
            model = model.eval().to(dev)
        return model
    if spec is not None and not os.path.exists(spec) and (os.sep in spec or "." in os.path.basename(spec)):
        raise CliError(f"model file not found: {spec}")
    try:
        from .pretrained import pretrained
    except ImportError as e:
        raise CliError(f"the packaged models need fastddim.pretrained, which failed to import ({e})") from None
    name = spec or "mnist"
    try:
        return pretrained(name, device=dev)
    except (ValueError, OSError) as e:
        raise CliError(f"cannot load model {name!r}: {_one_line(e)}") from None
    except Exception as e:  # a damaged file can fail deep inside a reader
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        raise CliError(f"cannot load model {name!r}: {type(e).__name__}: {_one_line(e)}") from None


def _import_model(spec: str):
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise CliError(f"--model {spec!r}: expected module:attr or path/to/file.py:attr")
    try:
        if target.endswith(".py"):
            if not os.path.isfile(target):
                raise CliError(f"model file not found: {target}")
            name = "_fastddim_user_model_" + os.path.splitext(os.path.basename(target))[0]
            sp = importlib.util.spec_from_file_location(name, target)
            mod = importlib.util.module_from_spec(sp)
            sys.modules[name] = mod
            sp.loader.exec_module(mod)
        else:
            mod = importlib.import_module(target)
    except CliError:
        raise
    except ImportError as e:
        raise CliError(f"--model {spec!r}: cannot import {target!r} ({e})") from None
    except Exception as e:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        raise CliError(f"--model {spec!r}: importing {target!r} failed: {type(e).__name__}: {_one_line(e)}") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"--model {spec!r}: {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    import torch

    if not isinstance(obj, torch.nn.Module) and not hasattr(obj, "sample_shape"):
        if not callable(obj):
            raise CliError(f"--model {spec!r}: {attr!r} is neither a model nor a factory")
        obj = obj()
    if not hasattr(obj, "sample_shape") or not hasattr(obj, "schedule"):
        raise CliError(f"--model {spec!r}: the model needs 'sample_shape' and 'schedule' attributes")
    return obj


def _device(device: str | None):
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CliError(f"--device: not a device: {device!r} (use cpu, cuda or cuda:N)", 2) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise CliError(f"--device: {dev.type!r} is not supported (use cpu or cuda)", 2)
    return dev


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _prepare(model, dtype: str):
    """Cast a module's weights to the sampling dtype (the state x_t stays float32)."""
    import torch

    if dtype != "float32" and isinstance(model, torch.nn.Module):
        model = model.to(_dtype(dtype))
    return model


def _check_backend(backend: str, device) -> str:
    from .dispatch import resolve_backend

    try:
        return resolve_backend(backend, device)
    except RuntimeError as e:
        raise CliError(str(e)) from None


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def _model_device(model):
    import torch

    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return None


# ------------------------------------------------------------------------------ subcommands
def _common(p: argparse.ArgumentParser, *, steps_default: int = 10, sampling: bool = True) -> None:
    p.add_argument("--model", metavar="NAME|PATH|MODULE:ATTR", default=None,
                   help="packaged model name (default: mnist), a checkpoint from 'fastddim train', "
                        "or module:attr / file.py:attr naming a model or a factory")
    p.add_argument("--steps", "-S", type=_positive_int, default=steps_default,
                   help=f"number of DDIM steps S = model calls per image (default {steps_default})")
    p.add_argument("--spacing", choices=SPACINGS, default="uniform",
                   help="which timesteps the S steps visit (default uniform; the paper's CIFAR-10 numbers use quad)")
    p.add_argument("--batch-size", "-b", type=_positive_int, default=None,
                   help="images per model call (results do not depend on it)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype of the model's weights and input (the state stays float32; default float32)")
    p.add_argument("--backend", default="auto",
                   help="step implementation: auto, torch, triton, cpp, cuda (default auto; see fastddim.info())")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: when stderr is a terminal)")


def _fmt_rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.1f} images/s" if seconds > 0 else "inf images/s"


def cmd_sample(args) -> int:
    import torch

    import fastddim
    from .images import save_images, to_uint8

    dev = _device(args.device)
    x_T = None
    if args.latents is not None:
        x_T = _load_latents(args.latents)
    model = _prepare(load_model(args.model, dev), args.dtype)
    dev = _model_device(model) or dev
    backend = _check_backend(args.backend, dev)
    n = args.n if x_T is None else x_T.shape[0]
    if x_T is not None and args.n is not None and args.n != n:
        raise CliError(f"-n {args.n} does not match the {n} latents in {args.latents}", 2)
    n = n or 64
    _check_output_path(args.output)
    t0 = time.perf_counter()
    x = fastddim.sample(
        model, n=n, steps=args.steps, eta=args.eta, spacing=args.spacing, seed=args.seed,
        x_T=x_T, batch_size=args.batch_size, device=dev, dtype=_dtype(args.dtype),
        progress=args.progress, backend=backend, first_index=args.first_index,
    )
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    what = save_images(args.output, to_uint8(x), nrow=args.nrow, first_index=args.first_index)
    ran = fastddim.info()["last_run"].get("backend", backend)
    print(f"{n} images in {seconds:.2f} s: {_fmt_rate(n, seconds)} ({ran} backend, {dev}, S={args.steps})")
    print(f"wrote {what}")
    return 0


def _check_output_path(path: str) -> None:
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        return
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".png", ".npz"):
        raise CliError(f"-o {path!r}: use a .png (grid), .npz, or a folder (ending in '/')", 2)
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise CliError(f"-o {path!r}: folder {d} does not exist")


def _load_latents(path: str):
    import numpy as np
    import torch

    if not os.path.isfile(path):
        raise CliError(f"latents file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            key = "latents" if "latents" in z.files else "arr_0"
            a = z[key]
    except Exception as e:
        raise CliError(f"cannot read latents from {path}: {_one_line(e)}") from None
    if a.ndim < 2 or a.dtype.kind != "f":
        raise CliError(f"{path}: latents must be a float array (n, C, H, W), got {a.dtype} {a.shape}")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def cmd_invert(args) -> int:
    import numpy as np
    import torch

    import fastddim
    from .images import from_uint8, load_images, save_npz

    dev = _device(args.device)
    _check_backend(args.backend, dev)
    model = _prepare(load_model(args.model, dev), args.dtype)
    dev = _model_device(model) or dev
    shape = tuple(model.sample_shape)
    imgs = load_images(args.input, channels=shape[0])
    x0 = from_uint8(imgs)
    if tuple(x0.shape[1:]) != shape:
        raise CliError(f"input images are {tuple(x0.shape[1:])} (C, H, W); the model takes {shape}")
    if not args.output.lower().endswith(".npz"):
        raise CliError(f"-o {args.output!r}: latents are written as .npz", 2)
    t0 = time.perf_counter()
    z = fastddim.invert(
        model, x0, steps=args.steps, spacing=args.spacing, batch_size=args.batch_size, device=dev,
        dtype=_dtype(args.dtype), progress=args.progress, convention=args.convention, refine=args.refine,
    )
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    save_npz(args.output, arr_0=z.cpu().numpy(), steps=np.int64(args.steps), spacing=np.str_(args.spacing),
             convention=np.str_(args.convention), refine=np.int64(args.refine), model=np.str_(args.model or "mnist"))
    n = x0.shape[0]
    print(f"{n} images inverted in {seconds:.2f} s: {_fmt_rate(n, seconds)} ({dev}, S={args.steps}, "
          f"refine={args.refine}: {args.steps * (1 + args.refine)} model calls per image)")
    print(f"wrote {args.output} (arr_0: float32 latents {tuple(z.shape)}; decode with "
          f"'fastddim sample --latents {args.output} --steps {args.steps} --spacing {args.spacing}')")
    return 0


def cmd_interpolate(args) -> int:
    import torch

    import fastddim
    from .images import save_images, to_uint8
    from .noise import normal

    dev = _device(args.device)
    backend = _check_backend(args.backend, dev)
    model = _prepare(load_model(args.model, dev), args.dtype)
    dev = _model_device(model) or dev
    shape = tuple(model.sample_shape)
    # The endpoints are exactly the x_T that 'fastddim sample --seed A --first-index I' draws.
    z0 = normal(args.seed, args.index, 1, 0, shape)[0]
    z1 = normal(args.seed2, args.index2 if args.index2 is not None else args.index, 1, 0, shape)[0]
    _check_output_path(args.output)
    t0 = time.perf_counter()
    x = fastddim.interpolate(
        model, z0, z1, num=args.num, steps=args.steps, spacing=args.spacing, batch_size=args.batch_size,
        device=dev, dtype=_dtype(args.dtype), progress=args.progress, backend=backend,
    )
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    what = save_images(args.output, to_uint8(x), nrow=args.num)
    print(f"{args.num} images in {seconds:.2f} s: {_fmt_rate(args.num, seconds)} ({dev}, S={args.steps})")
    print(f"wrote {what}")
    return 0


def cmd_generate(args) -> int:
    from .generate import StoppedForTest, generate, init_distributed

    try:
        rank, world, dev = init_distributed(args.device)
    except ValueError as e:
        raise CliError(str(e)) from None
    model = _prepare(load_model(args.model, dev), args.dtype)
    backend = _check_backend(args.backend, dev)
    try:
        m = generate(
            model, args.n, args.steps, args.out, eta=args.eta, spacing=args.spacing, seed=args.seed,
            batch_size=args.batch_size, shard_size=args.shard_size, device=dev, dtype=_dtype(args.dtype),
            backend=backend, model_name=args.model or "mnist", progress=args.progress,
        )
    except StoppedForTest as e:
        raise CliError(str(e), 3) from None
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0 and m is not None:
        run = m.get("last_run") or {}
        made, secs = run.get("images_made"), run.get("seconds")
        if made is not None and secs:
            print(f"made {made} images in {secs:.1f} s on {world} process(es): {_fmt_rate(made, secs)}")
        print(f"wrote {os.path.join(args.out, 'samples.npz')} ({m['n']} images, arr_0 uint8 NHWC) "
              f"and {os.path.join(args.out, 'manifest.json')}")
    return 0


def cmd_train(args) -> int:
    try:
        from .train import train
    except ImportError as e:
        raise CliError(f"training is unavailable: {e}") from None
    model: Any = args.model
    if model.endswith(".json"):
        import json

        if not os.path.isfile(model):
            raise CliError(f"model config file not found: {model}")
        try:
            with open(model) as f:
                model = json.load(f)
        except ValueError as e:
            raise CliError(f"{args.model}: not valid JSON ({e})") from None
    if args.device is not None:
        _device(args.device)
    summary = train(
        model=model, data="mnist", schedule=args.schedule, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, ema_decay=args.ema_decay,
        grad_clip=args.grad_clip, seed=args.seed, out=args.out, save_every=args.save_every,
        resume=args.resume, log_file=args.log_file, log_every=args.log_every, device=args.device,
        threads=args.threads, progress=args.progress if args.progress is not None else sys.stderr.isatty(),
    )
    print(f"step {summary['step']}: loss {summary['loss']:.4f}, {summary['images_per_s']:.1f} images/s, "
          f"{summary['seconds']:.0f} s; wrote {summary['path']}")
    return 0


# ------------------------------------------------------------------------------ the parser
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
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

    p = sub.add_parser(
        "sample", help="draw images and write a PNG grid, an .npz or a folder of PNGs", formatter_class=fmt,
        description="Draw n images with DDIM from the model and write them.",
        epilog="examples:\n"
               "  fastddim sample -n 64 --steps 10 -o samples.png          # 8x8 grid\n"
               "  fastddim sample -n 1000 --steps 50 --eta 1 -o out.npz     # arr_0: uint8 (n, H, W, C)\n"
               "  fastddim sample -n 16 -o pngs/                            # 000000.png ... 000015.png\n"
               "  fastddim sample --model ckpt.safetensors --spacing quad -o q.png\n"
               "  fastddim sample --latents latents.npz --steps 50 -o recon.png   # decode 'fastddim invert' output\n\n"
               "Image i depends only on (seed, i): -n, --batch-size and --first-index do not change it.",
    )
    p.add_argument("-n", type=_positive_int, default=None, help="number of images (default 64)")
    p.add_argument("-o", "--output", default="samples.png", help=".png grid, .npz, or a folder/ (default samples.png)")
    p.add_argument("--eta", type=_eta, default=0.0, help="0 = DDIM (default), 1 = DDPM, or sigma_hat")
    p.add_argument("--seed", type=_seed, default=0, help="noise seed (default 0)")
    p.add_argument("--first-index", type=_nonneg_int, default=0, help="global index of the first image (default 0)")
    p.add_argument("--latents", default=None, metavar="NPZ", help="decode these x_T (from 'fastddim invert') instead of noise")
    p.add_argument("--nrow", type=_positive_int, default=None, help="images per grid row (default ceil(sqrt(n)))")
    _common(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "invert", help="encode images to latents x_T with the DDIM ODE (paper sec. 5.4)", formatter_class=fmt,
        description="Encode images to latents by running the deterministic DDIM step forward in time.",
        epilog="examples:\n"
               "  fastddim invert -i digit.png --steps 50 -o latents.npz\n"
               "  fastddim invert -i samples.npz --steps 100 -o latents.npz   # arr_0: uint8 (n, H, W, C)\n"
               "  fastddim sample --latents latents.npz --steps 100 -o recon.png\n"
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

    p = sub.add_parser(
        "interpolate", help="decode a spherical interpolation between two noise seeds (paper fig. 6)",
        formatter_class=fmt,
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
    p.add_argument("--num", type=_positive_int, default=11, help="number of images, endpoints included (default 11)")
    p.add_argument("-o", "--output", default="interpolation.png", help=".png (one row), .npz or folder/")
    _common(p, steps_default=50)
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser(
        "generate", help="make many images (e.g. 50k for FID), resumable, one process or torchrun",
        formatter_class=fmt,
        description="Make n images into a folder: shards/shard-NNNNN.npz as they finish, then samples.npz "
                    "(arr_0 uint8 (n, H, W, C)) and manifest.json. Re-run the same command to resume.",
        epilog="examples:\n"
               "  fastddim generate --n 50000 --steps 10 --out run/\n"
               "  torchrun --nproc_per_node=8 -m fastddim generate -n 50000 --steps 10 --out run/\n"
               "  fastddim generate --n 50000 --steps 100 --spacing quad --model ckpt.safetensors --out q100/\n\n"
               "The result is byte-identical for any number of processes, batch size and interruptions\n"
               "on one device type. A folder holding another configuration is refused.",
    )
    p.add_argument("-n", "--n", "--num-samples", dest="n", type=_positive_int, required=True,
                   help="number of images (under torchrun write -n or --num-samples: torchrun's own "
                        "parser takes --n for an abbreviation of its options)")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--eta", type=_eta, default=0.0, help="0 = DDIM (default), 1 = DDPM, or sigma_hat")
    p.add_argument("--seed", type=_seed, default=0, help="noise seed (default 0)")
    p.add_argument("--shard-size", type=_positive_int, default=None,
                   help="images per shard file (default 1024); part of the configuration")
    _common(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "train", help="train a U-Net on MNIST (DDPM loss) and write a checkpoint", formatter_class=fmt,
        description="Train an eps-prediction U-Net with the DDPM objective; the checkpoint works with --model.",
        epilog="examples:\n"
               "  fastddim train --steps 4000 --out mnist.safetensors --log-file train.log\n"
               "  fastddim train --steps 8000 --out mnist.safetensors --resume     # continue to 8000\n"
               "  fastddim sample --model mnist.safetensors -n 64 -o samples.png",
    )
    p.add_argument("--model", default="mnist", help="U-Net preset (mnist, cifar10) or a UNetConfig .json file")
    p.add_argument("--schedule", choices=("linear", "scaled_linear", "cosine"), default="linear",
                   help="noise schedule (default linear, T=1000)")
    p.add_argument("--steps", type=_nonneg_int, default=4000, help="total optimizer steps (default 4000)")
    p.add_argument("--batch-size", "-b", type=_positive_int, default=64, help="images per step (default 64)")
    p.add_argument("--lr", type=_nonneg_float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--warmup", type=_nonneg_int, default=100, help="linear warm-up steps (default 100)")
    p.add_argument("--weight-decay", type=_nonneg_float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--ema-decay", type=_nonneg_float, default=0.999, help="EMA decay (default 0.999)")
    p.add_argument("--grad-clip", type=_nonneg_float, default=1.0, help="max gradient norm, 0 = off (default 1)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of init, batches and noise (default 0)")
    p.add_argument("--out", "-o", default="checkpoint.safetensors", help="checkpoint path (default checkpoint.safetensors)")
    p.add_argument("--save-every", type=_positive_int, default=500, help="write the checkpoint every N steps (default 500)")
    p.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    p.add_argument("--log-file", default=None, help="append step, loss, images/s, elapsed every --log-every steps")
    p.add_argument("--log-every", type=_positive_int, default=50, help="(default 50)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    p.set_defaults(func=cmd_train)

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
        table1_from=args.table1_from, command=cmd, load=lambda spec: load_model(spec, args.device),
    )
    if res.get("single") is None:
        print(res["report"])
    else:
        print(json.dumps(res["single"]) if args.json else single_summary(res["single"]))
    return 0


# ------------------------------------------------------------------------------ entry point
def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 runtime error, 2 usage error)."""
    debug = os.environ.get(DEBUG_ENV) == "1"
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate" and args.shard_size is None:
        from .generate import DEFAULT_SHARD_SIZE

        args.shard_size = DEFAULT_SHARD_SIZE
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
