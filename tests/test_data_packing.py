"""The packed-sample index (numpy and native) and reading samples through it."""
import numpy as np
import pytest

from lacy_fast.data import native
from lacy_fast.data import shards as S
from lacy_fast.data.packing import PackedSamples, build_sample_index, document_order

needs_native = pytest.mark.skipif(not native.available(), reason=f"native helpers not loaded: {native.load_error}")


def _brute(lengths, order, seq_len):
    """Row i = (position in order, offset) of stream token i * seq_len, by walking the stream."""
    stream = [(k, off) for k, d in enumerate(order) for off in range(lengths[d])]
    if not stream:
        return np.zeros((0, 2), dtype=np.int64)
    rows = (len(stream) - 1) // seq_len + 1
    return np.array([stream[i * seq_len] for i in range(rows)], dtype=np.int64)


@pytest.mark.parametrize("use_native", [False, pytest.param(True, marks=needs_native)])
def test_matches_brute_force(use_native):
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(0, 12))
        lengths = rng.integers(0, 9, n)
        order = document_order(n, int(rng.integers(1000)), epochs=int(rng.integers(1, 3)))
        seq_len = int(rng.integers(1, 7))
        got = build_sample_index(lengths, order, seq_len, use_native=use_native)
        assert got.dtype == np.int64 and np.array_equal(got, _brute(lengths, order, seq_len))


@needs_native
def test_native_is_bit_identical_on_large_and_edge_inputs():
    rng = np.random.default_rng(1)
    cases = [
        (rng.integers(1, 2000, 5000), 1024),
        (np.zeros(5, dtype=np.int64), 4),  # nothing to read
        (np.array([1]), 1024),  # shorter than a sample
        (np.array([0, 0, 7, 0, 3]), 2),  # zero-length documents are skipped
        (np.array([10]), 1),
    ]
    for lengths, seq_len in cases:
        order = document_order(len(lengths), 7, epochs=2)
        a = build_sample_index(lengths, order, seq_len, use_native=True)
        b = build_sample_index(lengths, order, seq_len, use_native=False)
        assert np.array_equal(a, b)


def test_bad_arguments():
    with pytest.raises(ValueError, match="seq_len"):
        build_sample_index(np.array([3]), np.array([0]), 0)
    with pytest.raises(ValueError, match="outside"):
        build_sample_index(np.array([3]), np.array([1]), 2)


def test_document_order_is_seeded_permutation():
    a, b = document_order(10, 3, epochs=2), document_order(10, 3, epochs=2)
    assert np.array_equal(a, b) and sorted(a[:10]) == list(range(10)) and not np.array_equal(a[:10], a[10:])


def test_packed_samples_read_the_concatenated_stream(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"m")
    sha = S.file_sha256(tmp_path / "tokenizer.model")
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 30, 20)
    docs = [(rng.integers(0, 100, n).astype(np.uint32), rng.integers(0, 2, n).astype(np.uint8)) for n in lengths]
    S.write_shard(tmp_path / S.shard_name(0), docs[:11], sha, 100)
    S.write_shard(tmp_path / S.shard_name(1), docs[11:], sha, 100)
    samples = PackedSamples(S.ShardSet(tmp_path), seq_len=16, seed=5)
    stream_ids = np.concatenate([docs[d][0] for d in samples.order]).astype(np.int64)
    stream_flags = np.concatenate([docs[d][1] for d in samples.order])
    assert len(samples) == (len(stream_ids) - 1) // 16
    for i in range(len(samples)):
        ids, flags = samples[i]
        assert ids.shape == (17,) and flags.shape == (17,)
        assert np.array_equal(ids, stream_ids[i * 16:i * 16 + 17])
        assert np.array_equal(flags, stream_flags[i * 16:i * 16 + 17])
    with pytest.raises(IndexError):
        samples[len(samples)]
