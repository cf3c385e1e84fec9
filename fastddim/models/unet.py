"""The DDPM U-Net (Ho, Jain, Abbeel 2020), as a small self-contained PyTorch module.

Layout follows the paper's TensorFlow code (and its PyTorch ports) so that the ``"cifar10"``
preset has the paper's 35.7M parameters:

    conv_in -> [levels: res blocks (+ attention at the listed resolutions), downsample]
            -> middle: res, attention, res
            -> [levels reversed: res blocks over concatenated skips (+ attention), upsample]
            -> GroupNorm, SiLU, conv_out

Every residual block receives the timestep embedding (sinusoidal features -> 2-layer MLP),
added as a per-channel bias after its first convolution.

The module predicts eps: ``UNet(config)(x_t, t)`` maps (B, C, H, W) float and (B,) int64 (or
float) timesteps to (B, C, H, W). It carries ``sample_shape`` (C, H, W) and ``schedule`` (the
training ``Schedule``), which is all ``fastddim.sample`` needs. With ``head="v"`` the network
body predicts v and ``forward`` turns it into eps with an exact skip from x_t (see
``UNetConfig.head``); callers see eps either way.

With ``num_classes = K > 0`` the model is class-conditional (ADM style, Dhariwal & Nichol 2021):
a learned class embedding is added to the time embedding, ``emb = temb + class_emb(y)``, with
K + 1 rows: labels 0..K-1 and the "null" label K (``model.null_class_label``) that classifier-free
training substitutes for dropped labels and guided sampling passes as the unconditional half.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..schedule import Schedule

__all__ = ["UNet", "UNetConfig", "PRESETS"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a :class:`UNet`. JSON round trip: ``UNetConfig.from_dict(c.to_dict())``.

    ``attn_resolutions`` are feature-map sizes (e.g. 16 = the 16x16 level of a 32x32 model).
    ``resolution`` is the input height = width; it must be divisible by 2**(len(ch_mult)-1).
    """

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resolution: int = 32
    groups: int = 32  # GroupNorm groups; must divide every channel count
    # What the network body F predicts; forward() always returns eps.
    #   "eps": eps = F(x_t, t)  (DDPM).
    #   "v":   eps = sqrt(1 - a_t) x_t + sqrt(a_t) F(x_t, t), i.e. F predicts v (Salimans & Ho
    #          2022). The skip carries x_t to the output exactly: a small eps network cannot copy
    #          x_t through its GroupNorms to the ~0.1% needed at large t, where x0 = (x_t -
    #          sqrt(1 - a_t) eps) / sqrt(a_t) multiplies its error by up to 1/sqrt(a_t) ~ 150.
    head: str = "eps"
    # 0: unconditional (no class embedding: the weights of unconditional models are unchanged).
    # K > 0: class-conditional on labels 0..K-1, plus the null label K (see the module docstring).
    num_classes: int = 0

    def __post_init__(self):
        # JSON gives lists; keep tuples so configs hash and compare equal after a round trip.
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: unconditional), got {self.num_classes!r}")
        if self.head not in ("eps", "v"):
            raise ValueError(f"head must be 'eps' or 'v', got {self.head!r}")
        if self.resolution % (2 ** (len(self.ch_mult) - 1)):
            raise ValueError(f"resolution {self.resolution} is not divisible by 2**{len(self.ch_mult) - 1}")
        for c in {self.ch * m for m in self.ch_mult}:
            if c % self.groups:
                raise ValueError(f"GroupNorm groups={self.groups} must divide channel count {c}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str) -> "UNetConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown U-Net preset {name!r}; known: {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS: dict[str, UNetConfig] = {
    # Ho et al. 2020, CIFAR-10: 35.7M parameters.
    "cifar10": UNetConfig(),
    # 0.69M parameters, sized to train on one CPU core in about an hour (docs/training.md):
    # 16 channels at 32x32 because that level costs most of the convolution time; no dropout
    # because a 4,000-digit run of a few thousand steps is far from overfitting; the "v" head
    # because the same network with an eps head left a quarter of its DDIM samples noisy.
    "mnist": UNetConfig(
        in_channels=1, out_channels=1, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1,
        attn_resolutions=(8,), dropout=0.0, resolution=32, groups=8, head="v",
    ),
}
# The MNIST model conditioned on the digit (10 classes and the null label 10), for guidance.
PRESETS["mnist-cond"] = dataclasses.replace(PRESETS["mnist"], num_classes=10)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the timestep, as in the DDPM code (sin half, then cos half).

    t: (B,) int or float. Returns (B, dim) float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """(B, c_in, H, W), (B, temb) -> (B, c_out, H, W)."""

    def __init__(self, c_in: int, c_out: int, temb_ch: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # The paper zero-initialises the last conv so each block starts as the identity.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions. (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # (B, HW, C) each
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """DDPM eps-prediction U-Net.

    Args:
        config: a :class:`UNetConfig` or a preset name (``"cifar10"``, ``"mnist"``, ``"mnist-cond"``).
        schedule: the training schedule; defaults to ``Schedule.linear()`` (T=1000).

    Call: ``model(x, t, class_labels=None)`` with x (B, in_channels, resolution, resolution) float
    and t (B,) int64 or float timesteps (a 0-dim t is broadcast over the batch); class_labels (B,)
    or () integer labels of a class-conditional model (None: the null label). Returns eps, shape
    (B, out_channels, resolution, resolution), dtype of x.

    Attributes: ``num_classes`` (0: unconditional) and ``null_class_label`` (``num_classes``, or
    None for an unconditional model), what the CLI checks labels against and fills the
    unconditional half of guided sampling with.
    """

    def __init__(self, config: UNetConfig | str = "cifar10", schedule: Schedule | None = None):
        super().__init__()
        cfg = UNetConfig.preset(config) if isinstance(config, str) else config
        self.config = cfg
        self.schedule = schedule if schedule is not None else Schedule.linear()
        self.sample_shape = (cfg.in_channels, cfg.resolution, cfg.resolution)
        if cfg.head == "v":
            if cfg.in_channels != cfg.out_channels:
                raise ValueError("head='v' needs out_channels == in_channels")
            # Not saved with the weights: the schedule is stored beside them in checkpoints.
            ac = self.schedule.alphas_cumprod
            self.register_buffer("_skip_coef", torch.stack([(1 - ac).sqrt(), ac.sqrt()], 1), persistent=False)

        ch, g = cfg.ch, cfg.groups
        self.temb_ch = temb_ch = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.num_classes = cfg.num_classes
        self.null_class_label = cfg.num_classes if cfg.num_classes else None
        if cfg.num_classes:  # one more row: the null label
            self.class_emb = nn.Embedding(cfg.num_classes + 1, temb_ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        # Down path: remember every output's channel count, the up path consumes them as skips.
        self.down = nn.ModuleList()
        skip_chs = [ch]
        c, res = ch, cfg.resolution
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = [ResBlock(c, ch * mult, temb_ch, cfg.dropout, g)]
                c = ch * mult
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(c, g))
                self.down.append(nn.ModuleList(blocks))
                skip_chs.append(c)
            if level != len(cfg.ch_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(c)]))
                skip_chs.append(c)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(c, c, temb_ch, cfg.dropout, g), AttnBlock(c, g),
                                  ResBlock(c, c, temb_ch, cfg.dropout, g)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks = [ResBlock(c + skip_chs.pop(), ch * mult, temb_ch, cfg.dropout, g)]
                c = ch * mult
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(c, g))
                self.up.append(nn.ModuleList(blocks))
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(c)]))
                res *= 2
        assert not skip_chs

        self.norm_out = nn.GroupNorm(g, c)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _run(self, blocks: nn.ModuleList, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for b in blocks:
            h = b(h, temb) if isinstance(b, ResBlock) else b(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W); t: (B,) or () timesteps in [0, T) (a float t is truncated to an
        index for the 'v' head's coefficients); class_labels: (B,) or () integer labels in
        [0, num_classes] of a conditional model (None: the null label). Returns eps (B, C_out, H, W)."""
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.temb(timestep_embedding(t.to(x.device), self.config.ch).to(x.dtype))
        if self.num_classes:
            temb = temb + self.class_emb(self._labels(class_labels, x)).to(x.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels: this U-Net is unconditional (num_classes = 0)")

        hs = [self.conv_in(x)]
        for blocks in self.down:
            hs.append(self._run(blocks, hs[-1], temb))
        h = self._run(self.mid, hs[-1], temb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(blocks, h, temb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if self.config.head == "v":
            c = self._skip_coef[t.to(self._skip_coef.device).long()].to(x.dtype)  # (B, 2)
            out = c[:, 0, None, None, None] * x + c[:, 1, None, None, None] * out
        return out

    def _labels(self, class_labels: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """(B,) int64 labels on x's device; None is the null label. Shape and dtype are checked here;
        the range is not (that would sync with the device): the embedding refuses an index outside
        [0, num_classes]."""
        if class_labels is None:
            return torch.full((x.shape[0],), self.null_class_label, dtype=torch.int64, device=x.device)
        if not torch.is_tensor(class_labels):
            raise TypeError(f"class_labels must be an integer tensor, got {type(class_labels).__name__}")
        if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.dtype == torch.bool:
            raise TypeError(f"class_labels must be an integer tensor, got {class_labels.dtype}")
        if class_labels.ndim == 0:
            class_labels = class_labels.expand(x.shape[0])
        if class_labels.shape != (x.shape[0],):
            raise ValueError(f"class_labels must have shape ({x.shape[0]},) (one label per image) or (), "
                             f"got {tuple(class_labels.shape)}")
        return class_labels.to(device=x.device, dtype=torch.int64)

    def extra_repr(self) -> str:
        return f"config={self.config}, schedule={self.schedule}"
