"""Generate many samples (e.g. 50,000 for an FID) in one process or under ``torchrun``, resumably.

    fastddim generate --n 50000 --steps 10 --out run/                       # one process
    torchrun --nproc_per_node=8 -m fastddim generate -n 50000 --steps 10 --out run/

How the work is cut: the n global sample indices are split into fixed shards,
shard k = [k * shard_size, min(n, (k + 1) * shard_size)); the shard size does not depend on the
number of processes. Rank r of a world of size W makes the shards k with k % W == r, calling
``fastddim.sample(..., first_index=start)``, so sample i is a pure function of (seed, i): the
result is byte-identical for any world size, batch size or interruption pattern on one device
type (given a model whose output for one row does not depend on the other rows of its batch).
Ranks do not talk while sampling; they meet once at a barrier at the end, then rank 0 assembles.

On disk (``DIR`` = ``out``):
    DIR/shards/shard-00000.npz   arr_0 uint8 (len, H, W, C), start, stop, config_hash, config (JSON)
    DIR/samples.npz              arr_0 uint8 (n, H, W, C): the n images in index order
    DIR/manifest.json            what made them (model, schedule, plan, seed, n, versions, device)
Every file is written to a hidden temporary name in its folder, fsynced, then renamed: a
shard is either complete or absent, never partial.

Resuming: run the same command again. Existing shards are verified (loadable, right index
range, right config hash) and kept; missing ones are made. A folder holding a run with a
different configuration (model weights, schedule, steps/timesteps, eta, seed, n, shard size,
shape, dtype, device type, backend) is refused; batch size and world size are not part of the
configuration. Shards that cannot be loaded (damaged disk) are made again, with a warning.

Progress (rank 0 only): a tqdm bar of images done, images/s and ETA. It counts the images of the
shards present in ``DIR/shards`` (polled at most twice a second, so it sees every rank's
finished shards) plus rank 0's own in-progress shard; while rank 0 waits at the final barrier it
keeps polling the folder.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from datetime import timedelta
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .dispatch import resolve_backend
from .images import TMP_MARK, save_npz, save_npz_stream, to_uint8
from .plan import make_plan
from .sampler import _check_int, _resolve_schedule, _resolve_shape, sample

__all__ = ["generate", "init_distributed", "shard_ranges", "config_hash", "model_digest", "ConfigMismatch"]

SHARD_DIR = "shards"
SHARD_RE = re.compile(r"^shard-(\d{5,})\.npz$")
SAMPLES = "samples.npz"
MANIFEST = "manifest.json"
DEFAULT_SHARD_SIZE = 1024
# Test hook: stop (exit status 3 from the CLI) after writing this many shards in this process.
STOP_ENV = "FASTDDIM_GENERATE_STOP_AFTER_SHARDS"


class ConfigMismatch(ValueError):
    """The output folder holds a run with another configuration."""


class StoppedForTest(RuntimeError):
    """Raised after ``FASTDDIM_GENERATE_STOP_AFTER_SHARDS`` shards (simulates an interruption)."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.npz"


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[(start, stop)] of every shard, in order: shard k covers [k*shard_size, min(n, (k+1)*shard_size))."""
    return [(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]


def model_digest(model) -> str | None:
    """sha256 (first 16 hex digits) of a module's class name and state dict (names, dtypes,
    shapes, bytes); None for a model that is not a ``torch.nn.Module``."""
    if not isinstance(model, torch.nn.Module):
        return None
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def config_hash(config: dict) -> str:
    """sha256 (first 16 hex digits) of the configuration as canonical JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def init_distributed(device: str | torch.device | None = None) -> tuple[int, int, torch.device]:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (as ``torchrun`` sets them) and, when WORLD_SIZE > 1,
    join the process group: NCCL on CUDA, gloo on the CPU. On CUDA each process takes the GPU
    LOCAL_RANK (when ``device`` is ``"cuda"`` without an index).

    Returns (rank, world_size, device). ``device`` None means CUDA if available, else the CPU.
    """
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but CUDA is not available here")
        if dev.index is None:
            dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        # Ranks only meet at the final barrier; allow for uneven progress (e.g. after a resume).
        hours = float(os.environ.get("FASTDDIM_DIST_TIMEOUT_HOURS", "48"))
        try:
            torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(hours=hours))
        except RuntimeError as e:  # rendezvous, network or NCCL set-up problems: say so in one line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"rank {rank}: cannot join the process group ({world} processes): {msg}") from e
    return rank, world, dev


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _read_shard(path: str, full: bool) -> dict[str, Any]:
    """A shard's metadata (and its images when ``full``); raises ValueError if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = {"config_hash": str(z["config_hash"]), "config": str(z["config"]),
                    "start": int(z["start"]), "stop": int(z["stop"])}
            if full:
                meta["images"] = z["arr_0"]
    except Exception as e:  # zip, header or key errors: all mean "not a usable shard"
        raise ValueError(f"{path}: not a readable shard ({type(e).__name__}: {e})") from None
    return meta


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _diff(ours: dict, theirs: dict) -> str:
    ours, theirs = _flat(ours), _flat(theirs)
    keys = sorted(set(ours) | set(theirs))
    parts = [f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now" for k in keys if ours.get(k) != theirs.get(k)]
    parts = sorted((p if len(p) < 100 else p[:97] + "...") for p in parts)
    parts.sort(key=len)
    return "; ".join(parts[:4]) + (f"; and {len(parts) - 4} more" if len(parts) > 4 else "")


def _mismatch(out_dir: str, what: str, ours: dict, theirs_json: str | dict) -> ConfigMismatch:
    try:
        theirs = json.loads(theirs_json) if isinstance(theirs_json, str) else theirs_json
        detail = _diff(ours, theirs)
    except (ValueError, TypeError):
        detail = "unreadable configuration"
    return ConfigMismatch(
        f"{what} in {out_dir} comes from a different configuration ({detail}); "
        "use another --out folder, or delete the old run to start over"
    )


class _Progress:
    """Rank 0's bar: images in finished shard files on disk + rank 0's in-progress images."""

    def __init__(self, enabled: bool, n: int, shard_dir: str, sizes: dict[str, int], initial: int):
        self.bar = None
        self.shard_dir, self.sizes, self.inflight, self.last = shard_dir, sizes, 0, 0.0
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=n, initial=initial, unit="img", desc="fastddim generate", dynamic_ncols=True)

    def poll(self, force: bool = False) -> None:
        if self.bar is None or (not force and time.monotonic() - self.last < 0.5):
            return
        self.last = time.monotonic()
        try:
            names = os.listdir(self.shard_dir)
        except OSError:
            return
        done = sum(self.sizes.get(f, 0) for f in names) + self.inflight
        self.bar.update(min(done, self.bar.total) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.poll(force=True)
            self.bar.close()


def generate(
    model: Callable,
    n: int,
    steps: int,
    out_dir: str,
    *,
    eta: float | str = 0.0,
    spacing: str | Sequence[int] | None = "uniform",
    seed: int = 0,
    batch_size: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    model_name: str | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    **plan_kwargs,
) -> dict[str, Any] | None:
    """Make ``n`` samples into ``out_dir`` (see the module docstring), resuming what is there.

    Args:
        model: as for ``fastddim.sample`` (with ``schedule`` and ``sample_shape`` attributes),
            already on ``device``; images are taken to lie in [-1, 1].
        n, steps, eta, spacing, seed, dtype, backend, plan_kwargs: as for ``fastddim.sample``.
        out_dir: the output folder (created if needed).
        batch_size: samples per model call (default: min(shard_size, 256 on CUDA / 64 on CPU));
            capped at the shard size. Not part of the configuration.
        shard_size: images per shard file (part of the configuration).
        device: where to sample (default: the model's device).
        model_name: how the model was named (recorded in the manifest; used in the configuration
            only for a model that is not a ``torch.nn.Module``, whose weights cannot be hashed).
        progress: rank 0's tqdm bar (default: when stderr is a terminal).
        log: where rank 0 reports kept/remade shards (default: stderr).

    Under ``torch.distributed`` (see ``init_distributed``) each rank makes its shards; call it
    on every rank with the same arguments. Returns the manifest dict on rank 0, None elsewhere.
    Raises ``ConfigMismatch`` (a ValueError) when ``out_dir`` holds another configuration.
    """
    rank, world = _world()
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    n = _check_int("n", n, 1)
    shard_size = _check_int("shard_size", shard_size, 1)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"output folder {out_dir!r} is a file")
    schedule = _resolve_schedule(model, None)
    plan = make_plan(schedule, steps, eta=eta, spacing=spacing, **plan_kwargs)
    shape = _resolve_shape(model, None, None)
    if isinstance(model, torch.nn.Module) and device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else None
    dev = torch.device(device) if device is not None else torch.device("cpu")
    backend_name = resolve_backend(backend, dev)
    if batch_size is None:
        batch_size = 256 if dev.type == "cuda" else 64
    batch_size = min(_check_int("batch_size", batch_size, 1), shard_size)

    from . import __version__

    digest = model_digest(model)
    config = {
        "model": digest if digest is not None else f"name:{model_name}",
        "schedule": schedule.to_dict()["alphas_cumprod_sha256"],
        "steps": plan.steps,
        "plan": plan.describe(),
        "spacing": spacing if isinstance(spacing, str) or spacing is None else "explicit",
        "seed": seed,
        "n": n,
        "shard_size": shard_size,
        "shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""),
        "device_type": dev.type,
        "backend": backend_name,
        "image_format": "uint8 NHWC round((x+1)*127.5)",
    }
    chash = config_hash(config)
    config_json = json.dumps(config, sort_keys=True)
    shard_dir = os.path.join(out_dir, SHARD_DIR)
    samples_path = os.path.join(out_dir, SAMPLES)
    manifest_path = os.path.join(out_dir, MANIFEST)
    os.makedirs(shard_dir, exist_ok=True)

    manifest = {
        "model": model_name, "model_sha256": digest, "schedule": schedule.to_dict(), "steps": plan.steps,
        "timesteps": list(plan.timesteps), "eta": plan.eta,
        "spacing": spacing if isinstance(spacing, str) or spacing is None else list(spacing),
        "seed": seed, "n": n, "shard_size": shard_size, "num_shards": math.ceil(n / shard_size),
        "shape": list(shape), "image_layout": "NHWC uint8, round((x + 1) * 127.5) clamped to [0, 255]",
        "dtype": config["dtype"], "device_type": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "backend": backend_name, "torch": torch.__version__, "fastddim": __version__,
        "config_hash": chash, "config": config, "complete": False, "batch_size": batch_size,
    }

    # --- an existing manifest must describe this configuration
    old = None
    if os.path.exists(manifest_path):
        try:
            with open(manifest_path) as f:
                old = json.load(f)
            old_hash = old["config_hash"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{manifest_path} is unreadable ({e}); delete it (and the run) or use another --out") from None
        if old_hash != chash:
            raise _mismatch(out_dir, "the run (manifest.json)", config, old.get("config", {}))
    elif os.path.exists(samples_path):
        raise ValueError(f"{samples_path} exists but {manifest_path} does not: not overwriting a file of unknown "
                         "origin; use another --out folder")
    if old is not None and old.get("complete") and os.path.exists(samples_path):
        if rank == 0:
            log(f"fastddim: {samples_path} is already complete ({n} images); nothing to do")
        return old if rank == 0 else None

    # --- every shard on disk must come from this configuration (checked by every rank, cheaply)
    ranges = shard_ranges(n, shard_size)
    sizes = {shard_name(k): b - a for k, (a, b) in enumerate(ranges)}
    for name in sorted(os.listdir(shard_dir)):
        if SHARD_RE.match(name):
            try:
                meta = _read_shard(os.path.join(shard_dir, name), full=False)
            except ValueError:
                continue  # unreadable: its owner makes it again below
            if meta["config_hash"] != chash:
                raise _mismatch(out_dir, f"shard {name}", config, meta["config"])

    if rank == 0:
        save_json(manifest_path, manifest)

    # --- my shards: keep the good ones, (re)make the others
    mine = [k for k in range(len(ranges)) if k % world == rank]
    mine_names = {shard_name(k) for k in mine}
    for f in os.listdir(shard_dir):  # temporaries left by a killed run; each rank removes its own shards'
        if f.startswith(".") and TMP_MARK in f and f[1:f.index(TMP_MARK)] in mine_names:
            os.remove(os.path.join(shard_dir, f))
    todo = []
    for k in mine:
        path = os.path.join(shard_dir, shard_name(k))
        if not os.path.exists(path):
            todo.append(k)
            continue
        try:
            meta = _read_shard(path, full=True)
            a, b = ranges[k]
            ok = (meta["start"], meta["stop"]) == (a, b) and meta["images"].shape == (b - a, *_hwc(shape)) \
                and meta["images"].dtype == np.uint8
            why = "wrong index range or shape"
        except ValueError as e:
            ok, why = False, str(e)
        if not ok:
            log(f"fastddim: warning: remaking damaged shard {path} ({why})")
            os.remove(path)
            todo.append(k)
    if rank == 0 and len(mine) > len(todo):
        log(f"fastddim: resuming in {out_dir}: rank 0 keeps {len(mine) - len(todo)} of its {len(mine)} shards")
        if old is not None and old.get("batch_size") not in (None, batch_size):
            log(f"fastddim: note: batch size {batch_size} differs from the earlier run's {old.get('batch_size')}; "
                "a model whose output depends on the batch composition (many conv nets, in the last bit) "
                "can make rare +-1 differences against a run made in one go")

    stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
    initial = sum(sizes[f] for f in os.listdir(shard_dir) if f in sizes)
    if progress is None:
        progress = sys.stderr.isatty()
    bar = _Progress(bool(progress) and rank == 0, n, shard_dir, sizes, initial)
    last_step = plan.steps - 1
    made_images = 0
    t0 = time.perf_counter()
    try:
        for count, k in enumerate(todo, 1):
            a, b = ranges[k]
            bar.inflight = 0

            def on_step(j, t, x, x0):
                if j == last_step:
                    bar.inflight += x.shape[0]
                    bar.poll()

            x = sample(
                model, n=b - a, steps=steps, eta=eta, spacing=spacing, seed=seed, batch_size=batch_size,
                device=dev, dtype=dtype, backend=backend_name, first_index=a, progress=False,
                callback=on_step if bar.bar is not None else None, **plan_kwargs,
            )
            save_npz(os.path.join(shard_dir, shard_name(k)), arr_0=to_uint8(x), start=np.int64(a),
                     stop=np.int64(b), config_hash=np.str_(chash), config=np.str_(config_json))
            made_images += b - a
            bar.inflight = 0
            bar.poll(force=True)
            if stop_after and count >= stop_after and count < len(todo):
                raise StoppedForTest(f"stopped after {count} shard(s) ({STOP_ENV}={stop_after})")

        # --- meet the other ranks once (an all-reduce of the image counts doubles as the barrier);
        # rank 0 keeps its bar moving while it waits
        seconds = time.perf_counter() - t0
        if world > 1:
            # images made by all ranks, and the time since the earliest rank started sampling
            total = torch.tensor([made_images], dtype=torch.int64, device=dev)
            began = torch.tensor([time.time() - seconds], dtype=torch.float64, device=dev)
            work = torch.distributed.all_reduce(total, async_op=True)
            while bar.bar is not None and not work.is_completed():
                bar.poll()
                time.sleep(0.2)
            work.wait()
            torch.distributed.all_reduce(began, op=torch.distributed.ReduceOp.MIN)
            made_images = int(total.item())
            seconds = time.time() - float(began.item())
    finally:
        bar.close()
    if rank != 0:
        return None

    # --- rank 0: assemble the n images in index order, one shard in memory at a time
    def chunks():
        for k, (a, b) in enumerate(ranges):
            path = os.path.join(shard_dir, shard_name(k))
            if not os.path.exists(path):
                raise ValueError(f"{path} is missing after all ranks finished (was the folder changed meanwhile?)")
            meta = _read_shard(path, full=True)
            if meta["config_hash"] != chash or (meta["start"], meta["stop"]) != (a, b):
                raise _mismatch(out_dir, f"shard {shard_name(k)}", config, meta["config"])
            yield meta["images"]

    save_npz_stream(samples_path, "arr_0", (n, *_hwc(shape)), np.uint8, chunks())
    manifest.update(
        complete=True, world_size=world, batch_size=batch_size,
        last_run={"images_made": made_images, "seconds": round(seconds, 3),
                  "images_per_s": round(made_images / seconds, 3) if seconds > 0 else None},
    )
    save_json(manifest_path, manifest)
    return manifest


def _hwc(shape: Sequence[int]) -> tuple[int, ...]:
    c, *hw = shape
    return (*hw, c)


def save_json(path: str, obj: dict) -> None:
    from .images import atomic_write

    with atomic_write(path) as f:
        f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
