"""Triton kernels of lacy-fast, installed as ``lacy_fast.kernels``."""
