"""Training throughput: tokens/s, MFU and data-wait of the real loop, per strategy, and the
overhead of the LaCy objective over a plain LM on the same model.

    python bench/bench_train.py                                   # tiny model, CPU-sized
    python bench/bench_train.py --shape lacy-334m --seq-len 1024 --micro-batch 16 --steps 60

Each (strategy, repeat) is one ``train()`` run of ``--steps`` steps on the same prepared
data (built from the synthetic corpus when ``--data`` is not given); strategies are
interleaved (none, lacy, none, lacy, ...) so drift of the machine hits all alike. The
first ``--warmup`` steps of every run (start-up, allocator warm-up, compilation) are left
out: throughput is measured over the rest, from the loop's own metrics. Overhead =
tokens/s(none) / tokens/s(strategy) - 1, medians over repeats. Goal: lacy under 3%.

MFU needs the device's peak: on a GPU the loop looks it up (``train.metrics``); a CPU has
no data-sheet figure, so the peak used there is the best rate of a large fp32 matmul
measured at the start of the run (``peak_source`` says which), and MFU reads "share of
what this CPU's BLAS reaches on one big matmul".
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import env_info, print_table, record  # noqa: E402

import torch  # noqa: E402

from lacy_fast.config import PrepareConfig, TokenizerConfig, load_config, RunConfig  # noqa: E402


def prepared_data(root: Path, people: int, vocab: int) -> Path:
    from lacy_fast.data import synth
    from lacy_fast.data.prepare import prepare

    synth.write(root / "synth", people, seed=0)
    prepare(PrepareConfig(inputs=(str(root / "synth" / "corpus.jsonl"),), out=str(root / "prep"), workers=2,
                          tokenizer=TokenizerConfig(vocab_size=vocab)), progress=False)
    return root / "prep"


def matmul_tflops(n: int = 2048, reps: int = 10) -> float:
    """Best fp32 matmul rate on this CPU, TFLOP/s (2 n^3 FLOPs per product)."""
    import time

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def run_once(args, data: Path, strategy: str, out: Path, peak: float) -> dict:
    from lacy_fast.train.loop import train

    cfg = load_config(RunConfig, "tiny", [
        f"data.path={data}", f"out_dir={out}", f"model.shape={args.shape}", f"train.seq_len={args.seq_len}",
        f"model.max_seq_len={max(args.seq_len, 256)}", f"train.micro_batch_size={args.micro_batch}",
        f"train.max_steps={args.steps}", f"train.log_every={args.warmup}", "train.ckpt_every=0",
        f"objective.strategy={strategy}", f"train.compile={str(args.compile).lower()}",
        f"train.peak_tflops={peak}",
    ])
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > args.warmup]
    intervals = [r for r in timed if "tokens_per_s" in r]  # each logging interval's last row
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in intervals),
            "mfu": timed[-1]["mfu"], "data_wait": statistics.median(r["data_wait"] for r in intervals),
            "peak_mem_gb": timed[-1]["peak_mem_gb"], "loss": timed[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--strategies", default="none,lacy")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", type=Path, help="a prepare output (default: synthetic corpus, prepared here)")
    parser.add_argument("--people", type=int, default=2000)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    strategies = args.strategies.split(",")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = 0.0 if device.type == "cuda" else matmul_tflops()  # 0: the loop's GPU table
    peak_source = "device table" if device.type == "cuda" else f"measured fp32 matmul ({peak:.3f} TFLOP/s)"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data or prepared_data(tmp, args.people, args.vocab)
        runs: dict[str, list[dict]] = {s: [] for s in strategies}
        for rep in range(args.repeats):
            for s in strategies:
                runs[s].append(run_once(args, data, s, tmp / f"{s}-{rep}", peak))
                print(f"  {s} #{rep}: {runs[s][-1]['tokens_per_s']:.0f} tok/s", file=sys.stderr)

    base = statistics.median(r["tokens_per_s"] for r in runs[strategies[0]])
    rows = []
    for s in strategies:
        tps = statistics.median(r["tokens_per_s"] for r in runs[s])
        rows.append({"shape": args.shape, "strategy": s, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                     "steps": args.steps, "tokens_per_s": tps, "mfu": runs[s][-1]["mfu"],
                     "data_wait": statistics.median(r["data_wait"] for r in runs[s]),
                     "peak_mem_gb": runs[s][-1]["peak_mem_gb"], "peak_source": peak_source,
                     f"overhead_vs_{strategies[0]}": base / tps - 1.0,
                     "tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in runs[s]]})
    print_table(rows, ["shape", "strategy", "tokens_per_s", "mfu", "data_wait", "peak_mem_gb",
                       f"overhead_vs_{strategies[0]}"])
    if not args.no_record:
        print(record("train", rows, env_info(device)), file=sys.stderr)


if __name__ == "__main__":
    main()
