"""Models shipped with fastddim: the DDPM U-Net."""
from .unet import PRESETS, UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "PRESETS"]
