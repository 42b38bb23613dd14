"""Test setup: Triton runs in its CPU interpreter when there is no GPU, and every uninitialised output
is poisoned with NaN so a kernel that forgets to write an element fails its test."""

import os

import torch

# TRITON_INTERPRET is read when a kernel is *defined*, so it must be set before iapt_kernels imports.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

import iapt_kernels  # noqa: E402,F401


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """With deterministic algorithms on, torch.empty* (Python and ATen C++ alike) fills new floating
    tensors with NaN: every kernel output starts poisoned."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)
