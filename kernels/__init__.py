"""Triton kernels (installed as ``cpo_fast.kernels``): one op per module."""
