"""The ``fastddim`` command line (also ``python -m fastddim``). See docs/cli.md.

    fastddim sample -n 64 --steps 10 -o samples.png
    fastddim invert -i samples.npz --steps 50 -o latents.npz
    fastddim interpolate --seed 1 --seed2 2 --num 11 --steps 50 -o path.png
    fastddim generate --n 50000 --steps 10 --out run/
    fastddim train --steps 4000 --out mnist.safetensors
    fastddim eval -n 256 --steps 10

One module per command, each with ``add(sub)`` (its parser) and ``run(args)``, on top of the
library and of ``common`` (the error type, the argument types built on ``fastddim.checks`` so
that a bad value reads the same from Python and from a shell, the shared options, the class-label
and thread rules). Models come from ``fastddim.pretrained.load_model``; output paths are checked
by ``fastddim.paths`` before any model is loaded or called; the jobs live in ``fastddim.generate``,
``fastddim.train`` and ``fastddim.paper``.

Every command takes ``--model``: a packaged model name (default ``mnist``), the path of a
checkpoint written by ``fastddim train``, or ``module:attr`` / ``path/to/file.py:attr`` naming
a model object (a ``torch.nn.Module`` or anything with ``sample_shape``) or a zero-argument
factory returning one. Every command takes ``--threads`` (one rule: ``common.threads``).

Errors a user can make print one line, ``fastddim: error: ...``, and exit with 2 (bad command
line) or 1 (a problem found while running); 130 after Ctrl-C. ``FASTDDIM_DEBUG=1`` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..pretrained import load_model  # noqa: F401  (fastddim.cli.load_model: the name used before it moved)
from . import evaluate, generate, interpolate, invert, sample, train
from .common import PROG, CliError, Parser, one_line, threads

__all__ = ["main", "build_parser", "CliError"]

DEBUG_ENV = "FASTDDIM_DEBUG"
COMMANDS = (sample, invert, interpolate, generate, train, evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fast DDIM sampling (Song et al. 2021) for trained diffusion models.",
        epilog="examples:\n"
               "  fastddim sample -n 64 --steps 10 -o samples.png\n"
               "  fastddim generate --n 50000 --steps 10 --out run/\n"
               "  fastddim <command> --help\n\n"
               "FASTDDIM_DEBUG=1 shows tracebacks instead of one-line errors.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"fastddim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for command in COMMANDS:
        command.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 runtime error, 2 usage error, 130 Ctrl-C)."""
    debug = os.environ.get(DEBUG_ENV) == "1"
    args = build_parser().parse_args(argv)
    from ..generate import _threads as torch_threads  # the one home of "torch's threads for a block"

    try:
        with torch_threads(threads(args)):
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
            return _fail(one_line(e), 1)
        raise


def _fail(msg: str, code: int) -> int:
    sys.stdout.flush()
    sys.stderr.write(f"{PROG}: error: {msg}\n")
    return code
