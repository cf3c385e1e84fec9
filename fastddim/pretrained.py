"""Load the packaged model, or any checkpoint written by :func:`fastddim.train.train`.

Checkpoints are safetensors files (never pickles). Tensor names:

    model.<param>            raw training weights            (training checkpoints only)
    ema.<param>              EMA weights, what samples use   (always present)
    optim.<i>.<key>          AdamW state of parameter i      (training checkpoints only)
    rng.<name>               RNG states as uint8 tensors     (training checkpoints only)

Metadata (all strings): ``format`` = ``fastddim-checkpoint-1``, ``config`` (UNetConfig JSON),
``step``, ``schedule`` (JSON: kind, T, name, alphas_cumprod_sha256) and, for training
checkpoints, ``train`` (the training arguments as JSON).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checks import check_device
from .models.unet import UNet, UNetConfig
from .schedule import Schedule

__all__ = ["pretrained", "load_model", "load_checkpoint", "Checkpoint", "KNOWN", "FORMAT"]

FORMAT = "fastddim-checkpoint-1"
_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# name -> file in fastddim/weights/ (how each was trained: docs/training.md). "mnist-cond" is the
# "mnist-cond" U-Net preset (conditioned on the digit, with a null label), for guidance.
# "mnist-v1" is the default before issue 20 (same network, 4,000 steps): the docs' figures
# measured on it name it, so they stay reproducible.
KNOWN = {"mnist": "mnist.safetensors", "mnist-cond": "mnist-cond.safetensors", "mnist-v1": "mnist-v1.safetensors"}

# Schedules a checkpoint may name; rebuilt from (kind, T) and checked against the stored hash.
_SCHEDULE_KINDS = {"linear": Schedule.linear, "scaled_linear": Schedule.scaled_linear, "cosine": Schedule.cosine}


def schedule_to_json(kind: str, schedule: Schedule) -> str:
    return json.dumps({"kind": kind, **schedule.to_dict()})


def schedule_from_json(text: str) -> Schedule:
    d = json.loads(text)
    if d.get("kind") not in _SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule kind {d.get('kind')!r}; known: {sorted(_SCHEDULE_KINDS)}")
    s = _SCHEDULE_KINDS[d["kind"]](T=int(d["T"]))
    if s.to_dict()["alphas_cumprod_sha256"] != d["alphas_cumprod_sha256"]:
        raise ValueError(f"schedule {d['name']!r} does not match the one rebuilt from ({d['kind']}, T={d['T']})")
    return s


@dataclass
class Checkpoint:
    """The parsed contents of a checkpoint file.

    ``model``, ``ema``: state dicts (``model`` is empty in a weights-only file); ``optim``:
    ``{param index: {key: tensor}}``; ``rng``: ``{name: uint8 tensor}``; ``train``: the
    training arguments (empty in a weights-only file).
    """

    path: str
    config: UNetConfig
    schedule: Schedule
    step: int
    ema: dict[str, torch.Tensor]
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    optim: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    schedule_json: str = ""


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a fastddim checkpoint (safetensors; nothing is unpickled).

    Raises:
        ValueError: the file is missing, not a safetensors file, or not a fastddim checkpoint.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint file not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable safetensors checkpoint ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastddim checkpoint (metadata format={meta.get('format')!r}, expected {FORMAT!r})")
    try:
        config = UNetConfig.from_dict(json.loads(meta["config"]))
        schedule = schedule_from_json(meta["schedule"])
        step = int(meta["step"])
        train_args = json.loads(meta.get("train", "{}"))
    except (KeyError, TypeError, json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"{path}: bad checkpoint metadata ({e!r})") from e

    ck = Checkpoint(path=path, config=config, schedule=schedule, step=step, ema={}, train=train_args,
                    schedule_json=meta["schedule"])
    for k, v in tensors.items():
        group, _, rest = k.partition(".")
        if group in ("model", "ema", "rng"):
            getattr(ck, group)[rest] = v
        elif group == "optim":
            i, _, key = rest.partition(".")
            ck.optim.setdefault(int(i), {})[key] = v
        else:
            raise ValueError(f"{path}: unexpected tensor {k!r} in checkpoint")
    if not ck.ema:
        raise ValueError(f"{path}: checkpoint holds no EMA weights")
    return ck


def pretrained(name: str | os.PathLike = "mnist", device: str | torch.device | None = None) -> UNet:
    """A trained eps-prediction U-Net, in eval mode, ready for ``fastddim.sample``.

    Args:
        name: a packaged model (``"mnist"``: 1x32x32 digits, linear schedule, T=1000;
            ``"mnist-cond"``: the same conditioned on the digit, ``model(x, t, class_labels=y)`` with
            ``model.null_class_label`` the unconditional label; ``"mnist-v1"``: the previous, weaker
            ``"mnist"``, kept for the figures measured on it) or the path of a checkpoint written
            by ``fastddim.train.train`` (its EMA weights are used).
        device: where to put the model (default CPU).

    Returns:
        ``UNet`` with ``sample_shape`` (C, H, W) and ``schedule`` set; ``model(x, t)`` maps
        (B, C, H, W) float32 and (B,) int64 timesteps to eps of shape (B, C, H, W).
    """
    name_s = os.fspath(name)
    if name_s in KNOWN:
        path = _WEIGHTS_DIR / KNOWN[name_s]
        if not path.is_file():
            raise ValueError(f"packaged model {name_s!r} has no weights in this installation ({path} is missing): "
                             f"train it with 'fastddim train --model {name_s}' (docs/training.md) and pass the "
                             "checkpoint's path")
    elif os.sep in name_s or name_s.endswith(".safetensors") or os.path.exists(name_s):
        path = Path(name_s)
    else:
        raise ValueError(f"unknown pretrained model {name_s!r}; known: {sorted(KNOWN)} (or pass a checkpoint path)")
    ck = load_checkpoint(path)
    model = UNet(ck.config, schedule=ck.schedule)
    try:
        model.load_state_dict({k: v.float() for k, v in ck.ema.items()})
    except RuntimeError as e:
        raise ValueError(f"{path}: EMA weights do not fit the stored config ({e})") from e
    model.requires_grad_(False)
    return model.eval().to(device if device is not None else "cpu")


def load_model(spec: str | os.PathLike | None = None, device: str | torch.device | None = None):
    """The model a ``--model`` value names, on ``device`` (default: CUDA if available, else CPU).

    ``spec``:
      - None or a packaged name (``"mnist"``): ``pretrained(name)``;
      - an existing file: a checkpoint written by ``fastddim train`` (``pretrained(path)``);
      - ``module:attr`` or ``path/to/file.py:attr``: the object ``attr``; if it is a
        ``torch.nn.Module`` or has ``sample_shape`` it is the model, otherwise it is called with
        no arguments and must return one. The model needs ``sample_shape`` and ``schedule``.
    Modules are put in eval mode and moved to ``device``.

    Raises ValueError (one line: what was asked for and why it failed).
    """
    dev = check_device("device", device)
    spec = None if spec is None else os.fspath(spec)
    if spec is not None and not os.path.exists(spec) and ":" in spec:
        model = _import_model(spec)
        if isinstance(model, torch.nn.Module):
            model = model.eval().to(dev)
        return model
    if spec is not None and not os.path.exists(spec) and (os.sep in spec or "." in os.path.basename(spec)):
        raise ValueError(f"model file not found: {spec}")
    name = spec or "mnist"
    try:
        return pretrained(name, device=dev)
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot load model {name!r}: {_one_line(e)}") from e
    except Exception as e:  # a damaged file can fail deep inside a reader
        raise ValueError(f"cannot load model {name!r}: {type(e).__name__}: {_one_line(e)}") from e


def _import_model(spec: str):
    """The model (or the factory's model) that ``module:attr`` / ``file.py:attr`` names."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ValueError(f"--model {spec!r}: expected module:attr or path/to/file.py:attr")
    if target.endswith(".py") and not os.path.isfile(target):
        raise ValueError(f"model file not found: {target}")
    try:
        if target.endswith(".py"):
            name = "_fastddim_user_model_" + os.path.splitext(os.path.basename(target))[0]
            sp = importlib.util.spec_from_file_location(name, target)
            mod = importlib.util.module_from_spec(sp)
            sys.modules[name] = mod
            sp.loader.exec_module(mod)
        else:
            mod = importlib.import_module(target)
    except ImportError as e:
        raise ValueError(f"--model {spec!r}: cannot import {target!r} ({e})") from e
    except Exception as e:
        raise ValueError(f"--model {spec!r}: importing {target!r} failed: {type(e).__name__}: {_one_line(e)}") from e
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--model {spec!r}: {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, torch.nn.Module) and not hasattr(obj, "sample_shape"):
        if not callable(obj):
            raise ValueError(f"--model {spec!r}: {attr!r} is neither a model nor a factory")
        obj = obj()
    if not hasattr(obj, "sample_shape") or not hasattr(obj, "schedule"):
        raise ValueError(f"--model {spec!r}: the model needs 'sample_shape' and 'schedule' attributes")
    return obj


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__
