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
    """fastddim._C from csrc/: the CPU kernel always, the CUDA one where nvcc and a CUDA torch are."""
    if os.environ.get("FASTDDIM_SKIP_EXT_BUILD") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # torch not importable at build time: the torch/Triton backends still work
        return [], {}
    # -ffp-contract=off / --fmad=false: round each op as the torch reference does (no FMA).
    # -fopenmp: at::parallel_for is inline OpenMP; torch ships the libgomp it links against.
    cxx = ["-O3", "-ffp-contract=off", "-fopenmp"]
    sources = ["csrc/bindings.cpp", "csrc/ddim_step_cpu.cpp"]
    with_cuda = (
        os.environ.get("FASTDDIM_SKIP_CUDA_BUILD") != "1"
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
    )
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "fastddim._C",
            sources + ["csrc/ddim_step_cuda.cu"],
            extra_compile_args={"cxx": cxx + ["-DFASTDDIM_WITH_CUDA"], "nvcc": ["-O3", "--fmad=false", "-DFASTDDIM_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension("fastddim._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _ext_modules()

setup(
    name="fastddim",
    version=VERSION,
    description="Fast, exact DDIM sampling (Song, Meng, Ermon, ICLR 2021) for trained diffusion models",
    python_requires=">=3.10",
    packages=["fastddim", "fastddim.cli", "fastddim.models", "fastddim.paper", "fastddim.kernels"],
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
