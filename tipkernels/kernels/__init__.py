"""Triton kernels (``@triton.jit``), one module per pass; host wrappers live in ``tipkernels.triton_backend``."""
