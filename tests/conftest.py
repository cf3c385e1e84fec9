"""Shared test set-up: the `gpu` marker's skip, the Triton interpreter on CPU-only machines, and
loading a benchmarks/ script as a module."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through the interpreter. The variable is
# read when @triton.jit decorates a kernel, i.e. when fastddim.kernels is first imported, so it
# must be set before any test module imports it: here, before collection.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_unet():
    """A small random diffusers UNet2DModel (seeded, eval; 3x8x8 samples) for parity tests: do not modify it."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=8,
    ).eval()


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="session")
def benchmark_script():
    """A loader: ``benchmark_script("guidance_quality")`` is benchmarks/guidance_quality.py as a module
    (benchmarks/ put on sys.path first, as running the script does, for its ``import machine``)."""
    def load(name: str):
        if str(BENCHMARKS) not in sys.path:
            sys.path.insert(0, str(BENCHMARKS))
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load
