"""Train an eps-prediction U-Net with the DDPM objective (Ho et al. 2020, Algorithm 1).

    x0 ~ data, t ~ U{0..T-1}, eps ~ N(0, I),  x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
    loss = mean((model(x_t, t) - eps)^2)

A class-conditional model (``num_classes > 0``, e.g. the ``"mnist-cond"`` preset) is trained on
the labels too, for classifier-free guidance (Ho & Salimans 2022): each label is replaced by the
null label with probability ``label_dropout``, so one network learns both the conditional and the
unconditional prediction, ``model(x_t, t, class_labels=y)``.

AdamW with linear warm-up (then a constant rate, or a cosine decay over the run), gradient-norm
clipping, and an EMA of the weights (what sampling uses). Options that trade quality for CPU time
(issue 20's levers): ``loss_weighting="min-snr"`` (Hang et al. 2023, "Efficient Diffusion Training
via Min-SNR Weighting Strategy": each t's eps loss weighted by min(SNR_t, gamma) / SNR_t), and
``autocast="bf16"`` (the forward and backward in bfloat16 where torch's CPU autocast allows it;
the weights, the optimizer and the loss stay float32). Checkpoints are safetensors written atomically; resuming restores the weights, the EMA,
the optimizer state and every RNG, so N steps + resume + M steps gives the same weights as
N + M steps in one run (on the same device and thread count). An existing checkpoint is never
replaced unless asked (``resume`` continues it, ``overwrite`` starts over); Ctrl-C raises
``TrainingInterrupted``, which says which step the checkpoint holds.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checks import check_device, check_float, check_int, check_seed
from .images import atomic_write
from .models.unet import UNet, UNetConfig
from .paths import output_file
from .pretrained import FORMAT, load_checkpoint, schedule_to_json

__all__ = ["train", "save_checkpoint", "export_weights", "TrainingInterrupted"]

_SCHEDULES = ("linear", "scaled_linear", "cosine")
LR_SCHEDULES = ("constant", "cosine")
LOSS_WEIGHTINGS = ("uniform", "min-snr")
AUTOCASTS = (None, "bf16")


def _resolve_config(model: str | UNetConfig | dict) -> UNetConfig:
    if isinstance(model, UNetConfig):
        return model
    if isinstance(model, dict):
        return UNetConfig.from_dict(model)
    return UNetConfig.preset(model)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``train``: ``step`` steps were done; the checkpoint at ``path`` holds step
    ``saved_step`` (None: nothing was written), from which ``resume=True`` continues."""

    def __init__(self, step: int, saved_step: int | None, path: str):
        super().__init__(f"interrupted at step {step}; {path} holds step {saved_step}")
        self.step, self.saved_step, self.path = step, saved_step, path


def _check_data(data: str | torch.Tensor, cfg: UNetConfig) -> None:
    """A named data set must exist and fit the model (checked before loading it)."""
    if not isinstance(data, str):
        return
    if data != "mnist":
        raise ValueError(f"unknown data set {data!r}; pass 'mnist' or an (N, C, H, W) tensor in [-1, 1]")
    if (cfg.in_channels, cfg.resolution) != (1, 32):
        raise ValueError(
            f"the model takes {cfg.in_channels}x{cfg.resolution}x{cfg.resolution} images but the training data "
            "(MNIST) is 1x32x32: use the 'mnist' preset or a config with in_channels 1 and resolution 32 "
            "(from Python, train(data=...) also takes an (N, C, H, W) tensor)"
        )


def _check_label_args(data: str | torch.Tensor, labels, label_dropout, cfg: UNetConfig) -> float:
    """The label arguments fit the model (before any data is loaded); returns the label dropout:
    None means 0.1 for a conditional model (the usual classifier-free rate), 0 otherwise."""
    if not cfg.num_classes:
        if label_dropout:
            raise ValueError(f"label_dropout={label_dropout!r} needs a class-conditional model (num_classes > 0, "
                             "e.g. the 'mnist-cond' preset); this one is unconditional")
        if labels is not None:
            raise ValueError("labels: the model is unconditional (num_classes = 0); leave labels out")
        return 0.0
    if isinstance(data, str) and labels is not None:
        raise ValueError(f"labels: data={data!r} brings its own labels; pass labels only with a data tensor")
    if not isinstance(data, str) and labels is None:
        raise ValueError(f"labels: a class-conditional model (num_classes = {cfg.num_classes}) needs labels (N,) "
                         "for the data tensor")
    return 0.1 if label_dropout is None else check_float("label_dropout", label_dropout, 0, 1)


def _load_data(data: str | torch.Tensor, labels, cfg: UNetConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images (N, C, H, W) float32, labels (N,) int64 or None for an unconditional model)."""
    if isinstance(data, str):
        _check_data(data, cfg)
        from .data import mnist

        data, labels = mnist("train")
    x = torch.as_tensor(data, dtype=torch.float32)
    want = (cfg.in_channels, cfg.resolution, cfg.resolution)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise ValueError(f"data must have shape (N, {', '.join(map(str, want))}) for this model, got {tuple(x.shape)}")
    return x, (_check_labels(labels, x.shape[0], cfg.num_classes) if cfg.num_classes else None)


def _check_labels(labels, n: int, num_classes: int) -> torch.Tensor:
    y = torch.as_tensor(labels)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"labels must be integers, got {y.dtype}")
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), one per image, got {tuple(y.shape)}")
    if n and not (0 <= int(y.min()) and int(y.max()) < num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) for a model with {num_classes} classes, "
                         f"got [{int(y.min())}, {int(y.max())}]")
    return y.to(torch.int64)


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: UNet,
    ema: UNet,
    step: int,
    schedule_kind: str,
    optimizer: torch.optim.Optimizer | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    train_args: dict | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write a checkpoint atomically (``fastddim.images.atomic_write``: a file like every other
    output, missing parent folders created).

    With ``optimizer=None`` only the EMA weights are written (a weights file for
    ``pretrained``); ``dtype`` optionally casts them (e.g. ``torch.float16``).
    """
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for k, v in ema.state_dict().items():
        tensors[f"ema.{k}"] = v.detach().to("cpu", dtype or v.dtype).contiguous().clone()
    if optimizer is not None:
        for k, v in model.state_dict().items():
            tensors[f"model.{k}"] = v.detach().cpu().contiguous().clone()
        for i, state in optimizer.state_dict()["state"].items():
            for key, v in state.items():
                # AdamW keeps 'step' as a 0-dim tensor; store as (1,) for readers that dislike scalars.
                v = torch.as_tensor(v).detach().cpu()
                tensors[f"optim.{i}.{key}"] = (v.reshape(1) if v.ndim == 0 else v).contiguous().clone()
    for name, v in (rng or {}).items():
        tensors[f"rng.{name}"] = v.cpu().clone()
    meta = {
        "format": FORMAT,
        "config": json.dumps(model.config.to_dict()),
        "step": str(int(step)),
        "schedule": schedule_to_json(schedule_kind, model.schedule),
    }
    if train_args is not None:
        meta["train"] = json.dumps(train_args)
    data = save(tensors, metadata=meta)
    with atomic_write(output_file(path, "path")) as f:
        f.write(data)


def export_weights(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write the EMA weights of training checkpoint ``src`` as a weights-only file ``dst``
    (what ``fastddim/weights/`` holds): same format, no raw weights, optimizer or RNG state."""
    ck = load_checkpoint(src)
    net = UNet(ck.config, schedule=ck.schedule)
    net.load_state_dict(ck.ema)
    kind = json.loads(ck.schedule_json)["kind"]
    save_checkpoint(dst, model=net, ema=net, step=ck.step, schedule_kind=kind, train_args=ck.train, dtype=dtype)


def _lr_at(step: int, lr: float, warmup: int, steps: int = 0, lr_schedule: str = "constant",
           min_lr: float = 0.0) -> float:
    """The learning rate of ``step``: linear warm-up over ``warmup`` steps, then ``lr``
    ("constant") or a half cosine from ``lr`` down to ``min_lr`` at step ``steps`` ("cosine")."""
    if warmup > 0 and step < warmup:
        return lr * min(1.0, (step + 1) / warmup)
    if lr_schedule == "cosine" and steps > warmup:
        progress = min(1.0, (step - warmup) / (steps - warmup))
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr


def loss_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, weighting: str, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weights (B,) of the eps loss at timesteps t (B,): ones ("uniform", the DDPM
    objective) or min(SNR_t, gamma) / SNR_t ("min-snr", Hang et al. 2023, eps-prediction form:
    the easy low-noise steps count less, so the gradient is not spent on them)."""
    if weighting == "uniform":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    a = alphas_cumprod[t].float()
    snr = a / (1 - a)
    return torch.clamp(snr, max=gamma) / snr


def _ema_decay_at(step: int, decay: float) -> float:
    # Short runs: a fixed 0.999 would leave the EMA dominated by the random init for the
    # first few thousand steps, so the decay ramps up as (1 + step) / (10 + step).
    return min(decay, (1 + step) / (10 + step))


def train(
    *, model: str | UNetConfig | dict = "mnist", data: str | torch.Tensor = "mnist", schedule: str = "linear",
    steps: int = 4000, batch_size: int = 64, lr: float = 1e-3, warmup: int = 100, weight_decay: float = 0.0,
    ema_decay: float = 0.999, grad_clip: float = 1.0, seed: int = 0, out: str | os.PathLike = "checkpoint.safetensors",
    save_every: int = 500, resume: bool = False, overwrite: bool = False, log_file: str | os.PathLike | None = None,
    log_every: int = 50, device: str | torch.device | None = None, threads: int | None = None, progress: bool = True,
    labels: torch.Tensor | None = None, label_dropout: float | None = None, lr_schedule: str = "constant",
    min_lr: float = 0.0, loss_weighting: str = "uniform", snr_gamma: float = 5.0, autocast: str | None = None,
) -> dict:
    """Train a U-Net on the DDPM noise-prediction loss and write a safetensors checkpoint.

    Args:
        model: U-Net preset name (``"mnist"``, ``"mnist-cond"``, ``"cifar10"``), ``UNetConfig`` or its dict.
        data: ``"mnist"`` (the 4,000 training digits of :func:`fastddim.data.mnist`, 1x32x32, with
            their labels) or a float tensor (N, C, H, W) scaled to [-1, 1] matching the model.
        schedule: ``"linear"`` (DDPM, T=1000), ``"scaled_linear"`` or ``"cosine"``.
        steps: total optimizer steps; with ``resume`` training continues up to this number.
        batch_size: images per step, drawn uniformly with replacement.
        lr, warmup, weight_decay: AdamW learning rate, linear warm-up steps, decoupled decay.
        ema_decay: EMA decay of the sampling weights (ramped up early, see ``_ema_decay_at``).
        grad_clip: max global gradient norm (0 disables clipping).
        seed: seeds the initialisation, the batches, t, the noise and dropout.
        out: checkpoint path, rewritten every ``save_every`` steps and at the end (missing
            folders are created).
        resume: continue from ``out`` if it exists (same model config required).
        overwrite: replace an existing ``out`` with a fresh run; without it (or ``resume``) an
            existing ``out`` is refused, before anything is loaded.
        log_file: append one line per ``log_every`` steps: step, loss, images/s, elapsed.
        device: ``"cpu"``, ``"cuda"``... (default: CUDA when available).
        threads: ``torch.set_num_threads`` for CPU training (default: torch's choice).
        progress: show a tqdm bar with the loss and images/s.
        labels: (N,) integer labels in [0, num_classes) of a data tensor, for a class-conditional
            model only (``"mnist"`` brings its own).
        label_dropout: probability that a training label is replaced by the null label
            (classifier-free training), drawn from the batch generator so that ``resume`` stays
            exact; class-conditional models only. Default: 0.1 for those, 0 otherwise.
        lr_schedule: ``"constant"`` (default) or ``"cosine"``: after the warm-up, a half cosine
            from ``lr`` to ``min_lr`` at step ``steps`` (so the schedule depends on ``steps``: a
            resume continues it bit for bit only with the same ``steps``; a different one is refused).
        loss_weighting: ``"uniform"`` (default, DDPM's) or ``"min-snr"`` with ``snr_gamma``
            (:func:`loss_weights`).
        autocast: None (float32) or ``"bf16"``: forward and backward under CPU/CUDA autocast in
            bfloat16 (fast on CPUs with AVX-512 BF16 / AMX); weights, optimizer and loss float32.

    Returns:
        A summary: ``{"step", "loss" (mean over the last log window), "images_per_s",
        "seconds", "path", "already_done"}``. When ``resume`` finds ``out`` already at ``steps``
        (or beyond), nothing is trained or written: ``already_done`` is True and ``loss`` and
        ``images_per_s`` are None.

    Raises:
        TrainingInterrupted: on Ctrl-C (a KeyboardInterrupt saying what the checkpoint holds).
    """
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
    steps, warmup = check_int("steps", steps, 0), check_int("warmup", warmup, 0)
    batch_size, log_every = check_int("batch_size", batch_size, 1), check_int("log_every", log_every, 1)
    save_every, seed = check_int("save_every", save_every, 1), check_seed(seed)
    lr, weight_decay = check_float("lr", lr, 0), check_float("weight_decay", weight_decay, 0)
    ema_decay, grad_clip = check_float("ema_decay", ema_decay, 0, 1), check_float("grad_clip", grad_clip, 0)
    _check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
    _check_choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
    _check_choice("autocast", autocast, AUTOCASTS)
    min_lr, snr_gamma = check_float("min_lr", min_lr, 0, lr), check_float("snr_gamma", snr_gamma, 0)
    if snr_gamma == 0:
        raise ValueError("snr_gamma must be > 0")
    out = Path(output_file(out, "out"))
    if log_file is not None:
        log_file = output_file(log_file, "log_file")
    if out.exists() and not resume and not overwrite:
        raise ValueError(f"{out} exists: pass resume=True to continue training it, or overwrite=True to replace it")
    cfg = _resolve_config(model)
    _check_data(data, cfg)
    label_dropout = _check_label_args(data, labels, label_dropout, cfg)
    ck = _resume_checkpoint(out, cfg) if resume and out.exists() else None
    levers = dict(lr_schedule=lr_schedule, min_lr=min_lr, loss_weighting=loss_weighting, snr_gamma=snr_gamma,
                  autocast=autocast)
    if lr_schedule == "cosine":
        levers["steps"] = steps  # the cosine is over the whole run: part of what a resume must match
    if ck is not None:
        _check_resume_levers(out, ck.train or {}, levers)
    if ck is not None and ck.step >= steps:
        return {"step": ck.step, "loss": None, "images_per_s": None, "seconds": 0.0, "path": str(out),
                "already_done": True}
    device = check_device("device", device)
    if threads:
        torch.set_num_threads(int(threads))
    x_data, y_data = _load_data(data, labels, cfg)
    from .schedule import Schedule

    sched = getattr(Schedule, schedule)()
    train_args = dict(
        model=cfg.to_dict(), data=data if isinstance(data, str) else f"tensor{tuple(x_data.shape)}",
        schedule=schedule, batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=weight_decay,
        ema_decay=ema_decay, grad_clip=grad_clip, seed=seed, label_dropout=label_dropout,
        **{k: v for k, v in levers.items() if v != _LEVER_DEFAULTS.get(k)},  # old runs' args unchanged
    )
    run = _Run.create(cfg, sched, x_data, device=device, lr=lr, weight_decay=weight_decay, seed=seed, out=out,
                      schedule_kind=schedule, train_args=train_args, y_data=y_data, label_dropout=label_dropout,
                      lr_schedule=lr_schedule, min_lr=min_lr, total_steps=steps, loss_weighting=loss_weighting,
                      snr_gamma=snr_gamma, autocast=autocast)
    if ck is not None:
        run.restore(ck)
    with open(log_file, "a") if log_file else contextlib.nullcontext() as log:
        if log and ck is None:
            log.write(f"# fastddim train {json.dumps(train_args)}\n# step loss images_per_s elapsed_s\n")
        return run.loop(ck.step if ck is not None else 0, steps, batch_size=batch_size, lr=lr, warmup=warmup,
                        grad_clip=grad_clip, ema_decay=ema_decay, save_every=save_every, log_every=log_every,
                        log=log, progress=progress)


_LEVER_DEFAULTS = dict(lr_schedule="constant", min_lr=0.0, loss_weighting="uniform", snr_gamma=5.0, autocast=None)


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_resume_levers(out: Path, saved: dict, levers: dict) -> None:
    """A resume trains on as the checkpoint was trained: the same schedule, weighting and autocast."""
    for k, v in levers.items():
        was = saved.get(k, _LEVER_DEFAULTS.get(k))
        if was != v:
            raise ValueError(f"{out} was trained with {k}={was!r}; resuming with {k}={v!r} would not continue the "
                             f"same run (pass {k}={was!r}, or overwrite)")


def _resume_checkpoint(out: Path, cfg: UNetConfig):
    ck = load_checkpoint(out)
    if ck.config != cfg:
        raise ValueError(f"{out}: checkpoint config {ck.config} differs from requested {cfg}")
    if not ck.model or not ck.optim:
        raise ValueError(f"{out}: weights-only file, cannot resume training from it")
    return ck


@dataclass
class _Run:
    """The state of one training run: the networks, the optimizer, the data and the generator.
    ``y_data``: the labels (None: an unconditional model)."""

    net: UNet
    ema: UNet
    opt: torch.optim.Optimizer
    gen: torch.Generator
    x_data: torch.Tensor
    sched: Any
    device: torch.device
    out: Path
    schedule_kind: str
    train_args: dict
    saved_step: int | None
    y_data: torch.Tensor | None = None
    label_dropout: float = 0.0
    lr_schedule: str = "constant"
    min_lr: float = 0.0
    total_steps: int = 0
    loss_weighting: str = "uniform"
    snr_gamma: float = 5.0
    autocast: str | None = None

    def __post_init__(self):
        self.alphas = self.sched.alphas_cumprod.to(self.device)

    @classmethod
    def create(cls, cfg: UNetConfig, sched, x_data: torch.Tensor, *, device: torch.device, lr: float,
               weight_decay: float, seed: int, **kw) -> "_Run":
        """A fresh run: the U-Net initialised from ``seed``, its EMA copy, AdamW and the batch generator."""
        torch.manual_seed(seed)  # the init and dropout draw from the global generator
        net = UNet(cfg, schedule=sched).to(device)
        # oneDNN convolutions run ~10% faster in NHWC on CPU; the saved weights are made contiguous.
        net = net.to(memory_format=torch.channels_last if device.type == "cpu" else torch.contiguous_format)
        ema = copy.deepcopy(net).requires_grad_(False).eval()
        opt = torch.optim.AdamW(list(net.parameters()), lr=lr, weight_decay=weight_decay)
        # Batches, t and noise come from one CPU generator, so runs match across devices in what
        # they draw, and its state fits in a checkpoint.
        gen = torch.Generator().manual_seed(seed)
        return cls(net=net, ema=ema, opt=opt, gen=gen, x_data=x_data, sched=sched, device=device, saved_step=None, **kw)

    def restore(self, ck) -> None:
        """Continue from a training checkpoint: weights, EMA, optimizer state and every RNG."""
        self.net.load_state_dict(ck.model)
        self.ema.load_state_dict(ck.ema)
        state = {i: {k: (v.reshape(()) if k == "step" else v) for k, v in st.items()} for i, st in ck.optim.items()}
        self.opt.load_state_dict({"state": state, "param_groups": self.opt.state_dict()["param_groups"]})
        self.gen.set_state(ck.rng["batch"])
        torch.set_rng_state(ck.rng["torch"])
        if self.device.type == "cuda" and "cuda" in ck.rng:
            torch.cuda.set_rng_state(ck.rng["cuda"], self.device)
        self.saved_step = ck.step

    def save(self, step: int) -> None:
        rng = {"batch": self.gen.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        save_checkpoint(self.out, model=self.net, ema=self.ema, step=step, schedule_kind=self.schedule_kind,
                        optimizer=self.opt, rng=rng, train_args=self.train_args)
        self.saved_step = step

    def step(self, step: int, batch_size: int, lr: float, warmup: int, grad_clip: float, ema_decay: float) -> float:
        """One optimizer step (and the EMA update); returns the loss."""
        gen, params, alphas = self.gen, list(self.net.parameters()), self.alphas
        idx = torch.randint(0, self.x_data.shape[0], (batch_size,), generator=gen)
        t = torch.randint(0, self.sched.T, (batch_size,), generator=gen)
        noise = torch.randn((batch_size, *self.x_data.shape[1:]), generator=gen)
        x0, t, noise = self.x_data[idx].to(self.device), t.to(self.device), noise.to(self.device)
        a = alphas[t].view(-1, 1, 1, 1)
        mem = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise).contiguous(memory_format=mem)
        loss = self._loss(x_t, t, noise, idx)
        for g in self.opt.param_groups:
            g["lr"] = _lr_at(step, lr, warmup, self.total_steps, self.lr_schedule, self.min_lr)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.parameters()), params, 1.0 - _ema_decay_at(step, ema_decay))
        return loss.item()  # one host sync per step is fine here: training is not the hot path

    def _loss(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The weighted eps MSE of one batch (float32), the forward under autocast when asked."""
        kwargs = self._class_kwargs(idx)
        cast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast == "bf16"
                else contextlib.nullcontext())
        with cast:
            pred = self.net(x_t, t, **kwargs)
        if self.loss_weighting == "uniform":  # the DDPM objective, as before the levers existed
            return torch.nn.functional.mse_loss(pred.float(), noise)
        per_sample = (pred.float() - noise).square().flatten(1).mean(1)
        return (loss_weights(self.alphas, t, self.loss_weighting, self.snr_gamma) * per_sample).mean()

    def _class_kwargs(self, idx: torch.Tensor) -> dict:
        """The batch's labels as model kwargs, each dropped to the null label with probability
        ``label_dropout``. The draw comes after the batch's other draws from the same generator
        (saved with the checkpoint), and only for a conditional model with a non-zero rate, so
        unconditional runs draw exactly what they drew before labels existed."""
        if self.y_data is None:
            return {}
        y = self.y_data[idx]
        if self.label_dropout > 0:
            drop = torch.rand(idx.shape[0], generator=self.gen) < self.label_dropout
            y = torch.where(drop, self.net.null_class_label, y)
        return {"class_labels": y.to(self.device)}

    def loop(self, start: int, steps: int, *, batch_size: int, lr: float, warmup: int, grad_clip: float,
             ema_decay: float, save_every: int, log_every: int, log, progress: bool) -> dict:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True)
        self.net.train()
        t_start = time.perf_counter()
        t_win, loss_win, n_win, done = t_start, 0.0, 0, start
        summary = {"step": start, "loss": float("nan"), "images_per_s": float("nan"), "seconds": 0.0,
                   "path": str(self.out), "already_done": False}
        try:
            for step in range(start, steps):
                loss_win += self.step(step, batch_size, lr, warmup, grad_clip, ema_decay)
                n_win += 1
                done = step + 1
                if done % log_every == 0 or done == steps:
                    now = time.perf_counter()
                    ips = n_win * batch_size / (now - t_win)
                    summary.update(step=done, loss=loss_win / n_win, images_per_s=ips, seconds=now - t_start)
                    if log:
                        log.write(f"{done} {loss_win / n_win:.5f} {ips:.1f} {now - t_start:.0f}\n")
                        log.flush()
                    if bar:
                        bar.set_postfix(loss=f"{loss_win / n_win:.4f}", img_s=f"{ips:.0f}")
                    t_win, loss_win, n_win = now, 0.0, 0
                if bar:
                    bar.update(1)
                if done % save_every == 0 or done == steps:
                    self.save(done)
        except KeyboardInterrupt:
            raise TrainingInterrupted(done, self.saved_step, str(self.out)) from None
        finally:
            if bar:
                bar.close()
        summary["seconds"] = time.perf_counter() - t_start
        return summary
