"""Shards: round trip, memmap reading, refusal of other tokenizers, versions and torn files."""
import re
import struct

import numpy as np
import pytest

from lacy_fast.data import shards as S
from lacy_fast.errors import UserError

SHA = "ab" * 32
OTHER = "cd" * 32


def _docs(rng, n, vocab):
    docs = []
    for _ in range(n):
        length = int(rng.integers(1, 50))
        ids = rng.integers(0, vocab, length).astype(np.uint32)
        flags = rng.integers(0, 4, length).astype(np.uint8)
        docs.append((ids, flags))
    return docs


@pytest.mark.parametrize("vocab, dtype", [(32000, np.uint16), (65536, np.uint16), (70000, np.uint32)])
def test_round_trip(tmp_path, vocab, dtype):
    rng = np.random.default_rng(vocab)
    docs = _docs(rng, 37, vocab)
    path = tmp_path / S.shard_name(0)
    header = S.write_shard(path, docs, SHA, vocab)
    assert path.stat().st_size == header.file_size
    shard = S.Shard(path, expect_sha256=SHA)
    assert shard.tokens.dtype == dtype and isinstance(shard.tokens, np.memmap)
    assert shard.n_docs == 37 and shard.n_tokens == sum(len(d[0]) for d in docs)
    assert shard.header.vocab_size == vocab and shard.header.tokenizer_sha256 == SHA
    for d, (ids, flags) in enumerate(docs):
        got_ids, got_flags = shard.document(d)
        assert np.array_equal(got_ids, ids) and np.array_equal(got_flags, flags)
    assert np.array_equal(shard.doc_lengths, [len(i) for i, _ in docs])
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary name is gone


def test_empty_shard(tmp_path):
    S.write_shard(tmp_path / "shard_00000.bin", [], SHA, 100)
    shard = S.Shard(tmp_path / "shard_00000.bin")
    assert shard.n_docs == 0 and len(shard.tokens) == 0 and shard.doc_offsets.tolist() == [0]


def test_refuses_other_tokenizer_version_truncation_and_junk(tmp_path):
    path = tmp_path / "shard_00000.bin"
    S.write_shard(path, _docs(np.random.default_rng(0), 5, 100), SHA, 100)
    with pytest.raises(UserError, match="another tokenizer") as info:
        S.Shard(path, expect_sha256=OTHER)
    assert "\n" not in str(info.value)
    raw = bytearray(path.read_bytes())
    v2 = tmp_path / "v2.bin"
    v2.write_bytes(bytes(raw[:8]) + struct.pack("<I", 2) + bytes(raw[12:]))
    with pytest.raises(UserError, match="format version 2"):
        S.Shard(v2)
    torn = tmp_path / "torn.bin"
    torn.write_bytes(bytes(raw[:-3]))
    with pytest.raises(UserError, match="truncated"):
        S.Shard(torn)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world" * 20)
    with pytest.raises(UserError, match="not a lacy-fast shard"):
        S.Shard(junk)
    with pytest.raises(UserError, match="does not exist"):
        S.Shard(tmp_path / "nope.bin")


def test_shard_set_checks_every_header_against_the_tokenizer(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"model bytes")
    sha = S.file_sha256(tmp_path / "tokenizer.model")
    rng = np.random.default_rng(1)
    a, b = _docs(rng, 4, 50), _docs(rng, 3, 50)
    S.write_shard(tmp_path / S.shard_name(0), a, sha, 50)
    S.write_shard(tmp_path / S.shard_name(1), b, sha, 50)
    ss = S.ShardSet(tmp_path)
    assert ss.n_docs == 7 and not ss.complete
    assert ss.total_tokens == sum(len(i) for i, _ in a + b)
    assert np.array_equal(ss.doc_lengths, [len(i) for i, _ in a + b])
    assert np.array_equal(ss.document(5)[0], b[1][0])
    S.write_shard(tmp_path / S.shard_name(2), b, OTHER, 50)
    with pytest.raises(UserError, match="another tokenizer"):
        S.ShardSet(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        S.ShardSet(tmp_path / "missing")


def test_sidecar(tmp_path):
    path = tmp_path / "shard_00003.bin"
    S.write_shard(path, _docs(np.random.default_rng(2), 6, 100), SHA, 100)
    shard = S.Shard(path)
    nll = np.arange(shard.n_tokens, dtype=np.float32)
    written = S.write_sidecar(shard, "ref_nll", nll)
    assert written.name == "shard_00003.ref_nll.npy"
    assert np.array_equal(shard.sidecar("ref_nll"), nll)
    np.save(written, nll[:-1])
    with pytest.raises(UserError, match="rows"):
        shard.sidecar("ref_nll")
    with pytest.raises(UserError, match="no 'judge' sidecar"):
        shard.sidecar("judge")


class _Pieces:
    """A stand-in tokenizer for render(): id k decodes to PIECES[k]."""
    PIECES = ["Born", " in", " War", "saw", " on", " 3", " May", "."]

    def decode_pieces(self, ids):
        return [self.PIECES[i] for i in ids]


def test_render_marks_fact_runs():
    flags = np.array([0, 0, 1, 1, 0, 1, 1, 0], dtype=np.uint8)
    text = S.render(_Pieces(), np.arange(8), flags)
    assert text == "Born in [[Warsaw]] on [[3 May]]."


def _corrupt(path, offset, value, dtype):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + np.dtype(dtype).itemsize] = np.array([value], dtype=dtype).tobytes()
    path.write_bytes(bytes(raw))


def test_a_token_id_past_the_vocabulary_is_one_sentence_naming_the_file(tmp_path):
    """Checked lazily, block by block, the first time a read touches the token."""
    path = tmp_path / S.shard_name(0)
    docs = _docs(np.random.default_rng(3), 6, 100)
    S.write_shard(path, docs, SHA, 100)
    bad = len(docs[0][0]) + 1  # a token of document 1
    _corrupt(path, S.HEADER.size + 2 * bad, 40000, np.uint16)
    shard = S.Shard(path)  # opening stays cheap: no full scan
    with pytest.raises(UserError) as info:
        shard.document(1)
    message = str(info.value)
    assert str(path) in message and f"token {bad} has id 40000, past its vocabulary of 100" in message
    assert "\n" not in message
    # One block covers this whole shard: any document's read finds it.
    with pytest.raises(UserError, match="past its vocabulary"):
        S.Shard(path).document(0)


def test_a_negative_document_length_is_one_sentence_at_open(tmp_path):
    path = tmp_path / S.shard_name(0)
    docs = _docs(np.random.default_rng(4), 5, 100)
    header = S.write_shard(path, docs, SHA, 100)
    offsets = np.cumsum([0] + [len(d[0]) for d in docs])
    # Document 2 ends before it starts.
    _corrupt(path, header.offsets_offset + 8 * 3, int(offsets[2]) - 1, np.int64)
    with pytest.raises(UserError) as info:
        S.Shard(path)
    assert str(path) in str(info.value) and "document 2 has a negative length" in str(info.value)
    # Offsets that do not end at the token count.
    S.write_shard(path, docs, SHA, 100)
    _corrupt(path, header.offsets_offset + 8 * 5, int(offsets[5]) + 7, np.int64)
    with pytest.raises(UserError, match=f"offsets run from 0 to {int(offsets[5]) + 7}, not 0 to {int(offsets[5])}"):
        S.Shard(path)


def test_a_token_width_that_does_not_fit_the_vocabulary_is_refused(tmp_path):
    path = tmp_path / S.shard_name(0)
    S.write_shard(path, _docs(np.random.default_rng(5), 3, 100), SHA, 100)
    _corrupt(path, 32, 70000, np.uint32)  # vocab_size: uint16 ids cannot hold it
    with pytest.raises(UserError, match="truncated or corrupt"):
        S.Shard(path)


def test_render_marks_fact_and_judge_runs_that_nest_and_cross():
    # PIECES: "Born", " in", " War", "saw", " on", " 3", " May", "."
    flags = np.array([0, 2, 3, 1, 0, 3, 3, 2], dtype=np.uint8)
    text = S.render(_Pieces(), np.arange(8), flags, marks=S.MARKS)
    assert text == "Born {{in [[War]]}}[[saw]] on [[{{3 May}}]]{{.}}"
    plain = "".join(_Pieces.PIECES)
    assert re.sub(r"\[\[|\]\]|\{\{|\}\}", "", text) == plain
    assert S.render(_Pieces(), np.arange(8), flags) == "Born in [[Warsaw]] on [[3 May]]."
