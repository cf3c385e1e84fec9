"""model_kwargs as a run passes them: shared or per sample, on the run's device and dtype.

Floating tensors follow the run's model dtype, as the model input does (``dtype=torch.bfloat16``
with fp32 ``encoder_hidden_states`` would otherwise fail inside the model's first matmul);
integer and bool tensors (class labels, masks) and non-tensors pass unchanged.
"""
from __future__ import annotations

import torch

__all__ = ["split_model_kwargs", "pad"]


def _placed(v: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)


def split_model_kwargs(model_kwargs: dict | None, n: int, device: torch.device,
                       dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    """(shared, per_sample): tensors with leading dimension n are per sample, sliced per batch.

    A tensor whose leading dimension is 1 (or a 0-dim tensor, or anything not a tensor) is passed
    to every call as is; any other leading dimension is an error naming the key. Tensors move to
    ``device``; floating ones are cast to ``dtype`` (the model input's).
    """
    if model_kwargs is None:
        return {}, {}
    if not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}")
    shared, per_sample = {}, {}
    for k, v in model_kwargs.items():
        if not isinstance(v, torch.Tensor):
            shared[k] = v
        elif v.ndim >= 1 and v.shape[0] != 1:
            if v.shape[0] != n:
                raise ValueError(
                    f"model_kwargs[{k!r}] has leading dimension {v.shape[0]}: expected n = {n} (one row per sample, "
                    f"sliced per batch) or 1 (shared by all)"
                )
            per_sample[k] = _placed(v, device, dtype)
        else:
            shared[k] = _placed(v, device, dtype)
    return shared, per_sample


def pad(t: torch.Tensor, b: int) -> torch.Tensor:
    """t (k, ...) with its last row repeated to b rows (k <= b)."""
    return t if t.shape[0] == b else torch.cat([t, t[-1:].expand(b - t.shape[0], *t.shape[1:])])
