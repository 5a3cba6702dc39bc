"""Kernel tests run everywhere: compiled on a CUDA GPU, in Triton's CPU interpreter otherwise.

Triton chooses between compiling and interpreting when a kernel is defined, so TRITON_INTERPRET must be set
before `otterfast_kernels` (or triton) is imported: pytest loads this file before collecting the test modules.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import otterfast_kernels  # noqa: F401  (installed by ./dev setup)
except ImportError:  # a bare checkout (e.g. a GPU box with only torch/triton/pytest): use the source tree
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (bf16 and the compiled kernels)")
