"""Noise schedules: the betas and the cumulative products a_t = prod_{s<=t} (1 - beta_s).

A schedule knows nothing about sampling: it is the T-long table the model was trained with.
Everything is float32 on the CPU, made exactly the way the reference implementations make it,
because a one-ulp difference in a_t is a one-ulp difference in every step that follows.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["Schedule"]


def _cumprod(betas: torch.Tensor) -> torch.Tensor:
    # torch's CPU cumprod on float32 is sequential, exactly as diffusers and the paper code do it.
    return torch.cumprod(1.0 - betas, dim=0)


def _linspace(start: float, end: float, T: int, linspace: str) -> torch.Tensor:
    if linspace == "float64":  # the paper code: numpy float64 linspace, rounded once to float32
        return torch.from_numpy(np.linspace(start, end, T, dtype=np.float64)).float()
    if linspace == "float32":  # diffusers: torch.linspace in float32
        return torch.linspace(start, end, T, dtype=torch.float32)
    raise ValueError(f"linspace must be 'float64' (the paper's) or 'float32' (diffusers'), got {linspace!r}")


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1, in float32 op for op as diffusers does it."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first = alphas_bar_sqrt[0].clone()
    last = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


class Schedule:
    """A trained diffusion schedule of T steps.

    Attributes:
        betas: (T,) float32 CPU tensor.
        alphas_cumprod: (T,) float32 CPU tensor, a_t (the paper's alpha_t).
        T: number of training timesteps.
        name: a short description (kept in manifests and reprs).
    """

    def __init__(self, betas: torch.Tensor | None, alphas_cumprod: torch.Tensor, name: str = "custom"):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float32).detach().cpu().contiguous()
        if ac.ndim != 1 or ac.numel() < 1:
            raise ValueError(f"alphas_cumprod must be a non-empty 1-D tensor, got shape {tuple(ac.shape)}")
        if not torch.isfinite(ac).all():
            raise ValueError("alphas_cumprod must be finite")
        if (ac < 0).any() or (ac > 1).any():
            raise ValueError("alphas_cumprod must lie in [0, 1]")
        if (ac[1:] > ac[:-1]).any():
            raise ValueError("alphas_cumprod must be non-increasing")
        if ac[0] <= 0:
            raise ValueError("alphas_cumprod[0] must be positive")
        if betas is None:
            prev = torch.cat([torch.ones(1), ac[:-1]])
            betas = 1 - ac / prev
        self.betas = torch.as_tensor(betas, dtype=torch.float32).detach().cpu().contiguous()
        self.alphas_cumprod = ac
        self.name = name

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def linear(
        cls,
        T: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        *,
        rescale_zero_terminal_snr: bool = False,
        linspace: str = "float64",
    ) -> "Schedule":
        """The DDPM/DDIM linear schedule.

        ``linspace="float64"`` (default) is the paper code's (numpy float64 linspace cast to
        float32); ``"float32"`` is diffusers' (``torch.linspace`` in float32). They differ in the
        last bit of some betas.
        """
        _check_T(T)
        betas = _linspace(beta_start, beta_end, T, linspace)
        return cls._from_betas_named(betas, f"linear(T={T}, {beta_start:g}..{beta_end:g})", rescale_zero_terminal_snr)

    @classmethod
    def scaled_linear(
        cls,
        T: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        *,
        rescale_zero_terminal_snr: bool = False,
        linspace: str = "float64",
    ) -> "Schedule":
        """Linear in sqrt(beta), squared (the latent-diffusion schedule; the paper code's "quad")."""
        _check_T(T)
        betas = _linspace(beta_start**0.5, beta_end**0.5, T, linspace) ** 2
        return cls._from_betas_named(betas, f"scaled_linear(T={T}, {beta_start:g}..{beta_end:g})", rescale_zero_terminal_snr)

    @classmethod
    def cosine(
        cls, T: int = 1000, *, s: float = 0.008, max_beta: float = 0.999, rescale_zero_terminal_snr: bool = False
    ) -> "Schedule":
        """The GLIDE / improved-DDPM cosine schedule (diffusers' ``squaredcos_cap_v2``).

        Betas are computed in Python floats, capped at ``max_beta``, then cast to float32.
        """
        _check_T(T)

        def alpha_bar(t: float) -> float:
            return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
        return cls._from_betas_named(
            torch.tensor(betas, dtype=torch.float32), f"cosine(T={T})", rescale_zero_terminal_snr
        )

    @classmethod
    def from_betas(cls, betas: Sequence[float] | np.ndarray | torch.Tensor, *, rescale_zero_terminal_snr: bool = False) -> "Schedule":
        """A schedule from explicit betas (cast to float32, like diffusers' ``trained_betas``)."""
        b = torch.tensor(np.asarray(betas if not torch.is_tensor(betas) else betas.detach().cpu().numpy()), dtype=torch.float32)
        if b.ndim != 1 or b.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(b.shape)}")
        if not torch.isfinite(b).all() or (b <= 0).any() or (b > 1).any():
            raise ValueError("betas must be finite and lie in (0, 1]")
        return cls._from_betas_named(b, f"betas(T={b.numel()})", rescale_zero_terminal_snr)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Sequence[float] | np.ndarray | torch.Tensor) -> "Schedule":
        """A schedule from a_t directly (betas are derived from it)."""
        ac = alphas_cumprod
        ac = ac.detach().cpu().float() if torch.is_tensor(ac) else torch.tensor(np.asarray(ac), dtype=torch.float32)
        return cls(None, ac, f"alphas_cumprod(T={ac.numel()})")

    @classmethod
    def _from_betas_named(cls, betas: torch.Tensor, name: str, rescale: bool) -> "Schedule":
        if rescale:
            betas = _rescale_zero_terminal_snr(betas)
            name += ", zero terminal SNR"
        return cls(betas, _cumprod(betas), name)

    # ----------------------------------------------------------------------------- properties
    @property
    def T(self) -> int:
        return int(self.alphas_cumprod.numel())

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0)

    def __repr__(self) -> str:
        return f"Schedule({self.name})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and torch.equal(self.alphas_cumprod, other.alphas_cumprod)

    def __hash__(self) -> int:
        return hash(self.alphas_cumprod.numpy().tobytes())

    def to_dict(self) -> dict:
        """A JSON-able description (for manifests): the name and a checksum of a_t."""
        import hashlib

        digest = hashlib.sha256(self.alphas_cumprod.numpy().tobytes()).hexdigest()[:16]
        return {"name": self.name, "T": self.T, "alphas_cumprod_sha256": digest}


def _check_T(T: int) -> None:
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}")
