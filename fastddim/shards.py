"""The bookkeeping of a ``generate`` run folder: shard names and ranges, the configuration hash,
the manifest, reading and verifying shards, assembling ``samples.npz``, and progress polling.

    DIR/shards/shard-00000.npz   arr_0 uint8 (len, H, W, C), start, stop, config_hash, config (JSON)
    DIR/samples.npz              arr_0 uint8 (n, H, W, C): the n images in index order
    DIR/manifest.json            what made them

Nothing here samples; ``fastddim.generate`` drives the run and calls these.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .images import TMP_MARK, atomic_write, save_npz, save_npz_stream

__all__ = [
    "RunFolder", "ConfigMismatch", "Progress", "shard_name", "shard_ranges", "model_digest", "config_hash",
    "read_shard", "save_json", "DEFAULT_SHARD_SIZE",
]

SHARD_DIR = "shards"
SHARD_RE = re.compile(r"^shard-(\d{5,})\.npz$")
SAMPLES = "samples.npz"
MANIFEST = "manifest.json"
DEFAULT_SHARD_SIZE = 1024


class ConfigMismatch(ValueError):
    """The output folder holds a run with another configuration."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.npz"


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[(start, stop)] of every shard, in order: shard k covers [k*shard_size, min(n, (k+1)*shard_size))."""
    return [(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]


def model_digest(model) -> str | None:
    """sha256 (64 hex digits) of a module's class name and state dict (names, dtypes, shapes,
    bytes); None for a model that is not a ``torch.nn.Module``."""
    if not isinstance(model, torch.nn.Module):
        return None
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def config_hash(config: dict) -> str:
    """sha256 (first 16 hex digits) of the configuration as canonical JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def read_shard(path: str, full: bool) -> dict[str, Any]:
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


def save_json(path: str, obj: dict) -> None:
    with atomic_write(path) as f:
        f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


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


class RunFolder:
    """The files of one run in ``out_dir`` for one configuration (``config``, hashed)."""

    def __init__(self, out_dir: str, config: dict, n: int, shard_size: int, hwc: Sequence[int]):
        self.out_dir, self.config = out_dir, config
        self.hash = config_hash(config)
        self.config_json = json.dumps(config, sort_keys=True)
        self.shard_dir = os.path.join(out_dir, SHARD_DIR)
        self.samples = os.path.join(out_dir, SAMPLES)
        self.manifest = os.path.join(out_dir, MANIFEST)
        self.n, self.hwc = n, tuple(hwc)
        self.ranges = shard_ranges(n, shard_size)
        self.sizes = {shard_name(k): b - a for k, (a, b) in enumerate(self.ranges)}

    def path(self, k: int) -> str:
        return os.path.join(self.shard_dir, shard_name(k))

    def mismatch(self, what: str, theirs: str | dict) -> ConfigMismatch:
        try:
            detail = _diff(self.config, json.loads(theirs) if isinstance(theirs, str) else theirs)
        except (ValueError, TypeError):
            detail = "unreadable configuration"
        return ConfigMismatch(
            f"{what} in {self.out_dir} comes from a different configuration ({detail}); "
            "use another --out folder, or delete the old run to start over"
        )

    def check(self) -> dict | None:
        """The earlier run's manifest (None if there is none); raises when the folder holds
        another configuration (in its manifest or any shard) or a samples file of unknown origin."""
        old = None
        if os.path.exists(self.manifest):
            try:
                with open(self.manifest) as f:
                    old = json.load(f)
                old_hash = old["config_hash"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.manifest} is unreadable ({e}); delete it (and the run) or use another --out") from None
            if old_hash != self.hash:
                raise self.mismatch("the run (manifest.json)", old.get("config", {}))
        elif os.path.exists(self.samples):
            raise ValueError(f"{self.samples} exists but {self.manifest} does not: not overwriting a file of unknown "
                             "origin; use another --out folder")
        os.makedirs(self.shard_dir, exist_ok=True)
        for name in sorted(os.listdir(self.shard_dir)):
            if SHARD_RE.match(name):
                try:
                    meta = read_shard(os.path.join(self.shard_dir, name), full=False)
                except ValueError:
                    continue  # unreadable: its owner makes it again
                if meta["config_hash"] != self.hash:
                    raise self.mismatch(f"shard {name}", meta["config"])
        return old

    def save_manifest(self, manifest: dict) -> None:
        save_json(self.manifest, manifest)

    def complete(self, old: dict | None) -> bool:
        return bool(old is not None and old.get("complete") and os.path.exists(self.samples))

    def todo(self, mine: list[int], log: Callable[[str], None]) -> list[int]:
        """Of the shards ``mine``, those still to make: missing, or damaged (removed, with a
        warning). Also removes temporaries a killed write of one of them left behind."""
        names = {shard_name(k) for k in mine}
        for f in os.listdir(self.shard_dir):
            if f.startswith(".") and TMP_MARK in f and f[1:f.index(TMP_MARK)] in names:
                os.remove(os.path.join(self.shard_dir, f))
        todo = []
        for k in mine:
            path = self.path(k)
            if not os.path.exists(path):
                todo.append(k)
                continue
            why = self._damage(k)
            if why:
                log(f"fastddim: warning: remaking damaged shard {path} ({why})")
                os.remove(path)
                todo.append(k)
        return todo

    def _damage(self, k: int) -> str | None:
        try:
            meta = read_shard(self.path(k), full=True)
        except ValueError as e:
            return str(e)
        a, b = self.ranges[k]
        ok = (meta["start"], meta["stop"]) == (a, b) and meta["images"].shape == (b - a, *self.hwc) \
            and meta["images"].dtype == np.uint8
        return None if ok else "wrong index range or shape"

    def write_shard(self, k: int, images: np.ndarray) -> None:
        a, b = self.ranges[k]
        save_npz(self.path(k), arr_0=images, start=np.int64(a), stop=np.int64(b), config_hash=np.str_(self.hash),
                 config=np.str_(self.config_json))

    def images_on_disk(self) -> int:
        return sum(self.sizes[f] for f in os.listdir(self.shard_dir) if f in self.sizes)

    def assemble(self) -> None:
        """Write samples.npz: every shard in index order, one in memory at a time."""
        save_npz_stream(self.samples, "arr_0", (self.n, *self.hwc), np.uint8, self._chunks())

    def _chunks(self) -> Iterator[np.ndarray]:
        for k, (a, b) in enumerate(self.ranges):
            path = self.path(k)
            if not os.path.exists(path):
                raise ValueError(f"{path} is missing after all ranks finished (was the folder changed meanwhile?)")
            meta = read_shard(path, full=True)
            if meta["config_hash"] != self.hash or (meta["start"], meta["stop"]) != (a, b):
                raise self.mismatch(f"shard {shard_name(k)}", meta["config"])
            yield meta["images"]


class Progress:
    """Rank 0's bar: images in finished shard files on disk + rank 0's in-progress images."""

    def __init__(self, enabled: bool, folder: RunFolder):
        self.bar = None
        self.shard_dir, self.sizes, self.inflight, self.last = folder.shard_dir, folder.sizes, 0, 0.0
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=folder.n, initial=folder.images_on_disk(), unit="img", desc="fastddim generate",
                            dynamic_ncols=True)

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
