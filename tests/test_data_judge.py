"""The judge step of `lacy-fast prepare`: flag bit 1 from the oracle and from a Hugging Face causal LM."""
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from lacy_fast import cli
from lacy_fast.config import JudgeConfig
from lacy_fast.data import synth
from lacy_fast.data.judge import OracleJudge, judge_documents, load_judge, passage_cuts, word_spans
from lacy_fast.data.shards import ShardSet, shard_paths
from lacy_fast.data.tokenizer import Tokenizer
from helpers import byte_bpe, save_hf, tiny_gpt2

CLI = [sys.executable, "-m", "lacy_fast.cli"]
SMALL = ["--vocab-size", "400", "--quiet", "shard_docs=30"]


def prepare(*args):
    return subprocess.run(CLI + ["prepare", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth.write(out, 90, seed=3)
    return out


@pytest.fixture(scope="module")
def plain(corpus, tmp_path_factory):
    """A prepared directory without a judge: bit 1 is clear everywhere."""
    out = tmp_path_factory.mktemp("plain") / "out"
    proc = prepare("--input", corpus / "corpus.jsonl", "--out", out, "--workers", 2, *SMALL)
    assert proc.returncode == 0, proc.stderr
    return out


def texts_of(corpus):
    return [json.loads(line)["text"] for line in (corpus / "corpus.jsonl").open()]


def value_regex(corpus):
    """Every fact value of facts.jsonl as a whole-word match, longest first (leftmost-longest)."""
    values = {v for line in (corpus / "facts.jsonl").open() for v in json.loads(line)["facts"].values()}
    alternatives = "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))
    return re.compile(rf"(?<![^\W_])(?:{alternatives})(?![^\W_])")


def piece_spans(tok, ids, text):
    """(starts, ends) of each subword's characters, leading whitespace excluded, from the decoded
    pieces: independent of the tokenizer's offsets and of labeling.project."""
    pieces = tok.decode_pieces(ids)
    assert "".join(pieces) == text
    ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
    starts = ends - np.array([len(p.lstrip()) for p in pieces], dtype=np.int64)
    return starts, ends


def expected_flags(tok, ids, text, words, first=False):
    """(T,) bool: subwords overlapping one of ``words`` (character spans): all of them, or the
    first one of each word."""
    out = np.zeros(len(ids), dtype=bool)
    seen = set()
    for k, (start, end) in enumerate(zip(*piece_spans(tok, ids, text))):
        hit = [w for w, (a, b) in enumerate(words) if a < end and start < b and start < end]
        if hit and (not first or hit[0] not in seen):
            out[k] = True
            seen.add(hit[0])
    return out


def value_words(text, regex):
    """The words of every value occurrence in ``text``, as character spans."""
    return [(m.start() + w.start(), m.start() + w.end()) for m in regex.finditer(text)
            for w in re.finditer(r"[^\W_]+", m.group())]


def bits(directory):
    shards = ShardSet(directory)
    flags = np.concatenate([np.array(s.flags) for s in shards.shards])
    return flags & 1, (flags >> 1) & 1


def stats_of(directory):
    return json.loads((directory / "stats.json").read_text())


# -- the oracle --------------------------------------------------------------------------------


def test_oracle_flags_exactly_the_value_tokens_without_redoing_spacy(plain, corpus, tmp_path):
    out = tmp_path / "judged"
    shutil.copytree(plain, out)
    spacy_stats = {p.name: p.read_bytes() for p in out.glob("shard_*.stats.json")}
    args = ["--input", corpus / "corpus.jsonl", "--out", out, "--workers", 2, *SMALL]
    proc = prepare(*args, "--judge", f"oracle:{corpus / 'facts.jsonl'}")
    assert proc.returncode == 0, proc.stderr
    stats = stats_of(out)
    assert stats["resumed_shards"] == 3 and stats["tokens_this_run"] == 0  # spaCy was not run again
    assert {p.name: p.read_bytes() for p in out.glob("shard_*.stats.json")} == spacy_stats

    fact, judge = bits(out)
    assert np.array_equal(fact, bits(plain)[0])  # bit 0 untouched
    tok = Tokenizer.load(out / "tokenizer.model")
    shards = ShardSet(out)
    regex = value_regex(corpus)
    expected = []
    for i, text in enumerate(texts_of(corpus)):
        ids, flags = shards.document(i)
        want = expected_flags(tok, ids[:-1], text, value_words(text, regex))
        got = (flags[:-1] & 2) != 0
        assert np.array_equal(got, want), f"document {i}"
        assert flags[-1] == 0
        expected.append(want)
    expected = np.concatenate(expected)
    assert 0.1 < expected.mean() < 0.5  # values are a real share of the text, and far from all of it
    assert stats["judge_tokens"] == int(judge.sum()) == int(expected.sum())
    assert stats["judge_fraction"] == pytest.approx(judge.sum() / len(judge))
    assert stats["judge"].startswith("oracle:") and stats["judge_shards_this_run"] == 3
    for key in ("judge_cpu_seconds", "judge_tokens_per_core_s", "spacy_cpu_seconds", "spacy_tokens_per_core_s"):
        assert stats[key] > 0, key
    # The perfect judge costs a small fraction of spaCy's labeling.
    assert stats["judge_tokens_per_core_s"] > 3 * stats["spacy_tokens_per_core_s"]

    shown = prepare("--show", out, "--docs", 1)
    assert shown.returncode == 0, shown.stderr
    assert f"{stats['judge_fraction']:.1%} judge tokens {{{{...}}}}" in shown.stdout
    body = shown.stdout.split("\n--- ")[1]
    assert body.count("{{") >= 5 and body.count("{{") == body.count("}}") and "[[" in body


def test_judge_step_resumes_per_shard_and_none_clears_it(plain, corpus, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(plain, out)
    args = ["--input", corpus / "corpus.jsonl", "--out", out, "--workers", 1, *SMALL]
    oracle = ["--judge", f"oracle:{corpus / 'facts.jsonl'}"]
    assert prepare(*args, *oracle).returncode == 0
    judged = bits(out)[1]
    mtimes = {p.name: p.stat().st_mtime_ns for p in shard_paths(out)}

    again = prepare(*args, *oracle)  # nothing to do
    assert again.returncode == 0 and stats_of(out)["judge_shards_this_run"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in shard_paths(out)} == mtimes

    (out / "shard_00001.judge.json").unlink()  # as if killed between the shard and its marker
    (out / "shard_00002.bin").unlink()  # a shard prepare must label again: its bit 1 is clear
    assert prepare(*args, *oracle).returncode == 0
    stats = stats_of(out)
    assert stats["judge_shards_this_run"] == 2 and stats["resumed_shards"] == 2
    assert np.array_equal(bits(out)[1], judged)
    assert stats["judge_tokens"] == int(judged.sum())

    cleared = prepare(*args)  # --judge none: bit 1 goes, bit 0 stays
    assert cleared.returncode == 0, cleared.stderr
    fact, judge = bits(out)
    assert not judge.any() and np.array_equal(fact, bits(plain)[0])
    assert not list(out.glob("*.judge.json"))
    assert stats_of(out)["judge_tokens"] == 0 and stats_of(out)["judge_cleared_shards"] == 3


def test_oracle_first_subword_mode(plain, corpus):
    tok = Tokenizer.load(plain / "tokenizer.model")
    regex = value_regex(corpus)
    texts = texts_of(corpus)[:12]
    ids = [np.array(tok.encode(t), dtype=np.uint32) for t in texts]
    judge = OracleJudge(str(corpus / "facts.jsonl"))
    for mode in ("all", "first"):
        got = judge_documents(judge, tok, texts, ids, None, mode)
        for t, i, g in zip(texts, ids, got):
            assert np.array_equal(g, expected_flags(tok, i, t, value_words(t, regex), first=mode == "first"))
    assert sum(g.sum() for g in got) < sum(expected_flags(tok, i, t, value_words(t, regex)).sum()
                                           for t, i in zip(texts, ids))  # multi-piece values exist


# -- the Hugging Face judge --------------------------------------------------------------------


def make_judge_model(directory, n_positions=1024, merges=300):
    """A randomly initialised 1-layer GPT-2 on a small byte-level BPE trained here (no download)."""
    hf_tok = byte_bpe([ts[0] for _, ts, _ in synth.generate(100, seed=4, heldout=0.0)], merges)
    model = tiny_gpt2(len(hf_tok), n_positions=n_positions, n_embd=32, bos_token_id=0, eos_token_id=0)
    return save_hf(directory, model, hf_tok)


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return make_judge_model(tmp_path_factory.mktemp("judge"))


def naive_scores(judge, text, words, limit):
    """One full forward per word (no cache, no batch, no padding) on the same passages."""
    cuts = passage_cuts(text, limit)
    which = np.searchsorted(cuts, words[:, 0], side="right") - 1
    out = []
    for k in range(len(words)):
        prefix = judge.prefix_ids(text[cuts[which[k]]:cuts[which[k] + 1]])
        with torch.no_grad():
            logits = judge.model(input_ids=torch.tensor([prefix + judge.question_ids(text, words, k)])).logits[0, -1]
        out.append(float(judge.answer.margin(logits)))
    return np.array(out)


def test_hf_batched_scores_equal_one_question_at_a_time(judge_dir, corpus):
    judge = load_judge(JudgeConfig(spec=f"hf:{judge_dir}", context_chars=100, batch_size=5))
    text = " ".join(re.split(r"(?<=\.) ", texts_of(corpus)[0])[:4])
    words = word_spans(text)
    assert len(passage_cuts(text, 100)) > 3  # several passages, batches of mixed question lengths
    before = judge.forward_tokens
    scores = judge.scores(text, words)
    np.testing.assert_allclose(scores, naive_scores(judge, text, words, 100), atol=1e-5)
    assert judge.questions == len(words) and judge.forward_tokens - before > 5 * len(words)
    assert np.ptp(scores) > 0  # a random model still answers differently per word


def test_hf_passages_halve_to_fit_a_short_context(tmp_path, corpus):
    short = make_judge_model(tmp_path / "short", n_positions=360)
    judge = load_judge(JudgeConfig(spec=f"hf:{short}", context_chars=1000, batch_size=8))
    fed = []
    batch = judge.score_batch
    judge.score_batch = lambda prefix, questions: fed.append(len(prefix) + max(map(len, questions))) or batch(
        prefix, questions)
    text = texts_of(corpus)[1]
    words = word_spans(text)
    scores = judge.scores(text, words)  # GPT-2 fails on positions past n_positions
    assert len(scores) == len(words) and np.all(scores != 0)
    assert max(fed) <= 360 and len(fed) > 3


def test_hf_flags_land_on_the_words_the_judge_says_yes_to(judge_dir, corpus, plain, tmp_path):
    docs = [" ".join(re.split(r"(?<=\.) ", t)[:2]) for t in texts_of(corpus)[:8]]  # two sentences each
    (tmp_path / "docs.txt").write_text("\n\n".join(docs) + "\n")
    cfg = JudgeConfig(spec=f"hf:{judge_dir}", context_chars=120)
    judge = load_judge(cfg)
    scores = [judge.scores(d, word_spans(d)) for d in docs]
    flat = np.sort(np.concatenate(scores))
    middle = flat[len(flat) // 4: 3 * len(flat) // 4]
    k = int(np.argmax(np.diff(middle)))  # the widest gap in the middle half: no score near the threshold
    threshold = float((middle[k] + middle[k + 1]) / 2)

    out = tmp_path / "out"
    proc = prepare("--input", tmp_path / "docs.txt", "--out", out, "--tokenizer", plain / "tokenizer.model",
                   "--workers", 1, "--judge", f"hf:{judge_dir}", "judge.context_chars=120",
                   f"judge.threshold={threshold!r}", "judge.batch_size=7", "shard_docs=4")
    assert proc.returncode == 0, proc.stderr
    tok = Tokenizer.load(out / "tokenizer.model")
    shards = ShardSet(out)
    yes_total = 0
    for i, (doc, s) in enumerate(zip(docs, scores)):
        ids, flags = shards.document(i)
        yes = [tuple(w) for w, v in zip(word_spans(doc), s) if v > threshold]
        yes_total += len(yes)
        assert np.array_equal((flags[:-1] & 2) != 0, expected_flags(tok, ids[:-1], doc, yes)), f"document {i}"
    n_words = sum(len(word_spans(d)) for d in docs)
    assert 0 < yes_total < n_words
    stats = stats_of(out)
    assert stats["judge_questions"] == n_words and stats["judge_forward_tokens"] > 5 * n_words
    assert stats["judge_tokens"] == sum(int(np.count_nonzero(s.flags & 2)) for s in shards.shards) > 0
    assert stats["judge_tokens_per_core_s"] > 0 and stats["judge_identity"]["kind"] == "hf"
    progress = [line for line in proc.stderr.splitlines() if line.startswith("judge hf")]
    assert progress and "tokens/s" in progress[-1] and "8/8 docs" in progress[-1]


def test_hf_known_answers_project_onto_words_and_candidates(judge_dir, plain, corpus):
    """A judge whose answers are known (yes to capitalised words): flags are exactly those words'
    subwords; with candidates=spacy only words holding a spaCy fact token are asked."""
    tok = Tokenizer.load(plain / "tokenizer.model")
    shards = ShardSet(plain)
    texts = texts_of(corpus)[:6]
    ids = [shards.document(i)[0][:-1] for i in range(6)]
    facts = [shards.document(i)[1][:-1] for i in range(6)]
    for candidates in ("words", "spacy"):
        judge = load_judge(JudgeConfig(spec=f"hf:{judge_dir}", candidates=candidates))
        asked = []

        def scores(text, words):
            asked.append(len(words))
            return np.array([1.0 if text[a].isupper() else -1.0 for a, _ in words])

        judge.scores = scores
        for mode in ("all", "first"):
            asked.clear()
            got = judge_documents(judge, tok, texts, ids, facts, mode)
            for text, i, f, g in zip(texts, ids, facts, got):
                words = [tuple(w) for w in word_spans(text)]
                if candidates == "spacy":  # words overlapping a subword with a spaCy fact flag
                    starts, ends = piece_spans(tok, i, text)
                    fact = (f & 1) != 0
                    words = [(a, b) for a, b in words if np.any((starts[fact] < b) & (a < ends[fact]))]
                yes = [(a, b) for a, b in words if text[a].isupper()]
                assert np.array_equal(g, expected_flags(tok, i, text, yes, first=mode == "first"))
            n_words = sum(len(word_spans(t)) for t in texts)
            assert (sum(asked) == n_words) == (candidates == "words") and sum(asked) > 0


# -- refusals ----------------------------------------------------------------------------------


def test_bad_judge_specs_are_one_sentence_before_any_work(tmp_path, corpus, judge_dir, capsys):
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text('{"model_type": "vit"}')
    (tmp_path / "noweights").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(judge_dir / name, tmp_path / "noweights" / name)
    cases = [
        ("hf:" + str(tmp_path / "missing"), "is not a directory"),
        ("hf:" + str(corpus), "is not a Hugging Face model"),
        ("hf:" + str(tmp_path / "vit"), "not a causal LM"),
        ("hf:" + str(tmp_path / "noweights"), "holds no model weights"),
        ("oracle:" + str(tmp_path / "facts.jsonl"), "does not exist"),
        ("oracle:" + str(corpus / "corpus.jsonl"), "is not a row of the built-in fact table"),
        ("judge-me", "is not a judge"),
    ]
    for spec, words in cases:
        out = tmp_path / "out"
        code = cli.main(["prepare", "--input", str(corpus / "corpus.jsonl"), "--out", str(out), "--judge", spec,
                         "--quiet"])
        err = capsys.readouterr().err
        assert code == 2, (spec, err)
        assert err.count("\n") == 1 and words in err and "Traceback" not in err, (spec, err)
        assert not out.exists(), spec  # refused before any labeling
