"""fastddim: fast DDIM sampling that computes exactly what the reference implementations compute.

    import fastddim
    x = fastddim.sample(model, n=1024, steps=10)          # (1024, *model.sample_shape) float32

Public names: ``sample``, ``invert``, ``interpolate``, ``Schedule``, ``from_diffusers``, ``info``.
"""
__version__ = "0.1.0"

from .diffusers_compat import from_diffusers
from .sampler import info, interpolate, invert, sample
from .schedule import Schedule

__all__ = ["sample", "invert", "interpolate", "Schedule", "from_diffusers", "info", "__version__"]
