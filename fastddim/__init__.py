"""fastddim: fast DDIM (and DPM-Solver++(2M)) sampling: bit for bit with diffusers on the CPU with
``backend="torch"``, within float32 rounding of it on the fused backends.

    import fastddim
    x = fastddim.sample(fastddim.pretrained(), n=64, steps=10)   # (64, 1, 32, 32) float32

Public names: ``sample``, ``invert``, ``interpolate``, ``prepare`` (a run to sample many
batches from), ``Schedule``, ``from_diffusers``, ``paper_timesteps``, ``pretrained``, ``info``,
``clear_cache``.
"""
__version__ = "0.1.0"

from .diffusers_compat import from_diffusers
from .engine import clear_cache, prepare
from .plan import paper_timesteps
from .pretrained import pretrained
from .sampler import info, interpolate, invert, sample
from .schedule import Schedule

__all__ = [
    "sample", "invert", "interpolate", "prepare", "Schedule", "from_diffusers", "paper_timesteps", "pretrained",
    "info", "clear_cache", "__version__",
]
