"""Issue 20's training study: candidate recipes for the built-in MNIST model, compared on held-out
eps MSE over t and a quick FD, before the long run.

    python benchmarks/train_study.py train base --steps 400 --out runs/study     # one candidate
    python benchmarks/train_study.py eval runs/study/base.safetensors --fd-n 500   # its figures
    python benchmarks/train_study.py eps fastddim/weights/mnist.safetensors --t 0 10 100  # per digit class
    python benchmarks/train_study.py throughput                                    # s/step per recipe

Each candidate trains through ``fastddim.train.train`` (so ``--resume`` continues it bit for bit)
and logs to ``<out>/<name>.log``; ``eval`` writes ``<checkpoint>.eval.json``: the EMA weights'
eps MSE on the 1,000 held-out digits at t in T_GRID (fixed noise, seed 0) and their mean, and the
FD to the held-out digits of ``--fd-n`` DDIM samples (S = 20 or each ``--fd-steps``, eta = 0,
seed 0) and, with ``--memorisation``, their nearest-training-digit distances against the held-out digits'. Compare
candidates at equal cost: ``throughput`` measures seconds per optimizer step of each recipe
side by side (interleaved rounds, ``--threads``, default one) on this machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from fastddim.models.unet import UNet, UNetConfig
from fastddim.schedule import Schedule

T_GRID = (10, 100, 250, 500, 750, 900, 999)
# name -> (UNetConfig changes to the "mnist" preset, train() keyword arguments)
CANDIDATES = {
    "base": ({}, {}),  # the packaged model's recipe (docs/training.md)
    "w32-bf16-cos": ({"ch": 32}, {"autocast": "bf16", "lr_schedule": "cosine"}),
    "w32-bf16-cos-snr": ({"ch": 32}, {"autocast": "bf16", "lr_schedule": "cosine", "loss_weighting": "min-snr"}),
    "w16-cos-snr": ({}, {"lr_schedule": "cosine", "loss_weighting": "min-snr"}),
    # for CPUs without native bf16 (AVX2 only), where autocast is slower than float32
    "w32-cos-snr": ({"ch": 32}, {"lr_schedule": "cosine", "loss_weighting": "min-snr"}),
}


def config(name: str) -> UNetConfig:
    return dataclasses.replace(UNetConfig.preset("mnist"), **CANDIDATES[name][0])


def train_candidate(name: str, steps: int, out: Path, threads: int, batch_size: int, lr: float) -> dict:
    from fastddim.train import train

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.safetensors"
    return train(model=config(name), steps=steps, batch_size=batch_size, lr=lr, out=path, resume=path.exists(),
                 save_every=100, log_file=out / f"{name}.log", log_every=50, threads=threads, progress=False,
                 device="cpu", **CANDIDATES[name][1])


@torch.inference_mode()
def heldout_eps_mse(net: UNet, n: int = 1000, t_grid=T_GRID, by_digit: bool = False) -> dict:
    """eps MSE of ``net`` on the first n held-out digits at each t of ``t_grid`` (fixed noise, seed 0):
    {t: mse}, or with ``by_digit`` {t: {"all": mse, "0": mse of the zeros, ..., "9": ...}}."""
    from fastddim.metrics import heldout_digits

    x0, labels = (v[:n] for v in heldout_digits())
    a_all = net.schedule.alphas_cumprod
    gen = torch.Generator().manual_seed(0)
    res = {}
    for t in t_grid:
        eps = torch.randn(x0.shape, generator=gen)
        a = a_all[t]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = torch.cat([net(x_t[i:i + 250], torch.full((len(x_t[i:i + 250]),), t)) for i in range(0, n, 250)])
        per_image = (pred - eps).square().flatten(1).mean(1)
        res[t] = float(per_image.mean())
        if by_digit:
            res[t] = {"all": res[t], **{str(d): float(per_image[labels == d].mean()) for d in range(10)}}
    return res


def _ema_net(path: Path) -> tuple[UNet, object]:
    from fastddim.pretrained import load_checkpoint

    ck = load_checkpoint(path)
    net = UNet(ck.config, schedule=ck.schedule).eval()
    net.load_state_dict(ck.ema)
    return net, ck


def eps_by_digit(path: Path, t_grid: tuple[int, ...]) -> dict:
    """The EMA weights' held-out eps MSE per t and digit class (``eps`` subcommand)."""
    net, ck = _ema_net(path)
    return {"checkpoint": str(path), "step": ck.step, "eps_mse": heldout_eps_mse(net, t_grid=t_grid, by_digit=True)}


def evaluate(path: Path, fd_n: int, threads: int, fd_steps: tuple[int, ...] = (20,), memo: bool = False) -> dict:
    import fastddim
    from fastddim.metrics import fd_to_heldout, memorisation

    torch.set_num_threads(threads)
    net, ck = _ema_net(path)
    t0 = time.perf_counter()
    mse = heldout_eps_mse(net)
    res = {"checkpoint": str(path), "step": ck.step, "train": ck.train, "eps_mse": mse,
           "eps_mse_mean": sum(mse.values()) / len(mse)}
    if fd_n:
        res["fd_n"] = fd_n
        for S in fd_steps:
            x = fastddim.sample(net, n=fd_n, steps=S, seed=0, progress=False).clamp(-1, 1)
            res[f"fd_S{S}"] = fd_to_heldout(x)
            if memo and "memorisation" not in res:  # on the samples of the first S
                res["memorisation"] = dict(memorisation(x), steps=S)
    res["eval_seconds"] = time.perf_counter() - t0
    Path(f"{path}.eval.json").write_text(json.dumps(res, indent=1))
    return res


def throughput(names: list[str], batch_size: int, rounds: int, reps: int, threads: int = 1) -> dict:
    """Seconds per optimizer step of each recipe, interleaved rounds (min over rounds)."""
    from fastddim.train import _Run

    torch.set_num_threads(threads)
    runs = {}
    for name in names:
        cfg = config(name)
        kw = CANDIDATES[name][1]
        runs[name] = _Run.create(cfg, Schedule.linear(), torch.randn(256, 1, 32, 32).clamp(-1, 1), device=torch.device("cpu"),
                                 lr=1e-3, weight_decay=0.0, seed=0, out=Path("unused"), schedule_kind="linear",
                                 train_args={}, total_steps=1000,
                                 **{k: v for k, v in kw.items() if k in ("lr_schedule", "loss_weighting", "autocast")})
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for name, run in runs.items():
            run.step(0, batch_size, 1e-3, 0, 1.0, 0.999)  # warm
            t0 = time.perf_counter()
            for s in range(reps):
                run.step(s, batch_size, 1e-3, 0, 1.0, 0.999)
            times[name].append((time.perf_counter() - t0) / reps)
    return {n: {"s_per_step_min": min(v), "s_per_step": v,
                "params": sum(p.numel() for p in runs[n].net.parameters())} for n, v in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("name", choices=sorted(CANDIDATES))
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--out", type=Path, default=Path("runs/study"))
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    e = sub.add_parser("eval")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--fd-n", type=int, default=500)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--fd-steps", type=int, nargs="+", default=[20], help="DDIM steps S of each FD (eta 0, seed 0)")
    e.add_argument("--memorisation", action="store_true", help="nearest-training-digit distances of the first S's samples")
    d = sub.add_parser("eps", help="eps MSE on the held-out digits per t and digit class (JSON to stdout)")
    d.add_argument("checkpoint", type=Path)
    d.add_argument("--t", type=int, nargs="+", default=list(T_GRID))
    d.add_argument("--threads", type=int, default=1)
    h = sub.add_parser("throughput")
    h.add_argument("names", nargs="*", default=sorted(CANDIDATES))
    h.add_argument("--batch-size", type=int, default=64)
    h.add_argument("--rounds", type=int, default=3)
    h.add_argument("--reps", type=int, default=5)
    h.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.cmd == "train":
        print(json.dumps(train_candidate(args.name, args.steps, args.out, args.threads, args.batch_size, args.lr)))
    elif args.cmd == "eval":
        print(json.dumps(evaluate(args.checkpoint, args.fd_n, args.threads, tuple(args.fd_steps), args.memorisation), indent=1))
    elif args.cmd == "eps":
        torch.set_num_threads(args.threads)
        print(json.dumps(eps_by_digit(args.checkpoint, tuple(args.t)), indent=1))
    else:
        print(json.dumps(throughput(args.names, args.batch_size, args.rounds, args.reps, args.threads), indent=1))


if __name__ == "__main__":
    main()
