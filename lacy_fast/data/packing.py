"""Packed training samples over a shard set: the sample index (Megatron-LM's build_sample_idx).

    order = document_order(len(lengths), seed=1234)          # (D,) a permutation
    index = build_sample_index(lengths, order, seq_len=256)  # (S + 1, 2) int64
    tokens, flags = PackedSamples(shard_set, seq_len=256, seed=1234)[i]

Documents (each ending in EOS) are read in ``order`` as one stream; sample ``i`` is stream
tokens ``[i * seq_len, (i + 1) * seq_len + 1)``: ``seq_len + 1`` tokens, so inputs are
``tokens[:-1]`` and targets ``tokens[1:]``, and consecutive samples overlap by one token.
Row ``i`` of the index is (position in ``order``, offset in that document) of stream token
``i * seq_len``; row ``i + 1`` is where sample ``i`` ends (inclusive). There are
``S = (total - 1) // seq_len`` whole samples; a tail shorter than a sample is dropped.

The index is built natively (one linear merge) when the helper library is there, else by
numpy (a cumulative sum and a binary search per sample): identical results, tested.
"""
from __future__ import annotations

import numpy as np

from lacy_fast.data import native


def document_order(n_docs: int, seed: int, epochs: int = 1) -> np.ndarray:
    """(epochs * n_docs,) int64: a fresh permutation of the documents per epoch, from ``seed``."""
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(n_docs).astype(np.int64) for _ in range(epochs)]
    return np.concatenate(perms) if perms else np.zeros(0, dtype=np.int64)


def build_sample_index(doc_lengths: np.ndarray, order: np.ndarray, seq_len: int,
                       *, use_native: bool | None = None) -> np.ndarray:
    """(S + 1, 2) int64 sample index; (0, 2) when the stream is empty. See the module doc.

    doc_lengths: (D,) tokens per document, EOS included; order: (N,) values in [0, D).
    """
    doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
    order = np.asarray(order, dtype=np.int64)
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    if len(order) and (order.min() < 0 or order.max() >= len(doc_lengths)):
        raise ValueError(f"order holds document ids outside [0, {len(doc_lengths)})")
    if len(doc_lengths) and doc_lengths.min() < 0:
        raise ValueError("doc_lengths must be >= 0")
    total = int(doc_lengths[order].sum()) if len(order) else 0
    n_rows = (total - 1) // seq_len + 1 if total > 0 else 0
    if use_native is None:
        use_native = native.available()
    if use_native:
        return native.sample_index(doc_lengths, order, seq_len, n_rows)
    return build_sample_index_numpy(doc_lengths, order, seq_len, n_rows)


def build_sample_index_numpy(doc_lengths: np.ndarray, order: np.ndarray, seq_len: int, n_rows: int) -> np.ndarray:
    lengths = doc_lengths[order]  # (N,) in reading order
    ends = np.cumsum(lengths)  # (N,) stream position just after each document
    pos = np.arange(n_rows, dtype=np.int64) * seq_len  # (R,)
    k = np.searchsorted(ends, pos, side="right")  # first document ending after pos
    out = np.empty((n_rows, 2), dtype=np.int64)
    out[:, 0] = k
    out[:, 1] = pos - (ends[k] - lengths[k])
    return out


class PackedSamples:
    """Samples of ``seq_len + 1`` tokens (and their flags) over a ``ShardSet``, in a seeded order."""

    def __init__(self, shard_set, seq_len: int, seed: int, epochs: int = 1):
        self.shards = shard_set
        self.seq_len = seq_len
        self.order = document_order(shard_set.n_docs, seed, epochs)  # (N,)
        self.index = build_sample_index(shard_set.doc_lengths, self.order, seq_len)  # (S + 1, 2)

    def __len__(self) -> int:
        return max(len(self.index) - 1, 0)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(seq_len + 1,) int64 tokens and (seq_len + 1,) uint8 flags of sample ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        (k, off), (k_end, off_end) = self.index[i], self.index[i + 1]
        tokens, flags = [], []
        for pos in range(k, k_end + 1):
            doc_tokens, doc_flags = self.shards.document(int(self.order[pos]))
            lo = off if pos == k else 0
            hi = off_end + 1 if pos == k_end else len(doc_tokens)
            tokens.append(doc_tokens[lo:hi])
            flags.append(doc_flags[lo:hi])
        return np.concatenate(tokens).astype(np.int64), np.concatenate(flags)

    def positions(self, i: int) -> np.ndarray:
        """(seq_len + 1,) int64: where each token of sample ``i`` sits in the shard set (its
        index in the concatenation of every document, ``ShardSet.doc_starts``), the same in
        every epoch whatever the packing order: a token's identity across epochs."""
        (k, off), (k_end, off_end) = self.index[i], self.index[i + 1]
        pieces = []
        for pos in range(k, k_end + 1):
            doc = int(self.order[pos])
            start, length = int(self.shards.doc_starts[doc]), int(self.shards.doc_lengths[doc])
            lo = off if pos == k else 0
            hi = off_end + 1 if pos == k_end else length
            pieces.append(np.arange(start + lo, start + hi, dtype=np.int64))
        return np.concatenate(pieces)
