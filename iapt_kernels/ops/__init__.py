"""Triton kernels and their host launchers, one file per op. The launchers take the arguments of the
`iapt::` schemas (iapt_kernels/schemas.py) and `iapt_kernels.library` registers them as the ops' CUDA
kernels; nothing here is imported where Triton is not."""
