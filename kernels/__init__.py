"""Triton kernels of lacy-fast, installed as ``lacy_fast.kernels``.

``lacy_linear_cross_entropy``: the LM head + LaCy loss (linear layer, cross-entropy,
on-device selection of the targets that become <CALL>), fused on CUDA, chunked PyTorch on
CPU, with a materialised reference (``impl="torch"``).
"""
from .lacy_ce import IMPLS, LacyLossArgumentError, lacy_linear_cross_entropy
from .lacy_ce_reference import STRATEGIES

__all__ = ["IMPLS", "STRATEGIES", "LacyLossArgumentError", "lacy_linear_cross_entropy"]
