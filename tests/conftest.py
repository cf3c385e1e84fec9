"""Shared test set-up: the `gpu` marker's skip, and the Triton interpreter on CPU-only machines."""
import os

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
