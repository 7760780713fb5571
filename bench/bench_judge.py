"""Labeling cost per token: spaCy's fact proxy vs the judges of ``prepare --judge`` (the paper's Table 2).

    python bench/bench_judge.py [--docs 1000] [--hf-docs 12] [--gpt2-docs 1] [--hf DIR --hf-name NAME]

Providers, on the same built-in biographies, each in this one process with one thread (a
worker of ``prepare`` is one such process), timed in CPU seconds of this process
(``time.process_time``), so a row's ``tokens_per_core_s`` is subword tokens per second of
one CPU core:
- ``spacy``: ``FactLabeler`` as ``prepare`` runs it by default (tokenization, spaCy's
  tagger, projection);
- ``oracle``: the perfect judge of the synthetic corpus (``--judge oracle:FACTS``);
- ``hf-tiny``: ``--judge hf:DIR`` with the 1-layer, 32-wide randomly initialised GPT-2 the
  tests build, on a byte-level BPE trained here on the biographies and English prose (the
  plumbing's cost, not an LLM's);
- ``hf-gpt2-small``: the same judge with a randomly initialised GPT-2 small shape (12
  layers, 768 wide: 124M parameters with GPT-2's 50k vocabulary, 89M with the 8k BPE
  trained here): what a GPT-2-small-sized judge costs per forward token on this CPU,
  whatever its answers;
- ``hf:NAME``: a local model passed with ``--hf DIR`` (e.g. an instruction-tuned LLM).
The judges' cost is also given as what they do: questions (words asked) per token and
judge-model forward tokens per question and per text token; the cost of an LLM judge is
close to (forward tokens per text token) x (its cost per forward token). Precision and
recall of each provider's flags against the oracle's say how well it finds the facts.

Times exclude loading (spaCy pipeline, judge model) and one warm-up batch.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lacy_fast.data.labeling import single_threaded  # noqa: E402

single_threaded()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_labeling import real_english  # noqa: E402
from harness import env_info, print_table, record  # noqa: E402

from lacy_fast.config import JudgeConfig, LabelConfig, TokenizerConfig  # noqa: E402
from lacy_fast.data import synth  # noqa: E402
from lacy_fast.data.judge import OracleJudge, judge_documents, load_judge  # noqa: E402
from lacy_fast.data.labeling import FactLabeler  # noqa: E402
from lacy_fast.data.tokenizer import Tokenizer  # noqa: E402


def make_gpt2(directory: Path, texts: list[str], n_layer: int, d_model: int, vocab: int) -> int:
    """A randomly initialised GPT-2 on a byte-level BPE of ``vocab`` pieces trained on ``texts``."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=d_model, n_layer=n_layer,
                                       n_head=max(2, d_model // 64), bos_token_id=0, eos_token_id=0))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def timed(fn, warmup, batches) -> tuple[list, float, float]:
    fn(warmup)
    c0, w0 = time.process_time(), time.perf_counter()
    out = [x for batch in batches for x in fn(batch)]
    return out, time.process_time() - c0, time.perf_counter() - w0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=1000, help="documents labeled by spacy and the oracle")
    parser.add_argument("--hf-docs", type=int, default=12, help="documents labeled by hf-tiny (and --hf)")
    parser.add_argument("--gpt2-docs", type=int, default=1, help="documents labeled by hf-gpt2-small (0: skip)")
    parser.add_argument("--vocab-size", type=int, default=8000, help="our SentencePiece vocabulary")
    parser.add_argument("--hf", metavar="DIR", help="also time this local Hugging Face causal LM as the judge")
    parser.add_argument("--hf-name", default=None, help="its name in the rows (default: the directory name)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to bench/results")
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth.write(tmp, args.docs, seed=0, heldout=0.0)
        texts = [json.loads(line)["text"] for line in (tmp / "corpus.jsonl").open()]
        tok = Tokenizer.train(texts, TokenizerConfig(vocab_size=args.vocab_size), tmp / "bench.model")
        ids = [np.array(tok.encode(t), dtype=np.uint32) for t in texts]
        oracle = OracleJudge(str(tmp / "facts.jsonl"))
        truth = judge_documents(oracle, tok, texts, ids, None, "all")

        def batches(n, size):
            return [list(range(lo, min(lo + size, n))) for lo in range(0, n, size)]

        labeler = FactLabeler(LabelConfig(), tok)
        labels, cpu, wall = timed(lambda b: labeler.label_batch([texts[i] for i in b]), list(range(64)),
                                  batches(len(texts), 64))
        spacy_flags = [(f[:-1] & 1) != 0 for _, f in labels]
        rows.append(_row("spacy", "tok2vec+tagger", spacy_flags, truth, ids, cpu, wall, 0, 0))
        flags, cpu, wall = timed(lambda b: judge_documents(oracle, tok, [texts[i] for i in b], [ids[i] for i in b],
                                                           None, "all"), list(range(64)), batches(len(texts), 256))
        rows.append(_row("oracle", "facts.jsonl", flags, truth, ids, cpu, wall, 0, 0))

        judges = [("hf-tiny", 1, 32, 560, args.hf_docs), ("hf-gpt2-small", 12, 768, 8000, args.gpt2_docs)]
        for name, n_layer, d_model, vocab, n_docs in judges:
            if n_docs <= 0:
                continue
            params = make_gpt2(tmp / name, texts[:500] + real_english(10**6), n_layer, d_model, vocab)
            rows.append(_hf_row(name, f"random GPT-2 {n_layer}x{d_model}, {params / 1e6:.1f}M params",
                                tmp / name, tok, texts, ids, truth, n_docs))
        if args.hf:
            rows.append(_hf_row(f"hf:{args.hf_name or Path(args.hf).name}", args.hf, Path(args.hf), tok, texts, ids,
                                truth, args.hf_docs))

    spacy = rows[0]
    for row in rows:
        row["cost_vs_spacy"] = spacy["tokens_per_core_s"] / row["tokens_per_core_s"]
        row["vocab_size"] = args.vocab_size
    columns = ["provider", "model", "docs", "tokens", "tokens_per_core_s", "core_hours_per_billion_tokens",
               "cost_vs_spacy", "questions_per_token", "forward_tokens_per_question", "forward_tokens_per_token",
               "flagged", "precision", "recall"]
    print_table(rows, columns)
    if not args.no_record:
        print(f"rows appended to {record('judge', rows, env_info('cpu'))}")


def _hf_row(name, model_name, directory, tok, texts, ids, truth, n_docs) -> dict:
    judge = load_judge(JudgeConfig(spec=f"hf:{directory}"))
    judge.model.eval()
    judge_documents(judge, tok, texts[-1:], ids[-1:], None, "all")  # warm-up
    judge.questions = judge.forward_tokens = 0
    docs = list(range(n_docs))
    flags, cpu, wall = timed(lambda b: judge_documents(judge, tok, [texts[i] for i in b], [ids[i] for i in b], None,
                                                       "all"), [], [[i] for i in docs])
    return _row(name, model_name, flags, truth[:n_docs], ids[:n_docs], cpu, wall, judge.questions,
                judge.forward_tokens)


def _row(provider, model, flags, truth, ids, cpu, wall, questions, forward) -> dict:
    n_tokens = sum(len(i) for i in ids)
    got, want = np.concatenate(flags), np.concatenate(truth)
    return {
        "provider": provider, "model": model, "docs": len(ids), "tokens": n_tokens, "cpu_seconds": cpu,
        "seconds": wall, "tokens_per_core_s": n_tokens / cpu,
        "core_hours_per_billion_tokens": cpu / 3600 / n_tokens * 1e9,
        "questions_per_token": questions / n_tokens if questions else None,
        "forward_tokens_per_question": forward / questions if questions else None,
        "forward_tokens_per_token": forward / n_tokens if forward else None,
        "flagged": float(got.mean()), "precision": float((got & want).sum() / max(got.sum(), 1)),
        "recall": float((got & want).sum() / max(want.sum(), 1)),
    }


if __name__ == "__main__":
    main()
