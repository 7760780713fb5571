"""Triton kernels of lacy-fast, installed as ``lacy_fast.kernels``.

``lacy_linear_cross_entropy``: the LM head + LaCy loss (linear layer, cross-entropy,
on-device selection of the targets that become <CALL>), fused on CUDA, chunked PyTorch on
CPU, with a materialised reference (``impl="torch"``).

From a checkout's root (``python -m ...``, pytest) this folder is also importable as the
top-level ``kernels``, a name that belongs to another PyPI project which libraries probe
for (transformers imports it when it finds it). Imported under that name the package
stays empty: importing the modules below a second time would register the custom ops
twice and leave the first registration's handles dangling.
"""
if __name__ == "lacy_fast.kernels":
    from .lacy_ce import IMPLS, LacyLossArgumentError, lacy_linear_cross_entropy
    from .lacy_ce_reference import STRATEGIES, selection_bound, static_bound

    __all__ = ["IMPLS", "STRATEGIES", "LacyLossArgumentError", "lacy_linear_cross_entropy", "selection_bound",
               "static_bound"]
