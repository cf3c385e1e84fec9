"""What the commands share: the error type, the argument types and options, and the helpers
that load a model, check its class labels and time a run."""
from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import sys
import time
from typing import Any, Callable, Iterator

from ..checks import check_device, check_eta, check_float, check_int, check_seed
from ..paths import output_file, output_folder
from ..plan import DPM_SPACINGS, SOLVERS, SPACINGS
from ..pretrained import load_model

PROG = "fastddim"
DTYPES = ("float32", "bfloat16", "float16")
FMT = argparse.RawDescriptionHelpFormatter
# The default of --threads: torch's own default (every core) collapses when another process keeps
# a core busy (docs/cli.md, "Threads").
DEFAULT_THREADS = 1


class CliError(Exception):
    """A user error found while running: printed as one line, exit status ``code``."""

    def __init__(self, msg: str, code: int = 1):
        super().__init__(msg)
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), naming the --help to read."""

    def error(self, message: str):  # noqa: D401
        sys.stderr.write(f"{PROG}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


# ------------------------------------------------------------------------------ value types
def typed(check: Callable, parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
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


def int_type(lo: int, hi: int | None = None):
    return typed(lambda v: check_int("", v, lo, hi), lambda s: int(s, 0), "an integer")


def float_type(lo: float | None = None, hi: float | None = None):
    return typed(lambda v: check_float("", v, lo, hi), float, "a number")


positive_int = int_type(1)
nonneg_int = int_type(0)
nonneg_float = float_type(0)
seed_type = typed(check_seed, lambda s: int(s, 0), "an integer seed")
eta_type = typed(check_eta, lambda s: s if s == "sigma_hat" else float(s), "a number >= 0 or 'sigma_hat'")
device_type = typed(lambda d: check_device("", d), str, "a device")


# ------------------------------------------------------------------------------ options
def add_threads(p: argparse.ArgumentParser, also: str = "") -> None:
    """--threads, the same rule for every command (resolved by ``threads``)."""
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help=f"torch CPU threads (default {DEFAULT_THREADS}, whatever OMP_NUM_THREADS says: torch's "
                        f"all-cores default collapses on a busy machine; raise it on an idle one){also}")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device_type, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: when stderr is a terminal)")


def add_common(p: argparse.ArgumentParser, *, steps_default: int = 10, latents: bool = False,
               threads_note: str = "", solver: bool = False) -> None:
    """The options every sampling command has. ``latents``: --steps and --spacing default to what
    a --latents file records (None here, resolved by the command); ``threads_note`` ends --threads' help.
    ``solver``: --solver and --karras too, and --spacing defaults to the solver's (``solver_kwargs``)."""
    also = ", or what --latents records" if latents else ""
    default = f"uniform{also}"
    if solver:
        add_solver(p)
        default = f"with --solver ddim: {default}; with dpm++2m: linspace, as diffusers"
    p.add_argument("--model", metavar="NAME|PATH|MODULE:ATTR", default=None,
                   help="packaged model name (default: mnist), a checkpoint from 'fastddim train', "
                        "or module:attr / file.py:attr naming a model or a factory")
    p.add_argument("--steps", "-S", type=positive_int, default=None if latents else steps_default,
                   help=f"number of steps S = model calls per image (default {steps_default}{also})")
    p.add_argument("--spacing", choices=SPACINGS, default=None if latents or solver else "uniform",
                   help=f"which timesteps the S steps visit (default {default}; the paper's CIFAR-10 numbers "
                        "use quad)")
    p.add_argument("--batch-size", "-b", type=positive_int, default=None,
                   help="images per model call (results do not depend on it)")
    add_device(p)
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype of the model's weights and input (the state stays float32; default float32)")
    p.add_argument("--backend", default="auto",
                   help="step implementation: auto, torch, triton, cpp, cuda (default auto; see fastddim.info())")
    add_threads(p, threads_note)
    add_progress(p)


def add_solver(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", choices=SOLVERS, default="ddim",
                   help="ddim (default) or dpm++2m: DPM-Solver++(2M), better images per model call at few "
                        "steps (deterministic: --eta must stay 0; spacings linspace, leading, trailing)")
    p.add_argument("--karras", action="store_true",
                   help="with --solver dpm++2m: Karras sigmas ('DPM++ 2M Karras'); they choose the timesteps, "
                        "so leave --spacing out")


def solver_kwargs(args) -> dict:
    """The sampling keyword arguments of --solver / --karras / --spacing, checked before any work:
    ``solver``, ``spacing`` (--spacing, else the solver's default: uniform for DDIM, None for
    DPM-Solver++, which the plan makes linspace as diffusers does) and ``use_karras_sigmas``."""
    from ..engine import check_solver

    try:
        check_solver(args.solver, getattr(args, "eta", 0.0))
    except ValueError as e:
        raise CliError(f"--eta: {e}", 2) from None
    kw: dict = {"solver": args.solver, "spacing": args.spacing}
    if args.solver == "ddim":
        if args.karras:
            raise CliError("--karras: Karras sigmas are a DPM-Solver++ option; add --solver dpm++2m", 2)
        kw["spacing"] = args.spacing or "uniform"
    elif args.spacing is not None and args.spacing not in DPM_SPACINGS:
        raise CliError(f"--spacing {args.spacing}: --solver {args.solver} takes {', '.join(DPM_SPACINGS)}", 2)
    elif args.karras:
        if args.spacing is not None:
            raise CliError(f"--spacing {args.spacing}: with --karras the Karras sigmas choose the timesteps; "
                           "leave --spacing out", 2)
        kw["use_karras_sigmas"] = True
    return kw


def add_labels(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--class-label", type=nonneg_int, default=None, metavar="K",
                   help="for a class-conditional model: label K for every image, passed as "
                        "model(x, t, class_labels=...)")
    g.add_argument("--classes", type=positive_int, default=None, metavar="C",
                   help="for a class-conditional model: spread the images over C classes, image i (its global "
                        "index) gets label i %% C")


# ------------------------------------------------------------------------------ threads
def threads(args) -> int:
    """The torch CPU thread count a command runs with: --threads, else ``DEFAULT_THREADS``.

    A fixed count, never one that follows the machine's load or the environment: torch's CPU
    kernels may round differently with the thread count, and a command's bytes should not depend
    on them (``torchrun`` sets OMP_NUM_THREADS=1 in its workers; one process must match them)."""
    return args.threads if getattr(args, "threads", None) is not None else DEFAULT_THREADS


# ------------------------------------------------------------------------------ class labels
def label_option(args) -> str | None:
    if getattr(args, "class_label", None) is not None:
        return f"--class-label {args.class_label}"
    if getattr(args, "classes", None) is not None:
        return f"--classes {args.classes}"
    return None


def model_classes(model) -> int | None | bool:
    """How many class labels ``model`` takes, when it says: an int; False when it takes none;
    None when it does not say.

    Read from diffusers' ``config.num_class_embeds`` (with ``class_embed_type`` None and no
    ``num_class_embeds`` a diffusers model is unconditional), a ``num_classes`` attribute (the
    built-in U-Net's; 0: unconditional), or a ``forward`` / ``__call__`` that accepts no
    ``class_labels`` keyword.
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_class_embeds"):
        if config.num_class_embeds is not None:
            return int(config.num_class_embeds)
        if getattr(config, "class_embed_type", None) is None:
            return False
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and not isinstance(n, bool):
        return n or False  # num_classes = 0: unconditional (the built-in U-Net's convention)
    try:
        params = inspect.signature(getattr(model, "forward", model)).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: nothing to read
        return None
    if not any(p.name == "class_labels" or p.kind is p.VAR_KEYWORD for p in params):
        return False
    return None


def check_labels(model, args) -> None:
    """Refuse --class-label / --classes that the model cannot take, before any sampling."""
    opt = label_option(args)
    if opt is None:
        return
    n = model_classes(model)
    if n is False:
        raise CliError(f"{opt}: the model is unconditional (it takes no class_labels); leave {opt.split()[0]} out", 2)
    if n is None:
        return
    top = args.class_label if args.class_label is not None else args.classes - 1
    if top >= n:
        raise CliError(f"{opt}: the model has {n} classes, labels 0..{n - 1}", 2)


@contextlib.contextmanager
def model_errors_name_labels(args) -> Iterator[None]:
    """A model's own failure on the labels (an embedding index out of range: IndexError on the CPU,
    a device-side assert on CUDA) as one line that names the label option."""
    import torch

    opt = label_option(args)
    try:
        yield
    except (IndexError, RuntimeError) as e:
        if opt is None or isinstance(e, torch.OutOfMemoryError):
            raise
        raise CliError(f"{opt}: the model failed on these labels ({type(e).__name__}: {one_line(e)}); "
                       "is the label within the model's classes?") from None


# ------------------------------------------------------------------------------ shared helpers
def one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def fmt_rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.1f} images/s" if seconds > 0 else "inf images/s"


def load(args, device=None):
    """(model, device, backend) for a sampling command: the ``--model`` on the device (default
    ``--device``) with its weights in ``--dtype``, and the ``--backend`` resolved there. Class
    labels asked for are checked against the model here, before any sampling."""
    import torch

    from ..dispatch import resolve_backend

    dev = check_device("--device", device if device is not None else args.device)
    model = load_model(args.model, dev)
    check_labels(model, args)
    if args.dtype != "float32" and isinstance(model, torch.nn.Module):
        model = model.to(dtype(args.dtype))  # the state x_t stays float32
    try:
        backend = resolve_backend(args.backend, dev)
    except RuntimeError as e:
        raise CliError(str(e)) from None
    return model, dev, backend


def dtype(name: str):
    import torch

    return getattr(torch, name)


def timed(dev, fn: Callable):
    """(fn(), seconds), the device's queued work included."""
    import torch

    t0 = time.perf_counter()
    out = fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return out, time.perf_counter() - t0


def image_output(path: str, arg: str = "-o") -> str:
    """An image output: a folder (ending in '/' or existing) or a .png / .npz file; checked now."""
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        return output_folder(path, arg)
    if os.path.splitext(path)[1].lower() not in (".png", ".npz"):
        raise CliError(f"{arg} {path!r}: use a .png (grid), .npz, or a folder (ending in '/')", 2)
    return output_file(path, arg)
