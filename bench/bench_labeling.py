"""Labeling throughput: subword tokens per second per worker process, and label agreement.

    python bench/bench_labeling.py [--docs 1500] [--vocab-size 32000] [--corpus synth real]

Providers, side by side in one run on the same documents, each in this one process with
one thread (a worker of ``prepare`` is one such process):
- ``full``: plain spaCy ``nlp.pipe`` with every component of the pipeline (parser,
  lemmatizer, ...) and the complete proxy (docs/method.md, section 1) read from its output: the 18
  OntoNotes entity types or POS PROPN/NUM. These are the reference labels.
- ``default``: ``FactLabeler`` as ``prepare`` runs it by default: POS PROPN/NUM from the
  tagger alone (tok2vec + tagger, the attribute ruler replaced by a tag lookup).
- ``entities+pos``: the complete proxy (``label.entity_types=all``) with only the
  components it needs (tok2vec, tagger, ner): same labels as ``full``, faster.
- ``ner-only``: entity types alone (``label.pos_tags=[]``).
Each row: tokens/s and words/s (spaCy words), the fraction of tokens labeled as facts, and
agreement with ``full`` (share of tokens with the same fact bit). Times include
tokenization, spaCy and projection; pipeline loading and one warm-up batch are excluded.

Corpora: ``synth`` (the built-in Wikipedia-like biographies) and ``real`` (the English
prose of CPython's ``pydoc_data/topics.py``, split into paragraphs). Goal from the issue:
>= 18,000 tokens/s per core for the default rule, >= 95% agreement with the full pipeline.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lacy_fast.data.labeling import single_threaded  # noqa: E402

single_threaded()

from harness import env_info, print_table, record  # noqa: E402

from lacy_fast.config import ONTONOTES_ENTITY_TYPES, LabelConfig, TokenizerConfig  # noqa: E402
from lacy_fast.data import synth  # noqa: E402
from lacy_fast.data.labeling import FactLabeler, agreement, load_spacy  # noqa: E402
from lacy_fast.data.tokenizer import Tokenizer  # noqa: E402


def real_english(n: int) -> list[str]:
    import pydoc_data.topics as topics

    paras = []
    for text in topics.topics.values():
        paras += [p.strip() for p in text.split("\n\n") if len(p.split()) >= 8]
    return paras[:n]


def synthetic(n: int) -> list[str]:
    return [texts[0] for _, texts, _ in synth.generate(n, seed=0, heldout=0.0)]


def timed_labels(labeler: FactLabeler, texts: list[str]) -> tuple[list, float, int]:
    labeler.label_batch(texts[:labeler.cfg.batch_size])  # warm-up
    t0 = time.perf_counter()
    out = []
    for lo in range(0, len(texts), labeler.cfg.batch_size):
        out += labeler.label_batch(texts[lo:lo + labeler.cfg.batch_size])
    seconds = time.perf_counter() - t0
    words = sum(len(labeler.nlp.tokenizer(t)) for t in texts)
    return out, seconds, words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=1500, help="documents per corpus")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--corpus", nargs="+", default=["synth", "real"], choices=["synth", "real"])
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to bench/results")
    args = parser.parse_args()

    corpora = {"synth": synthetic, "real": real_english}
    rows = []
    base = LabelConfig()
    complete = dataclasses.replace(base, entity_types=ONTONOTES_ENTITY_TYPES)
    rules = {
        "default": base,
        "entities+pos": complete,
        "ner-only": dataclasses.replace(complete, pos_tags=()),
    }
    full_nlp = load_spacy(base.spacy_model, full=True)
    vocab = args.vocab_size
    with tempfile.TemporaryDirectory() as tmp:
        # One tokenizer for both corpora, trained as `prepare` would on their union (the
        # real text alone is too small for a 32k vocabulary).
        tok = Tokenizer.train(synthetic(20_000) + real_english(10**6), TokenizerConfig(vocab_size=vocab),
                              Path(tmp) / "bench.model")
        for name in args.corpus:
            texts = corpora[name](args.docs)
            reference, seconds, words = timed_labels(FactLabeler(complete, tok, full_nlp), texts)
            n_tokens = sum(len(ids) for ids, _ in reference)
            rows.append(_row(name, "full", full_nlp.pipe_names, reference, reference, seconds, words, n_tokens, vocab))
            for rule, cfg in rules.items():
                labeler = FactLabeler(cfg, tok)
                labels, seconds, words = timed_labels(labeler, texts)
                rows.append(_row(name, rule, labeler.nlp.pipe_names, labels, reference, seconds, words, n_tokens, vocab))
    columns = ["corpus", "provider", "docs", "tokens", "tokens_per_s", "words_per_s", "fact_fraction", "agreement",
               "speedup_vs_full"]
    for row in rows:
        full = next(r for r in rows if r["corpus"] == row["corpus"] and r["provider"] == "full")
        row["speedup_vs_full"] = row["tokens_per_s"] / full["tokens_per_s"]
        row["docs"] = args.docs
    print_table(rows, columns)
    if not args.no_record:
        print(f"rows appended to {record('labeling', rows, env_info('cpu'))}")


def _row(corpus, provider, components, labels, reference, seconds, words, n_tokens, vocab) -> dict:
    facts = sum(int((f & 1).sum()) for _, f in labels)
    return {
        "corpus": corpus, "provider": provider, "components": list(components), "vocab_size": vocab,
        "tokens": n_tokens, "seconds": seconds, "tokens_per_s": n_tokens / seconds, "words_per_s": words / seconds,
        "fact_fraction": facts / n_tokens, "agreement": agreement(labels, reference),
    }


if __name__ == "__main__":
    main()
