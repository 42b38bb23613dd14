"""Triton kernels, their host launchers and autograd Functions, one file per op."""
