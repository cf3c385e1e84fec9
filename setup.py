"""fastddim: fast, exact DDIM sampling for trained noise-prediction diffusion models.

The C++/CUDA step kernels (``fastddim._C``) are built here when torch is importable at build
time (``pip install --no-build-isolation``, as the Makefile does). ``FASTDDIM_SKIP_CUDA_BUILD=1``
builds the CPU part only; ``FASTDDIM_SKIP_EXT_BUILD=1`` builds no extension at all (everything
then runs through the torch and Triton backends).
"""
import os

from setuptools import setup

VERSION = "0.1.0"


def _ext_modules():
    if os.environ.get("FASTDDIM_SKIP_EXT_BUILD") == "1":
        return [], {}
    try:
        from fastddim_build import extensions  # noqa: F401  (see csrc/, added with the kernels)
    except ImportError:
        return [], {}
    return extensions()


ext_modules, cmdclass = _ext_modules()

setup(
    name="fastddim",
    version=VERSION,
    description="Fast, exact DDIM sampling (Song, Meng, Ermon, ICLR 2021) for trained diffusion models",
    python_requires=">=3.10",
    packages=["fastddim", "fastddim.models", "fastddim.kernels"],
    package_dir={"fastddim.kernels": "kernels"},
    package_data={"fastddim": ["weights/*.safetensors", "weights/*.json"]},
    install_requires=["torch>=2.1", "numpy", "tqdm", "safetensors", "pillow"],
    extras_require={
        "dev": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "diffusers",
            "pybind11",
        ],
        "train": ["mlxtend", "matplotlib", "pillow"],
        "triton": ["triton"],
        "nvtx": ["nvtx"],
    },
    entry_points={"console_scripts": ["fastddim=fastddim.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
