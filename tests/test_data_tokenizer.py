"""Tokenizer: <CALL> reserved, lossless encoding, character offsets on tricky text."""
import hashlib

import numpy as np
import pytest
import sentencepiece as spm

from lacy_fast.data.synth import generate
from lacy_fast.data.tokenizer import CALL_ID, EOS_ID, Tokenizer
from lacy_fast.errors import UserError
from helpers import train_small

TRICKY = [
    "Zürich  is \n\nbig: 1,234.5 O'Neil-Smith 😀 <CALL> 北京",
    "  leading spaces, a\ttab and trailing spaces   ",
    "ﬁ Ａ x² — “quoted” naïve café façade",
    "Jean-Baptiste d'Alembert paid $1,234,567.89 on 3 May 1901.",
    "a literal ▁ marker and ▁▁ two",
    "Kowalska-Wiśniewska Przybyszewski",
    "",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_small(tmp_path_factory.mktemp("tok"), seed=1)


def test_fixed_ids_and_call_never_matches_text(tok):
    assert (tok.call_id, tok.eos_id, tok.bos_id, tok.unk_id) == (CALL_ID, EOS_ID, -1, 0)
    assert tok.vocab_size == 400 and tok.piece(tok.call_id) == "<CALL>"
    for text in TRICKY + ["<CALL>", "x<CALL>y"]:
        assert tok.call_id not in tok.encode(text)
    assert tok.sha256 == hashlib.sha256(tok.path.read_bytes()).hexdigest()


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_lossless(tok, text):
    # SentencePiece's own marker is the one character it cannot give back: it decodes as a space.
    expected = text.replace("\u2581", " ")
    assert tok.decode(tok.encode(text)) == expected
    assert "".join(tok.decode_pieces(tok.encode(text))) == expected


@pytest.mark.parametrize("text", TRICKY)
def test_offsets_cover_each_piece_without_leading_whitespace(tok, text):
    ids, starts, ends = tok.encode_with_offsets(text)
    assert ids.dtype == np.int32 and starts.dtype == ends.dtype == np.int64
    assert len(ids) == len(starts) == len(ends) == len(tok.encode(text))
    assert np.all(np.diff(starts) >= 0) and np.all(ends >= starts)
    pieces = tok.decode_pieces(ids)
    covered = np.zeros(len(text), dtype=bool)
    for i, s, e, piece in zip(ids, starts, ends, pieces):
        span = text[s:e]
        assert not span[:1].isspace(), (piece, span)
        if tok.sp.is_byte(int(i)):  # every byte piece of a character spans that character
            char = text[s] if e > s else None
            assert (e - s == 1 and piece in ("", char)) or (e == s and (piece.isspace() or piece == "")), (piece, span)
        else:  # (a literal "▁" in the text comes back as a space)
            assert span.replace("\u2581", " ").lstrip() == piece.lstrip(), (piece, span)
        covered[s:e] = True
    # Every non-whitespace character belongs to some piece.
    assert all(covered[k] or text[k].isspace() for k in range(len(text)))


def test_a_long_word_splits_into_many_subwords_with_exact_spans(tok):
    text = "born in Przybyszewskiwice"
    ids, starts, ends = tok.encode_with_offsets(text)
    word_start = text.index("P")
    inside = [(s, e) for s, e in zip(starts, ends) if s >= word_start]
    assert len(inside) >= 3
    assert inside[0][0] == word_start and inside[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(inside, inside[1:]))  # contiguous


def test_load_refuses_bad_files(tmp_path, tok):
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        Tokenizer.load(junk)
    texts = [ts[0] for _, ts, _ in generate(100, seed=2, heldout=0.0)]
    plain = tmp_path / "plain"  # default SentencePiece settings: no <CALL>, NFKC
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(plain), vocab_size=300,
                                   minloglevel=2)
    with pytest.raises(UserError, match="no <CALL> control symbol"):
        Tokenizer.load(f"{plain}.model")
    nfkc = tmp_path / "nfkc"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(nfkc), vocab_size=300,
                                   control_symbols=["<CALL>"], minloglevel=2)
    with pytest.raises(UserError, match="does not reproduce its input"):
        Tokenizer.load(f"{nfkc}.model")
    assert Tokenizer.load(tok.path).sha256 == tok.sha256
