"""The model as a run calls it: low-precision / channels_last copies, compiled modules, the layout.

``model_as_called(model, dtype, memory_format, mode)`` returns the user's module itself when it
already has the dtype and layout, else a converted copy; with a torch.compile ``mode``, the
compiled module. The user's module is never changed (``Module.to`` works in place).

What a copy costs: the model's parameters and buffers once more (``weight_bytes``; on a GPU
that doubles a large model's weight memory), made once and cached. It is refreshed in place
when the user's weights change (an optimizer step between two calls), so it never samples with
stale weights.

One cache, ``_MODELS``, keyed weakly by the user's model: its copies, its compiled modules and
its layout probes. Nothing in an entry refers back to the user's model object (copies are deep
copies; a compiled module wraps a copy or a shell sharing the model's parameters and
submodules, never the model itself), so deleting the model frees the whole entry.

``memory_format="auto"`` decides by evidence (``choose_layout``): on a fused backend, for a
module with 2-D convolutions on (C, H, W) samples, one short timed probe of both layouts at the
run's batch size, cached per (model, dtype, batch, shape, device). channels_last helps one model
and hurts another (one thread on the CPU: the built-in U-Net's forward 1.32x faster at batch 16
but 0.73x at batch 1; the DDPM CIFAR-10 U-Net 1.09x at batch 1 but 0.81x at batch 16), so no
fixed rule is right. The decision and its evidence are recorded (``Layout``) and
``memory_format=torch.channels_last / torch.contiguous_format`` overrides it.
"""
from __future__ import annotations

import copy
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["model_as_called", "choose_layout", "Layout", "clear_cache", "weight_bytes", "MEMORY_FORMATS"]

MEMORY_FORMATS = ("auto", torch.channels_last, torch.contiguous_format)
# The probe: one warm-up and PROBE_REPEATS timed forwards per layout, interleaved, best of each.
PROBE_REPEATS = 2
PROBE_FORWARDS = 2 * (1 + PROBE_REPEATS)
# Probe only a run that makes at least this many times the probe's forwards (the probe then costs
# at most 1/5 of the first run; later runs reuse the cached decision). Smaller runs keep the
# model as given until a probe exists.
PROBE_AMORTIZE = 5
# channels_last must win by this much to be worth a second copy of the weights.
PROBE_MARGIN = 1.05


@dataclass
class _Copy:
    """A converted copy of a user's module and the stamp of the weights it was made from."""

    module: torch.nn.Module
    stamp: tuple


@dataclass
class _Entry:
    """Everything cached for one user model. Must never refer to the model itself (see module doc)."""

    copies: dict = field(default_factory=dict)    # (dtype, memory_format) -> _Copy
    compiled: dict = field(default_factory=dict)  # (dtype, memory_format, mode) -> compiled module
    layouts: dict = field(default_factory=dict)   # (dtype, batch, shape, device) -> Layout


@dataclass(frozen=True)
class Layout:
    """The memory format a run uses and why: ``reason`` is one of "given", "torch backend",
    "not a conv module on images", "probe", "cached probe", "run too small to probe"; ``ms`` is
    the probe's best forward time per layout (contiguous, channels_last), or None."""

    memory_format: Any
    reason: str
    ms: tuple[float, float] | None = None

    def info(self) -> dict:
        """What ``fastddim.info()["last_run"]`` records of the decision."""
        return {"memory_format_reason": self.reason, "probe_ms": None if self.ms is None else list(self.ms)}


_MODELS: "weakref.WeakKeyDictionary[Any, _Entry]" = weakref.WeakKeyDictionary()


def clear_cache() -> None:
    """Forget every model copy, compiled module and layout probe."""
    _MODELS.clear()


def _entry(model) -> _Entry | None:
    """The cache entry of ``model``; None when it cannot be weakly referenced (nothing is cached)."""
    try:
        return _MODELS.setdefault(model, _Entry())
    except TypeError:
        return None


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers: what one copy of it costs."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


# ----------------------------------------------------------------------------------- copies
def _stamp(module: torch.nn.Module) -> tuple:
    # Parameters changed in place (an optimizer step) bump _version; replaced ones change address.
    # Inference tensors (a module built under torch.inference_mode) have no version counter.
    return tuple((t.data_ptr(), 0 if t.is_inference() else t._version, t.dtype)
                 for t in (*module.parameters(), *module.buffers()))


def _needs_copy(module: torch.nn.Module, dtype: torch.dtype, memory_format) -> bool:
    floats = [p for p in (*module.parameters(), *module.buffers()) if p.is_floating_point()]
    wrong_dtype = dtype != torch.float32 and any(p.dtype != dtype for p in floats)
    wrong_format = memory_format == torch.channels_last and any(
        p.ndim == 4 and not p.is_contiguous(memory_format=torch.channels_last) for p in floats
    )
    return wrong_dtype or wrong_format


def _make_copy(module: torch.nn.Module, dtype: torch.dtype, memory_format) -> torch.nn.Module:
    new = copy.deepcopy(module).eval()
    new.requires_grad_(False)
    # torch.nn.Module.to, not the module's own: diffusers' ModelMixin.to warns "There are modules
    # in ... that should be kept in float32" on every dtype cast (even with an empty list), noise
    # to a user who asked for this dtype; the cast itself is the same.
    if dtype != torch.float32:
        new = torch.nn.Module.to(new, dtype)
    if memory_format == torch.channels_last:
        new = torch.nn.Module.to(new, memory_format=torch.channels_last)
    return new


def _refresh(dst: torch.nn.Module, src: torch.nn.Module) -> bool:
    """Copy src's current weights into dst in place (keeps a compiled dst valid); False if the structure changed."""
    d, s = list(dst.state_dict(keep_vars=True).items()), list(src.state_dict(keep_vars=True).items())
    if [(k, v.shape) for k, v in d] != [(k, v.shape) for k, v in s]:
        return False
    with torch.no_grad():
        for (_, a), (_, b) in zip(d, s):
            a.copy_(b)
    return True


def converted(module: torch.nn.Module, dtype: torch.dtype, memory_format) -> torch.nn.Module:
    """The module in ``dtype`` and ``memory_format``: itself if already so, else a cached copy."""
    if not _needs_copy(module, dtype, memory_format):
        return module
    entry, key, stamp = _entry(module), (dtype, memory_format), _stamp(module)
    c = entry.copies.get(key)
    if c is not None and (c.stamp == stamp or _refresh(c.module, module)):
        c.stamp = stamp
        return c.module
    entry.copies[key] = _Copy(_make_copy(module, dtype, memory_format), stamp)
    return entry.copies[key].module


# --------------------------------------------------------------------------------- compiled
def _compile(fn: Callable, mode: str):
    return torch.compile(fn, mode=None if mode == "default" else mode, dynamic=False)


def _shell(module: torch.nn.Module) -> torch.nn.Module:
    """A new module object sharing ``module``'s parameters, buffers, submodules and hooks.

    What a compiled module may wrap and a cache may hold without keeping ``module`` alive:
    ``copy.copy`` copies the instance dict shallowly, so the shell sees in-place weight updates
    and replaced parameters or submodules, and costs no memory.
    """
    return copy.copy(module)


def _compiled(model: torch.nn.Module, base: torch.nn.Module, key: tuple, mode: str):
    """torch.compile of ``base`` (``model`` or its copy), cached on ``model``'s entry while it lives."""
    entry = _entry(model)
    fn = entry.compiled.get(key)
    # A copy replaced since (the model's structure changed) needs a new compiled module.
    if fn is None or (base is not model and fn._orig_mod is not base):
        fn = entry.compiled[key] = _compile(_shell(model) if base is model else base, mode)
    return fn


def model_as_called(model: Callable, dtype: torch.dtype, memory_format, mode: str | None) -> Callable:
    """The callable a run calls: converted (modules only) and compiled (``mode`` not None).

    A callable that is not a module is compiled per call of this function, not cached: a cached
    compiled function would hold it alive, and dynamo's own cache on its code object already
    spares a recompilation.
    """
    if not isinstance(model, torch.nn.Module):
        return model if mode is None else _compile(model, mode)
    base = converted(model, dtype, memory_format)
    return base if mode is None else _compiled(model, base, (dtype, memory_format, mode), mode)


# ----------------------------------------------------------------------------------- layout
def check_memory_format(memory_format):
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be 'auto', torch.channels_last or torch.contiguous_format, got {memory_format!r}")
    return memory_format


def _is_conv_on_images(model, shape: tuple) -> bool:
    return (isinstance(model, torch.nn.Module) and len(shape) == 3
            and any(isinstance(m, torch.nn.Conv2d) for m in model.modules()))


def _best_ms(fns: list[Callable[[], Any]], device: torch.device) -> list[float]:
    """Best time in ms of each fn over PROBE_REPEATS interleaved calls, after one warm-up each."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(PROBE_REPEATS):
        for i, fn in enumerate(fns):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[i] = min(best[i], (time.perf_counter() - t0) * 1e3)
    return best


def probe_ms(model: torch.nn.Module, dtype: torch.dtype, x: torch.Tensor, t: torch.Tensor, kwargs: dict) -> tuple[float, float]:
    """(contiguous, channels_last) best forward time in ms of ``model`` on x (B, C, H, W) in ``dtype``.

    The channels_last copy made for the probe is dropped again (the caller keeps the winner).
    """
    entry = _entry(model)
    had = (dtype, torch.channels_last) in entry.copies
    mods = [converted(model, dtype, torch.contiguous_format), converted(model, dtype, torch.channels_last)]
    with torch.inference_mode():
        ms = _best_ms([lambda m=m: m(x, t, **kwargs) for m in mods], x.device)
    if not had:
        entry.copies.pop((dtype, torch.channels_last), None)
    return ms[0], ms[1]


def choose_layout(memory_format, model, shape: tuple, backend: str, dtype: torch.dtype, batch: int, calls: int,
                  device: torch.device, probe_inputs: Callable[[], tuple]) -> Layout:
    """The run's memory format and why.

    A given format is used as is. "auto": the model as given on the torch backend (it promises
    diffusers' numbers bit for bit, and channels_last reorders fp32 sums) and for anything but a
    module with 2-D convolutions on (C, H, W) samples; otherwise the probe's decision for this
    (dtype, batch, shape, device), probing now when the run makes at least PROBE_AMORTIZE times
    the probe's forwards (``calls``: the run's model calls), else contiguous for now.
    ``probe_inputs()`` returns (x (batch, *shape) in dtype, t (batch,) int64, model kwargs).
    """
    check_memory_format(memory_format)
    if memory_format != "auto":
        return Layout(memory_format, "given")
    if backend == "torch":
        return Layout(torch.contiguous_format, "torch backend")
    if not _is_conv_on_images(model, shape):
        return Layout(torch.contiguous_format, "not a conv module on images")
    entry, key = _entry(model), (dtype, batch, tuple(shape), device)
    cached = entry.layouts.get(key)
    if cached is not None:
        return Layout(cached.memory_format, "cached probe", cached.ms)
    if calls < PROBE_AMORTIZE * PROBE_FORWARDS:
        return Layout(torch.contiguous_format, "run too small to probe")
    ms = probe_ms(model, dtype, *probe_inputs())
    fmt = torch.channels_last if ms[0] > PROBE_MARGIN * ms[1] else torch.contiguous_format
    entry.layouts[key] = Layout(fmt, "probe", ms)
    return entry.layouts[key]


def copy_bytes(model: Callable, dtype: torch.dtype, memory_format) -> int:
    """Bytes the run's converted copy of ``model``'s weights costs; 0 when the model is called as given."""
    if not isinstance(model, torch.nn.Module):
        return 0
    base = converted(model, dtype, memory_format)
    return 0 if base is model else weight_bytes(base)
