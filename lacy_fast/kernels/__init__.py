"""Triton kernels of lacy-fast: ``lacy_fast.kernels``.

``lacy_linear_cross_entropy``: the LM head + LaCy loss (linear layer, cross-entropy,
on-device selection of the targets that become <CALL>), fused on CUDA, chunked PyTorch on
CPU, with a materialised reference (``impl="torch"``).

The modules live in the repository's top-level folder ``kernels/``, which has no
``__init__.py``: the top-level name ``kernels`` belongs to another PyPI project (Hugging
Face's, which transformers imports), and from a checkout's root (``python -m``, pytest) a
folder with an ``__init__.py`` would be a regular package that shadows it. Without one the
folder is at most a namespace portion, which an installed regular package always beats. This
file is the package's only ``__init__``: a wheel (setup.py's build_py) copies the modules
next to it; in a checkout or an editable install they are found through ``__path__`` below.
"""
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
if not os.path.exists(os.path.join(_HERE, "lacy_ce.py")):
    _SOURCE = os.path.join(os.path.dirname(os.path.dirname(_HERE)), "kernels")
    if os.path.exists(os.path.join(_SOURCE, "lacy_ce.py")):
        __path__.append(_SOURCE)  # noqa: F821 (a package's __path__)

from .lacy_ce import IMPLS, LacyLossArgumentError, lacy_linear_cross_entropy  # noqa: E402
from .lacy_ce_reference import STRATEGIES, selection_bound, static_bound  # noqa: E402

__all__ = ["IMPLS", "STRATEGIES", "LacyLossArgumentError", "lacy_linear_cross_entropy", "selection_bound",
           "static_bound"]
