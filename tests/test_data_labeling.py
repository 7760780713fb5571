"""Fact labels: projection onto subwords (numpy and native), spaCy components, purity."""
import dataclasses
import os
import shutil

import numpy as np
import pytest

from lacy_fast.config import LabelConfig
from lacy_fast.data import native
from lacy_fast.data.labeling import (FLAG_FACT, FactLabeler, LabelStats, agreement, load_spacy, project,
                                     project_numpy)
from lacy_fast.data.synth import generate
from helpers import train_small

needs_native = pytest.mark.skipif(not native.available(), reason=f"native helpers not loaded: {native.load_error}")


def arr(*xs):
    return np.array(xs, dtype=np.int64)


# -- projection ---------------------------------------------------------------------------

def test_projection_all_and_first_by_hand():
    # Text "ab Warsawian x": fact word "Warsawian" = [3, 12) split into 3 subwords, plus
    # a token that straddles the word end and a token spanning nothing (whitespace piece).
    ws, we = arr(3), arr(12)
    ts = arr(0, 3, 3, 6, 9, 11, 13, 14)
    te = arr(2, 3, 6, 9, 11, 14, 13, 15)
    all_ = project_numpy(ws, we, ts, te, first_only=False)
    first = project_numpy(ws, we, ts, te, first_only=True)
    assert all_.tolist() == [-1, -1, 0, 0, 0, 0, -1, -1]
    assert first.tolist() == [-1, -1, 0, -1, -1, -1, -1, -1]


def test_projection_token_over_two_words_takes_the_first():
    ws, we = arr(0, 2), arr(1, 4)  # "1" and "234" of "1,234"
    ts, te = arr(0, 3), arr(3, 4)  # pieces "1,2" and "34"
    assert project_numpy(ws, we, ts, te, False).tolist() == [0, 1]
    assert project_numpy(ws, we, ts, te, True).tolist() == [0, 1]


def _random_case(rng, n_words, n_tokens, text_len=400):
    cuts = np.sort(rng.choice(np.arange(1, text_len), size=2 * n_words, replace=False))
    ws, we = cuts[0::2].astype(np.int64), cuts[1::2].astype(np.int64)
    ts = np.sort(rng.integers(0, text_len, n_tokens)).astype(np.int64)
    te = np.minimum(ts + rng.integers(0, 8, n_tokens), text_len).astype(np.int64)
    return ws, we, ts, te


@needs_native
@pytest.mark.parametrize("first", [False, True])
def test_native_projection_is_bit_identical(first):
    rng = np.random.default_rng(0)
    cases = [_random_case(rng, rng.integers(0, 60), rng.integers(0, 300)) for _ in range(200)]
    cases += [(arr(), arr(), arr(), arr()), (arr(), arr(), arr(0, 1), arr(1, 2)), (arr(0), arr(5), arr(), arr()),
              (arr(0), arr(10), arr(0, 0, 10), arr(10, 10, 10))]
    for ws, we, ts, te in cases:
        expected = project_numpy(ws, we, ts, te, first)
        got = native.project(ws, we, ts, te, first)
        assert got.dtype == expected.dtype and np.array_equal(got, expected)
    assert np.array_equal(project(*cases[0], "first" if first else "all", use_native=True),
                          project(*cases[0], "first" if first else "all", use_native=False))


def test_native_library_is_built_when_a_toolchain_exists():
    if os.environ.get("LACY_FAST_NO_NATIVE") == "1":
        pytest.skip("LACY_FAST_NO_NATIVE=1")
    if not shutil.which("cmake") or not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("no CMake or C++ compiler: the numpy fallback is expected")
    assert native.available(), f"CMake and a compiler are present but the native helpers did not load: {native.load_error}"


# -- labeling with spaCy -----------------------------------------------------------------

TRICKY = [
    "Maria Kowalska-Wiśniewska was born in Przybyszewskiwice on 3 May 1901.",
    "O'Neil-Smith paid 1,234.5 dollars   to   the  Zürich office in 1999.",
    "Nothing to see here, just words.",
    "It was 42.",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_small(tmp_path_factory.mktemp("tok"), seed=3)


@pytest.fixture(scope="module")
def labeler(tok):
    return FactLabeler(LabelConfig(), tok)


def _fact_text(tok, ids, flags):
    pieces = tok.decode_pieces(ids)
    return "".join(p if f & FLAG_FACT else "|" for p, f in zip(pieces, flags))


def test_default_rule_loads_only_what_it_needs(labeler):
    names = labeler.nlp.pipe_names
    assert "parser" not in names and "lemmatizer" not in names and "ner" not in names
    assert "tagger" in names and "attribute_ruler" not in names  # replaced by the tag lookup
    assert labeler.tags == {"PROPN": ("NNP", "NNPS"), "NUM": ("CD",)}


def test_labels_on_tricky_text(labeler, tok):
    out = labeler.label_batch(TRICKY)
    assert len(out) == len(TRICKY)
    for (ids, flags), text in zip(out, TRICKY):
        assert ids.dtype == np.uint32 and flags.dtype == np.uint8 and ids.shape == flags.shape
        assert ids[-1] == tok.eos_id and flags[-1] == 0
        assert tok.decode(ids[:-1]) == text
    facts0 = _fact_text(tok, *out[0])
    # Every subword of a many-piece name and of the numbers is a fact token.
    for word in ("Maria", "Kowalska", "Przybyszewskiwice", "1901"):
        assert word in facts0, facts0
    assert "born" not in facts0
    n_pieces = len(tok.encode(" Przybyszewskiwice"))
    assert n_pieces >= 3
    facts1 = _fact_text(tok, *out[1])
    assert "1,234.5" in facts1 and "Zürich" in facts1 and "1999" in facts1, facts1
    assert "dollars" not in facts1
    assert not out[2][1].any()
    # Whitespace pieces are never facts.
    for ids, flags in out:
        pieces = tok.decode_pieces(ids)
        assert not any(f and p.isspace() for p, f in zip(pieces, flags))


def test_first_subword_mode_flags_one_token_per_word(tok, labeler):
    first = FactLabeler(dataclasses.replace(LabelConfig(), subwords="first"), tok, labeler.nlp)
    (ids, f_all), = labeler.label_batch(TRICKY[:1])
    (_, f_first), = first.label_batch(TRICKY[:1])
    assert 0 < f_first.sum() < f_all.sum()
    assert np.all(f_first <= f_all)
    # Of a word split into many subwords, exactly its first piece stays a fact in "first" mode.
    text = TRICKY[0]
    _, starts, ends = tok.encode_with_offsets(text)
    lo = text.index("Przybyszewskiwice")
    inside = (starts >= lo) & (ends <= lo + len("Przybyszewskiwice")) & (ends > starts)
    assert inside.sum() >= 3
    assert f_all[:-1][inside].all() and f_first[:-1][inside].tolist() == [1] + [0] * (inside.sum() - 1)


def test_label_batch_is_pure_across_batching(labeler):
    """The online prefetcher labels other batch compositions: the result must not change."""
    texts = [ts[0] for _, ts, _ in generate(12, seed=4, heldout=0.0)] + TRICKY
    together = labeler.label_batch(texts)
    alone = [labeler.label_batch([t])[0] for t in reversed(texts)][::-1]
    for (a_ids, a_f), (b_ids, b_f) in zip(together, alone):
        assert np.array_equal(a_ids, b_ids) and np.array_equal(a_f, b_f)


def test_tag_lookup_agrees_with_the_full_pipeline(tok, labeler):
    full = FactLabeler(LabelConfig(), tok, load_spacy(full=True))
    assert "attribute_ruler" in full.nlp.pipe_names and full.tags is None
    texts = [ts[0] for _, ts, _ in generate(40, seed=5, heldout=0.0)] + TRICKY
    assert agreement(labeler.label_batch(texts), full.label_batch(texts)) == 1.0


def test_entity_rule_loads_ner_and_counts_types(tok):
    cfg = dataclasses.replace(LabelConfig(), entity_types=("all",))
    assert len(cfg.entity_types) == 18
    lab = FactLabeler(cfg, tok)
    assert "ner" in lab.nlp.pipe_names and "parser" not in lab.nlp.pipe_names
    stats = LabelStats()
    out = lab.label_batch(TRICKY, stats)
    d = stats.to_dict()
    assert d["documents"] == 4 and d["tokens"] == sum(len(i) for i, _ in out)
    assert d["fact_tokens"] == sum(int(f.sum()) for _, f in out)
    assert sum(d["fact_tokens_by_pos"].values()) == d["fact_tokens"]
    assert sum(d["fact_tokens_by_entity"].values()) == d["fact_tokens"]
    assert d["fact_tokens_by_entity"].get("DATE", 0) > 0 and d["fact_tokens_by_pos"]["PROPN"] > 0


def test_empty_batch(labeler):
    assert labeler.label_batch([]) == []
