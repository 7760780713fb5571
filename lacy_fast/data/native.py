"""ctypes bindings of the native data helpers (``lacy_fast/data/csrc/helpers.cpp``).

``setup.py`` builds the library with CMake next to this file as ``_lacy_native<suffix>``.
When it is missing (no CMake or compiler at install time) or ``LACY_FAST_NO_NATIVE=1`` is
set, ``available()`` is False and callers take their numpy path, which gives the same
results bit for bit. ``load_error`` says why the library is not in use.

What it buys (bench/bench_native.py, 2-core CPU, bench/results/native.jsonl): the label
projection is 4.8x faster per 64-document batch (0.03 vs 0.15 ms) and 8.6x on a million
tokens; the sample index 2.5-2.8x (107 vs 272 ms for 3M samples over 5M documents). Both
are small next to spaCy (~200 ms per batch) and a one-off at training start, so the
end-to-end gain is under 1%: the numpy path is not a bottleneck, and the library is kept
optional for that reason.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path

import numpy as np

ABI_VERSION = 1

_i64p = np.ctypeslib.ndpointer(dtype=np.int64, flags="C_CONTIGUOUS")


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("LACY_FAST_NO_NATIVE") == "1":
        return None, "LACY_FAST_NO_NATIVE=1"
    here = Path(__file__).parent
    paths = [here / f"_lacy_native{s}" for s in importlib.machinery.EXTENSION_SUFFIXES]
    path = next((p for p in paths if p.exists()), None)
    if path is None:
        return None, f"no _lacy_native library in {here} (built by setup.py when CMake and a C++ compiler exist)"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        return None, f"{path} failed to load ({err})"
    lib.lacy_abi_version.restype = ctypes.c_int32
    if lib.lacy_abi_version() != ABI_VERSION:
        return None, f"{path} is stale (ABI {lib.lacy_abi_version()}, expected {ABI_VERSION}); reinstall the package"
    lib.lacy_project.restype = None
    lib.lacy_project.argtypes = [_i64p, _i64p, ctypes.c_int64, _i64p, _i64p, ctypes.c_int64, ctypes.c_int32, _i64p]
    lib.lacy_sample_index.restype = None
    lib.lacy_sample_index.argtypes = [_i64p, _i64p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _i64p]
    return lib, ""


_lib, load_error = _load()


def available() -> bool:
    return _lib is not None


def _i64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


def project(word_starts: np.ndarray, word_ends: np.ndarray, tok_starts: np.ndarray, tok_ends: np.ndarray,
            first_only: bool) -> np.ndarray:
    """Native ``labeling.project``: (T,) int64 word index per token, -1 for none."""
    ws, we, ts, te = _i64(word_starts), _i64(word_ends), _i64(tok_starts), _i64(tok_ends)
    out = np.empty(len(ts), dtype=np.int64)
    _lib.lacy_project(ws, we, len(ws), ts, te, len(ts), int(first_only), out)
    return out


def sample_index(doc_lengths: np.ndarray, order: np.ndarray, seq_len: int, n_rows: int) -> np.ndarray:
    """Native ``packing.build_sample_index`` body: (n_rows, 2) int64."""
    lengths, order = _i64(doc_lengths), _i64(order)
    out = np.empty((n_rows, 2), dtype=np.int64)
    _lib.lacy_sample_index(lengths, order, len(order), int(seq_len), int(n_rows), out)
    return out
