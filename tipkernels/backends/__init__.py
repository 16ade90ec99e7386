"""Backends: the reference, the chunked PyTorch backend, the Triton kernels and the vocabulary-parallel wrapper."""
