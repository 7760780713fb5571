"""Test-wide settings, applied before anything imports triton or deepspeed.

- No CUDA device: Triton kernels run in the interpreter (TRITON_INTERPRET=1, numpy on CPU
  tensors), and DeepSpeed uses its CPU accelerator.
- Threads are capped so tests that launch several ranks do not oversubscribe 2 cores.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
