"""Native C++ helpers vs their numpy twins, side by side (same inputs, same results).

    python bench/bench_native.py

- ``project``: word-to-subword label projection over one labeling batch worth of tokens
  (numpy: a binary search per token + gathers; native: one linear merge).
- ``sample_index``: the packed-sample index over a shard set's documents
  (numpy: cumulative sum + a binary search per sample; native: one linear merge).
Rows: median / p20 / p80 ms per call and the native speedup; results are asserted equal.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import env_info, print_table, record, time_fn  # noqa: E402

from lacy_fast.data import native  # noqa: E402
from lacy_fast.data.labeling import project_numpy  # noqa: E402
from lacy_fast.data.packing import build_sample_index, document_order  # noqa: E402


def projection_case(n_tokens: int, rng: np.random.Generator):
    """Spans like real text: ~4.5 characters per subword, a fact word every ~4 words."""
    tok_len = rng.integers(1, 9, n_tokens)
    tok_end = np.cumsum(tok_len)
    tok_start = tok_end - tok_len + (rng.random(n_tokens) < 0.7)  # most pieces start after a space
    n_words = n_tokens // 5
    word_start = np.sort(rng.choice(int(tok_end[-1]) // 6, n_words, replace=False)) * 6
    word_end = word_start + rng.integers(1, 6, n_words)
    return word_start.astype(np.int64), word_end.astype(np.int64), tok_start.astype(np.int64), tok_end.astype(np.int64)


def main() -> None:
    if not native.available():
        sys.exit(f"native helpers not loaded ({native.load_error}); build them with `pip install -e .`")
    rng = np.random.default_rng(0)
    rows = []
    for n_tokens in (8_000, 1_000_000):  # one 64-document batch; a whole shard
        case = projection_case(n_tokens, rng)
        assert np.array_equal(project_numpy(*case, False), native.project(*case, False))
        for provider, fn in (("numpy", lambda: project_numpy(*case, False)), ("native", lambda: native.project(*case, False))):
            t = time_fn(fn, "cpu", warmup=3, reps=30)
            rows.append({"op": "project", "size": f"{n_tokens} tokens", "provider": provider, "median_ms": t.median_ms,
                         "p20_ms": t.p20_ms, "p80_ms": t.p80_ms})
    for n_docs, seq_len in ((100_000, 1024), (5_000_000, 1024)):  # ~60M and ~3B tokens of documents
        lengths = rng.integers(20, 1200, n_docs)
        order = document_order(n_docs, 1)
        a = build_sample_index(lengths, order, seq_len, use_native=False)
        assert np.array_equal(a, build_sample_index(lengths, order, seq_len, use_native=True))
        for provider, use in (("numpy", False), ("native", True)):
            t = time_fn(lambda: build_sample_index(lengths, order, seq_len, use_native=use), "cpu", warmup=1, reps=7)
            rows.append({"op": "sample_index", "size": f"{n_docs} docs, {len(a) - 1} samples", "provider": provider,
                         "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms})
    for row in rows:
        base = next(r for r in rows if r["op"] == row["op"] and r["size"] == row["size"] and r["provider"] == "numpy")
        row["speedup"] = base["median_ms"] / row["median_ms"]
    print_table(rows, ["op", "size", "provider", "median_ms", "p20_ms", "p80_ms", "speedup"])
    print(f"rows appended to {record('native', rows, env_info('cpu'))}")


if __name__ == "__main__":
    main()
