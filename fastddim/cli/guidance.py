"""The classifier-free guidance options of ``sample``, ``generate`` and ``invert``.

    --guidance-scale W  --guidance-rescale PHI  --guidance-interval T_LO T_HI  --guidance {cfg,cfg++}
    --guidance-split

Guidance is on when W != 1 or with ``--guidance cfg++``. The unconditional half's kwargs come from
the model: ``{"class_labels": tensor([model.null_class_label])}`` (the built-in ``mnist-cond``),
the conditional half's from --class-label / --classes. Each value is checked by its argparse type;
the rules between values are ``fastddim.guidance.make_guidance``'s (the library's one home), its
message prefixed with the flag; the rules that need the model are checked right after it loads,
before any sampling.
"""
from __future__ import annotations

import argparse

from ..guidance import GUIDANCE_METHODS
from . import common as c

# make_guidance names the keyword first in its messages; the flag that sets it, longest name first.
_FLAGS = (("guidance_rescale", "--guidance-rescale"), ("guidance_interval", "--guidance-interval"),
          ("guidance_scale", "--guidance-scale"), ("guidance", "--guidance"))
_NO_LABELS = "without a label the model samples its null label, which guidance leaves unchanged"


def add_guidance(p: argparse.ArgumentParser, methods: tuple[str, ...] = GUIDANCE_METHODS) -> None:
    """The guidance options (``methods``: the --guidance choices; invert has no CFG++)."""
    g = p.add_argument_group("classifier-free guidance (a conditional model with a null label, e.g. mnist-cond)")
    g.add_argument("--guidance-scale", type=c.nonneg_float, default=1.0, metavar="W",
                   help="guidance weight w, u + w (c - u) as diffusers (default 1: the conditional model alone, "
                        "no unconditional call); with --guidance cfg++ lambda in [0, 1]. Needs --class-label or "
                        "--classes")
    g.add_argument("--guidance-rescale", type=c.float_type(0.0, 1.0), default=0.0, metavar="PHI",
                   help="rescale the guided output's std towards the conditional one's (Lin et al. 2023, "
                        "diffusers' guidance_rescale), PHI in [0, 1] (default 0)")
    g.add_argument("--guidance-interval", type=c.float_type(), nargs=2, default=None, metavar=("T_LO", "T_HI"),
                   help="guide only the steps whose timestep t has T_LO <= t <= T_HI (Kynkaenniemi et al. 2024); "
                        "elsewhere the conditional model alone, one model call")
    g.add_argument("--guidance", choices=methods, default=methods[0],
                   help="cfg (default) or cfg++ (Chung et al. 2024: x0 from the guided output, the direction "
                        "from the unconditional one; DDIM only)" if "cfg++" in methods else
                   "cfg (the only one here: CFG++ inversion is not built)")
    g.add_argument("--guidance-split", action="store_true",
                   help="run the unconditional and conditional halves as two model calls instead of one on a "
                        "doubled batch (less memory)")


def _on(args) -> bool:
    return args.guidance_scale != 1 or args.guidance == "cfg++"


def guidance_kwargs(args) -> dict:
    """The sampling keywords of the guidance options, their values checked before the model loads:
    {} when guidance is off (an option that then does nothing is refused), else every ``guidance*``
    keyword (``uncond_kwargs`` comes from the model: ``with_uncond``)."""
    from ..guidance import make_guidance

    if not _on(args):
        for flag, given in (("--guidance-rescale", args.guidance_rescale),
                            ("--guidance-interval", args.guidance_interval), ("--guidance-split", args.guidance_split)):
            if given:
                raise c.CliError(f"{flag}: does nothing without guidance (--guidance-scale 1 samples the conditional "
                                 "model alone); add --guidance-scale W", 2)
        return {}
    if args.guidance == "cfg++" and getattr(args, "solver", "ddim") != "ddim":
        raise c.CliError(f"--guidance cfg++: a DDIM update (its direction is the unconditional eps), not with "
                         f"--solver {args.solver}; use --guidance cfg", 2)
    kw = dict(guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale,
              guidance_interval=None if args.guidance_interval is None else tuple(args.guidance_interval),
              guidance=args.guidance, guidance_split=args.guidance_split)
    try:  # no timesteps yet: every check of the values themselves and of their combinations
        make_guidance((), kw["guidance_scale"], kw["guidance_rescale"], kw["guidance_interval"], kw["guidance"])
    except (TypeError, ValueError) as e:
        flag = next((f for name, f in _FLAGS if str(e).startswith(name)), "--guidance")
        also = " (with --guidance cfg++ it is lambda)" if flag == "--guidance-scale" and args.guidance == "cfg++" else ""
        raise c.CliError(f"{flag}: {c.one_line(e)}{also}", 2) from None
    return kw


def with_uncond(model, args, kw: dict) -> dict:
    """``kw`` (from ``guidance_kwargs``) with the model's unconditional kwargs, checked before any
    sampling: a guided run needs a model with ``null_class_label`` and a label to guide towards."""
    import torch

    if not kw:
        return kw
    null = getattr(model, "null_class_label", None)
    if null is None:
        raise c.CliError(f"{_what(args)}: the model has no null class label (model.null_class_label) for the "
                         "unconditional half; guidance needs a conditional model trained with label dropout, "
                         "e.g. --model mnist-cond", 2)
    if c.label_option(args) is None:
        raise c.CliError(f"{_what(args)}: guidance needs the condition: add --class-label K or --classes C "
                         f"({_NO_LABELS})", 2)
    return {**kw, "uncond_kwargs": {"class_labels": torch.tensor([int(null)], dtype=torch.int64)}}


def _what(args) -> str:
    return f"--guidance-scale {args.guidance_scale:g}" if args.guidance == "cfg" else f"--guidance {args.guidance}"


def describe(kw: dict) -> str:
    """What a report line says of the guidance ('' when off)."""
    if not kw:
        return ""
    w = f"{'lambda' if kw['guidance'] == 'cfg++' else 'w'}={kw['guidance_scale']:g}"
    return f", {kw['guidance']} {w}" + (f" rescale {kw['guidance_rescale']:g}" if kw["guidance_rescale"] else "")
