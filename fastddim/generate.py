"""Generate many samples (e.g. 50,000 for an FID) in one process or under ``torchrun``, resumably.

    fastddim generate --n 50000 --steps 10 --out run/                       # one process
    torchrun --nproc_per_node=8 -m fastddim generate -n 50000 --steps 10 --out run/

How the work is cut: the n global sample indices are split into fixed shards,
shard k = [k * shard_size, min(n, (k + 1) * shard_size)); the shard size does not depend on the
number of processes. Rank r of a world of size W makes the shards k with k % W == r, calling
``fastddim.sample(..., first_index=start)``, so sample i is a pure function of (seed, i): the
result is byte-identical for any world size, batch size or interruption pattern on one device
type (given a model whose output for one row does not depend on the other rows of its batch).
On the CPU each process runs torch with a fixed number of intra-op threads (``threads``,
default 1): torch's CPU kernels can round differently with the thread count, so a fixed count
keeps the bytes the same whether one process or many make them.
Ranks do not talk while sampling; they meet once at a barrier at the end, then rank 0 assembles.

On disk (``DIR`` = ``out``), kept by ``fastddim.shards``:
    DIR/shards/shard-00000.npz   arr_0 uint8 (len, H, W, C), start, stop, config_hash, config (JSON)
    DIR/samples.npz              arr_0 uint8 (n, H, W, C): the n images in index order
    DIR/manifest.json            what made them (model, schedule, plan, seed, n, versions, device)
Every file is written to a hidden temporary name in its folder, fsynced, then renamed: a
shard is either complete or absent, never partial.

Resuming: run the same command again. Existing shards are verified (loadable, right index
range, right config hash) and kept; missing ones are made. A folder holding a run with a
different configuration (model weights, schedule, steps/timesteps, eta, seed, n, shard size,
shape, dtype, device type, backend, CPU threads, class labels) is refused; batch size and world
size are not part of the configuration. Shards that cannot be loaded (damaged disk) are made
again, with a warning.

Class labels (conditional models): ``class_label=K`` gives every image label K; ``classes=C``
gives image i the label i % C (so any n spreads evenly over the classes, and the label, like
the noise, depends only on i). The model is called as ``model(x, t, class_labels=labels)``.
Classifier-free guidance (``uncond_kwargs``, ``guidance_*``, as for ``fastddim.sample``) is part
of the configuration when any step is guided (``guidance_split``, like the batch size, is not:
it changes how the model is called, not what the step computes).

Progress (rank 0 only): a tqdm bar of images done, images/s and ETA. It counts the images of the
shards present in ``DIR/shards`` (polled at most twice a second, so it sees every rank's
finished shards) plus rank 0's own in-progress shard; while rank 0 waits at the final barrier it
keeps polling the folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
import os
import sys
import time
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import torch

from .checks import check_device, check_int
from .engine import Run, prepare
from .images import to_uint8
from .paths import output_folder
from .sampler import sample
from .shards import (  # noqa: F401  (ConfigMismatch, config_hash, shard_ranges: re-exported)
    DEFAULT_SHARD_SIZE, ConfigMismatch, Progress, RunFolder, config_hash, model_digest, shard_ranges,
)

__all__ = ["generate", "init_distributed", "class_labels", "shard_ranges", "config_hash", "model_digest",
           "ConfigMismatch", "DEFAULT_SHARD_SIZE"]

# Test hook: stop (exit status 3 from the CLI) after writing this many shards in this process.
STOP_ENV = "FASTDDIM_GENERATE_STOP_AFTER_SHARDS"


class StoppedForTest(RuntimeError):
    """Raised after ``FASTDDIM_GENERATE_STOP_AFTER_SHARDS`` shards (simulates an interruption)."""


def init_distributed(device: str | torch.device | None = None) -> tuple[int, int, torch.device]:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (as ``torchrun`` sets them) and, when WORLD_SIZE > 1,
    join the process group: NCCL on CUDA, gloo on the CPU. On CUDA each process takes the GPU
    LOCAL_RANK (when ``device`` is ``"cuda"`` without an index).

    Returns (rank, world_size, device). ``device`` None means CUDA if available, else the CPU.
    """
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = check_device("device", device)
    if dev.type == "cuda":
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


def _label_spec(class_label: int | None, classes: int | None) -> dict | None:
    """{"class_label": K}, {"classes": C} or None (no labels), checked."""
    if class_label is not None and classes is not None:
        raise ValueError("give class_label (one label for all) or classes (spread over C classes), not both")
    if class_label is not None:
        return {"class_label": check_int("class_label", class_label, 0)}
    if classes is not None:
        return {"classes": check_int("classes", classes, 1)}
    return None


def class_labels(start: int, stop: int, *, class_label: int | None = None, classes: int | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor | None:
    """The labels of images start .. stop - 1: (stop - start,) int64, ``class_label`` for every
    image or ``i % classes`` for image i; None when neither is given."""
    spec = _label_spec(class_label, classes)
    if spec is None:
        return None
    if "class_label" in spec:
        return torch.full((stop - start,), spec["class_label"], dtype=torch.int64, device=device)
    return (torch.arange(start, stop, dtype=torch.int64) % spec["classes"]).to(device)


def sample_range(model: Callable, start: int, stop: int, batch_size: int | None = None, *,
                 class_label: int | None = None, classes: int | None = None, x_T: torch.Tensor | None = None,
                 **sample_kwargs) -> torch.Tensor:
    """``fastddim.sample`` of images start .. stop - 1 (x_T: their initial noise, optional), with
    their ``class_labels`` (sliced per batch by the sampler) when labels are asked for; returns
    (stop - start, *shape)."""
    labels = class_labels(start, stop, class_label=class_label, classes=classes, device=sample_kwargs.get("device"))
    return sample(model, n=stop - start, first_index=start, batch_size=batch_size, x_T=x_T,
                  model_kwargs=None if labels is None else {"class_labels": labels}, **sample_kwargs)


@contextlib.contextmanager
def _threads(k: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to k (None: unchanged) for the block."""
    before = torch.get_num_threads()
    if k is not None:
        torch.set_num_threads(k)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_device(model, device) -> torch.device:
    if device is not None:
        return check_device("device", device)
    p = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


def _digest(v) -> Any:
    """A JSON-able stand-in for one kwarg value: a tensor's dtype, shape and sha256 of its bytes."""
    if not isinstance(v, torch.Tensor):
        return repr(v)
    t = v.detach().to("cpu").contiguous()
    return f"{str(t.dtype).replace('torch.', '')} {list(t.shape)} sha256:" \
           f"{hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]}"


def _guidance_config(run: Run, scale) -> dict:
    """The configuration keys of a guided run, named as ``generate``'s keywords so that a refused
    resume names the option ({} unguided: the hash of an unguided job is what it was before
    guidance existed). ``scale`` as given (normalised to floats; the interval maps it per step)."""
    g = run.guidance
    if g is None:
        return {}
    return {"guidance": g.method, "guidance_rescale": g.rescale,
            "guidance_scale": float(scale) if isinstance(scale, numbers.Real) else [float(w) for w in scale],
            "guidance_interval": None if g.interval is None else list(g.interval),
            "uncond_kwargs": {k: _digest(v) for k, v in sorted(g.uncond_kwargs.items())}}


def _describe(model, run: Run, *, spacing, shard_size: int, model_name: str | None, threads: int | None,
              labels: dict | None, guidance: dict) -> tuple[dict, dict]:
    """(config, manifest): what a run's bytes depend on (hashed; checked on resume), and what it records."""
    from . import __version__

    plan, schedule, shape, dev = run.plan, run.schedule, run.shape, run.device
    seed, n, dtype, backend = run.seed, run.n, run.dtype, run.backend
    digest = model_digest(model)
    config = {
        "model": digest if digest is not None else f"name:{model_name}",
        "schedule": schedule.to_dict()["alphas_cumprod_sha256"], "steps": plan.steps, "plan": plan.describe(),
        "spacing": spacing if isinstance(spacing, str) or spacing is None else "explicit",
        "seed": seed, "n": n, "shard_size": shard_size, "shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""), "device_type": dev.type, "backend": backend,
        "image_format": "uint8 NHWC round((x+1)*127.5)", "threads": threads, "class_labels": labels,
        # channels_last reorders the model's fp32 sums: shards made in another layout may differ in the last bit
        "memory_format": str(run.memory_format).replace("torch.", ""), **guidance,
    }
    manifest = {
        "model": model_name, "model_sha256": digest, "schedule": schedule.to_dict(), "steps": plan.steps,
        "timesteps": list(plan.timesteps), "eta": plan.eta, "solver": plan.solver,
        "spacing": spacing if isinstance(spacing, str) or spacing is None else list(spacing),
        "seed": seed, "n": n, "shard_size": shard_size, "num_shards": math.ceil(n / shard_size),
        "shape": list(shape), "image_layout": "NHWC uint8, round((x + 1) * 127.5) clamped to [0, 255]",
        "dtype": config["dtype"], "device_type": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "backend": backend, "memory_format": config["memory_format"], "threads": threads,
        "torch": torch.__version__, "fastddim": __version__,
        "class_labels": None if labels is None else {
            **labels, "rule": f"every image has label {labels['class_label']}" if "class_label" in labels
            else f"image i has label i % {labels['classes']}"},
        "guidance": None if not guidance else {**guidance, "guidance_split": run.guidance.split,
                                               "guided_steps": run.guidance.uncond_steps},
        "config_hash": None, "config": config, "complete": False,
    }
    return config, manifest


def _my_shards(folder: RunFolder, old: dict | None, rank: int, world: int, batch_size: int,
               log: Callable[[str], None]) -> list[int]:
    """The shards this rank still has to make (rank r of W owns the shards k with k % W == r)."""
    mine = [k for k in range(len(folder.ranges)) if k % world == rank]
    todo = folder.todo(mine, log)
    if not mine:
        log(f"fastddim: rank {rank} of {world}: nothing to do ({len(folder.ranges)} shard(s) for {world} processes)")
    if rank == 0 and len(mine) > len(todo):
        log(f"fastddim: resuming in {folder.out_dir}: rank 0 keeps {len(mine) - len(todo)} of its {len(mine)} shards")
        if old is not None and old.get("batch_size") not in (None, batch_size):
            log(f"fastddim: note: batch size {batch_size} differs from the earlier run's {old.get('batch_size')}; "
                "a model whose output depends on the batch composition (many conv nets, in the last bit) "
                "can make rare +-1 differences against a run made in one go")
    return todo


def _make_shards(folder: RunFolder, todo: list[int], bar: Progress, run: Run) -> int:
    """Make the shards ``todo`` from the job's prepared run; returns the number of images made."""
    stop_after = int(os.environ.get(STOP_ENV, "0") or 0)

    def on_batch(b: int) -> None:
        bar.inflight += b
        bar.poll()

    made = 0
    for count, k in enumerate(todo, 1):
        a, b = folder.ranges[k]
        bar.inflight = 0
        x = run.sample(b - a, first_index=a, progress=False, on_batch=on_batch if bar.bar is not None else None)
        folder.write_shard(k, to_uint8(x))
        made += b - a
        bar.inflight = 0
        bar.poll(force=True)
        if stop_after and count >= stop_after and count < len(todo):
            raise StoppedForTest(f"stopped after {count} shard(s) ({STOP_ENV}={stop_after})")
    return made


def _meet(world: int, made: int, seconds: float, bar: Progress, dev: torch.device) -> tuple[int, float]:
    """The barrier at the end: (images made by all ranks, seconds since the earliest rank began).
    An all-reduce of the image counts doubles as the barrier; rank 0's bar keeps moving meanwhile."""
    if world == 1:
        return made, seconds
    total = torch.tensor([made], dtype=torch.int64, device=dev)
    began = torch.tensor([time.time() - seconds], dtype=torch.float64, device=dev)
    work = torch.distributed.all_reduce(total, async_op=True)
    while bar.bar is not None and not work.is_completed():
        bar.poll()
        time.sleep(0.2)
    work.wait()
    torch.distributed.all_reduce(began, op=torch.distributed.ReduceOp.MIN)
    return int(total.item()), time.time() - float(began.item())


def generate(
    model: Callable, n: int, steps: int, out_dir: str, *, eta: float | str = 0.0, solver: str = "ddim",
    spacing: str | Sequence[int] | None = None, seed: int = 0, batch_size: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    backend: str = "auto", model_name: str | None = None, progress: bool | None = None,
    log: Callable[[str], None] | None = None, threads: int = 1, class_label: int | None = None,
    classes: int | None = None, memory_format: Any = "auto", uncond_kwargs: dict | None = None,
    guidance_scale: float | Sequence[float] = 1.0, guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None, guidance: str = "cfg", guidance_split: bool = False,
    **plan_kwargs,
) -> dict[str, Any] | None:
    """Make ``n`` samples into ``out_dir`` (see the module docstring), resuming what is there.

    Args:
        model: as for ``fastddim.sample`` (with ``schedule`` and ``sample_shape`` attributes),
            already on ``device``; images are taken to lie in [-1, 1].
        n, steps, eta, seed, dtype, backend, plan_kwargs: as for ``fastddim.sample``.
        solver: ``"ddim"`` or ``"dpm++2m"``, as for ``fastddim.sample`` (part of the configuration,
            with the plan it makes).
        spacing: as for ``fastddim.sample``; None is the solver's default (``"uniform"`` for DDIM,
            recorded as such; diffusers' ``"linspace"`` for DPM-Solver++).
        out_dir: the output folder (created with its parents if needed).
        batch_size: samples per model call (default: ``fastddim.sample``'s, flat in n); capped at
            the shard size. Not part of the configuration.
        shard_size: images per shard file (part of the configuration).
        device: where to sample (default: the model's device).
        model_name: how the model was named (recorded in the manifest; used in the configuration
            only for a model that is not a ``torch.nn.Module``, whose weights cannot be hashed).
        progress: rank 0's tqdm bar (default: when stderr is a terminal).
        log: where rank 0 reports kept/remade shards (default: stderr).
        threads: torch intra-op threads in this process while sampling on the CPU (default 1;
            restored afterwards). Part of the configuration: with the same value in every
            process the bytes do not depend on the number of processes.
        class_label, classes: labels for a conditional model (see the module docstring).
        memory_format: ``torch.channels_last`` or ``torch.contiguous_format``; ``"auto"`` (default)
            is the model's layout as given: a job's bytes must not depend on a timing, and the
            layout probe ``fastddim.sample`` runs could decide differently in another process or
            on resume (channels_last reorders fp32 sums). Part of the configuration.
        uncond_kwargs, guidance_scale, guidance_rescale, guidance_interval, guidance, guidance_split:
            classifier-free guidance, as for ``fastddim.sample`` (the conditional half's kwargs are
            the class labels); e.g. ``uncond_kwargs={"class_labels": torch.tensor([model.null_class_label])}``.
            Part of the configuration when a step is guided, except ``guidance_split``.

    Under ``torch.distributed`` (see ``init_distributed``) each rank makes its shards; call it
    on every rank with the same arguments. Returns the manifest dict on rank 0 (plus
    ``"this_call": {"images_made", "seconds"}``, not written to disk, with ``"already_complete":
    True`` when the folder was complete and nothing was written), None elsewhere.
    Raises ``ConfigMismatch`` (a ValueError) when ``out_dir`` holds another configuration.
    """
    rank, world = _world()
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    n, shard_size = check_int("n", n, 1), check_int("shard_size", shard_size, 1)
    threads = check_int("threads", threads, 1)
    out_dir = output_folder(out_dir, "out_dir")
    labels = _label_spec(class_label, classes)
    dev = _run_device(model, device)
    if spacing is None and solver == "ddim":
        spacing = "uniform"  # what None runs, named as runs made before solver= existed record it
    # One prepared run for the whole job (not one per shard): checks, plan, backend, the model as
    # called and the step's static buffers, made once; the labels of all n images, sliced per batch.
    job_labels = class_labels(0, n, class_label=class_label, classes=classes, device=dev)
    run = prepare(model, n, steps, eta=eta, spacing=spacing, seed=seed, batch_size=batch_size, device=dev,
                  dtype=dtype, backend=backend, model_kwargs=None if job_labels is None else {"class_labels": job_labels},
                  memory_format=torch.contiguous_format if memory_format == "auto" else memory_format, solver=solver,
                  uncond_kwargs=uncond_kwargs, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                  guidance_interval=guidance_interval, guidance=guidance, guidance_split=guidance_split, **plan_kwargs)
    run.batch_size = batch_size = min(run.batch_size, shard_size)  # a batch never spans two shards
    threads = threads if dev.type == "cpu" else None
    config, manifest = _describe(model, run, spacing=spacing, shard_size=shard_size, model_name=model_name,
                                 threads=threads, labels=labels, guidance=_guidance_config(run, guidance_scale))
    folder = RunFolder(out_dir, config, n, shard_size, (*manifest["shape"][1:], manifest["shape"][0]))
    manifest.update(config_hash=folder.hash, batch_size=batch_size)
    old = folder.check()
    if folder.complete(old):
        if rank == 0:
            log(f"fastddim: {folder.samples} is already complete ({n} images); nothing to do")
        return {**old, "this_call": {"images_made": 0, "seconds": 0.0, "already_complete": True}} if rank == 0 else None
    if rank == 0:
        folder.save_manifest(manifest)

    todo = _my_shards(folder, old, rank, world, batch_size, log)
    bar = Progress(bool(sys.stderr.isatty() if progress is None else progress) and rank == 0, folder)
    t0 = time.perf_counter()
    try:
        with _threads(threads):
            made = _make_shards(folder, todo, bar, run)
        made, seconds = _meet(world, made, time.perf_counter() - t0, bar, dev)
    finally:
        bar.close()
    if rank != 0:
        return None
    folder.assemble()
    this_call = {"images_made": made, "seconds": round(seconds, 3),
                 "images_per_s": round(made / seconds, 3) if seconds > 0 else None}
    manifest.update(complete=True, world_size=world, last_run=this_call)
    folder.save_manifest(manifest)
    return {**manifest, "this_call": this_call}
