"""Benchmark: the fused LM head + LaCy loss against the ways people compute it today.

    python bench/bench_lacy_ce.py                         # default grid for the device
    python bench/bench_lacy_ce.py --shapes 4096x768x32064 --reps 10

Providers, side by side in one run (those that cannot run here are listed and skipped):
  lacy-triton     our op, impl="triton" (CUDA)
  lacy-chunked    our op, impl="chunked" (PyTorch, chunked over tokens: the CPU path)
  torch-eager     materialised logits + F.cross_entropy (twice: full and without <CALL>)
                  + the same on-device selection, autograd backward
  torch-compile   torch.compile of torch-eager
  liger-flce      Liger-Kernel's fused linear cross-entropy, plain CE (when installed, CUDA)
  cce             Cut Cross-Entropy (apple/ml-cross-entropy), plain CE (when installed, CUDA)
Liger and CCE compute plain cross-entropy (no <CALL> extras, no selection): they show the
speed and memory a fused LM head reaches today on the same shapes.

Passes: fwd (forward only), bwd (the backward of one forward, repeated with the graph
retained), fwdbwd (both). Time: median and 20th/80th percentiles (bench/harness.py).
Peak memory: extra bytes at the peak of one forward + backward. TFLOP/s use the model
FLOPs of the LM head, 2 N V D forward and 4 N V D backward (the two gradient products),
as Liger and nanoGPT count them; recomputation is not credited. Rows go to
bench/results/lacy_ce.jsonl with the device, library versions and commit.

Targets (checked on a GPU): lacy-triton fwd+bwd within 1.10x of the faster of liger-flce
and cce, at least 1.5x faster than torch-eager, extra memory O(N D + V D).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch._functorch.config
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (PINNED_MMAP_THRESHOLD, env_info, peak_memory, print_table, record,  # noqa: E402
                     set_mmap_threshold, time_fn)

from lacy_fast.kernels import lacy_linear_cross_entropy  # noqa: E402
from lacy_fast.kernels.lacy_ce_reference import select_calls, valid_targets  # noqa: E402

GPU_GRID = [(n, d, 32064) for n in (4096, 16384, 65536) for d in (768, 1024, 2048)]
CPU_GRID = [(1024, 256, 32064), (4096, 768, 32064)]
IGNORE = -100
# Timing the backward alone retains the graph across calls, which a compiled backward with
# donated buffers refuses; donation only lets the backward reuse saved buffers' memory.
torch._functorch.config.donated_buffer = False  # noqa: E305


# ----------------------------------------------------------------------------------------
# The materialised PyTorch baseline
# ----------------------------------------------------------------------------------------


def lacy_ce_eager(hidden, weight, targets, flags, call_id, strategy="lacy", call_fraction=0.6):
    """LaCy loss as one would write it in PyTorch: (N, V) logits, F.cross_entropy, selection."""
    logits = (hidden @ weight.T).float()  # (N, V)
    valid = valid_targets(targets, weight.shape[0], call_id, IGNORE)
    y = torch.where(valid, targets, IGNORE)
    masked = logits.index_fill(1, torch.tensor([call_id], device=logits.device), float("-inf"))
    nll = F.cross_entropy(masked, y, ignore_index=IGNORE, reduction="none")  # (N,) 0 where ignored
    call_nll = F.cross_entropy(logits, torch.full_like(y, call_id), reduction="none")  # (N,)
    selected = select_calls(strategy, nll, valid, flags, call_fraction)
    per_row = torch.where(selected, call_nll, nll)
    counted = valid & ~selected if strategy == "ignore" else valid
    return torch.where(counted, per_row, 0.0).sum() / counted.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------
# Providers: name -> (why it cannot run here, or None; loss function builder)
# ----------------------------------------------------------------------------------------


def _liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)


def _cce():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return None
    return linear_cross_entropy


def providers(device: torch.device, strategy: str) -> dict:
    cuda = device.type == "cuda"
    liger, cce = _liger(), _cce()
    compiled = torch.compile(lacy_ce_eager, fullgraph=True)

    def ours(impl):
        return lambda h, w, t, f, c: lacy_linear_cross_entropy(h, w, t, f, c, strategy=strategy, impl=impl)[0]

    return {
        "lacy-triton": (None if cuda else "needs CUDA", ours("triton")),
        "lacy-chunked": (None, ours("chunked")),
        "torch-eager": (None, lambda h, w, t, f, c: lacy_ce_eager(h, w, t, f, c, strategy)),
        "torch-compile": (None, lambda h, w, t, f, c: compiled(h, w, t, f, c, strategy)),
        "liger-flce": (None if cuda and liger else "needs CUDA and liger-kernel",
                       lambda h, w, t, f, c: liger(w, h, t)),
        "cce": (None if cuda and cce else "needs CUDA and cut-cross-entropy",
                lambda h, w, t, f, c: cce(h, w, t, ignore_index=IGNORE)),
    }


# ----------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------


def make_inputs(n, d, v, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=gen, device=device) / math.sqrt(d)).to(dtype).requires_grad_()
    targets = torch.randint(0, v - 1, (n,), generator=gen, device=device)  # <CALL> = v - 1 never a target
    targets[torch.rand(n, generator=gen, device=device) < 0.05] = IGNORE
    flags = (torch.rand(n, generator=gen, device=device) < 0.25).to(torch.uint8)  # ~25% fact targets
    return hidden, weight, targets, flags, v - 1


def measure(name, loss_fn, inputs, device, passes, warmup, reps) -> list[dict]:
    hidden, weight = inputs[0], inputs[1]

    def fwd():
        with torch.no_grad():
            return loss_fn(*inputs)

    def fwdbwd():
        return torch.autograd.grad(loss_fn(*inputs), (hidden, weight))

    rows = []
    for pass_ in passes:
        if pass_ == "fwd":
            fn = fwd
        elif pass_ == "fwdbwd":
            fn = fwdbwd
        else:
            loss = loss_fn(*inputs)
            fn = lambda: torch.autograd.grad(loss, (hidden, weight), retain_graph=True)  # noqa: E731
        t = time_fn(fn, device, warmup=warmup, reps=reps)
        rows.append({"provider": name, "pass": pass_, "median_ms": t.median_ms, "p20_ms": t.p20_ms,
                     "p80_ms": t.p80_ms, "reps": t.reps,
                     "loadavg_1m": os.getloadavg()[0]})  # CPU timings share the machine: say how busy it was
        fn = loss = None
    peak = peak_memory(fwdbwd, device)
    for row in rows:
        row["peak_mem_mb"] = None if peak is None else peak / 2**20
    return rows


def model_tflops(row: dict, n: int, d: int, v: int) -> float:
    flops = {"fwd": 2, "bwd": 4, "fwdbwd": 6}[row["pass"]] * n * v * d
    return flops / (row["median_ms"] * 1e-3) / 1e12


def check_baseline(device: torch.device) -> None:
    """torch-eager computes the same loss as our op (guards the baseline's semantics)."""
    inputs = make_inputs(64, 32, 101, torch.float32, device)
    for strategy in ("lacy", "ignore", "loss"):
        ours = lacy_linear_cross_entropy(*inputs, strategy=strategy, impl="torch")[0]
        eager = lacy_ce_eager(*inputs, strategy=strategy)
        assert torch.allclose(ours, eager, rtol=1e-5), f"torch-eager differs from the op ({strategy})"


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in item.lower().split("x")) for item in text.split(",") if item]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", help="NxDxV,... (default: the full grid on CUDA, a reduced one on CPU)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--strategy", default="lacy", help="strategy of our op and the torch baselines")
    parser.add_argument("--providers", help="comma-separated subset of the providers")
    parser.add_argument("--passes", default="fwd,bwd,fwdbwd")
    parser.add_argument("--reps", type=int, help="timed calls (default 20 on CUDA, 5 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 5 on CUDA, 1 on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-record", action="store_true", help="print only, append no rows")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:  # CPU peaks that follow the live buffers (harness.set_mmap_threshold)
        set_mmap_threshold(PINNED_MMAP_THRESHOLD)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    shapes = parse_shapes(args.shapes) if args.shapes else (GPU_GRID if cuda else CPU_GRID)
    reps = args.reps or (20 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    passes = args.passes.split(",")
    check_baseline(device)

    table = providers(device, args.strategy)
    wanted = args.providers.split(",") if args.providers else list(table)
    for name in wanted:
        if table[name][0]:
            print(f"skipping {name}: {table[name][0]}")
    env = env_info(device)
    all_rows = []
    for n, d, v in shapes:
        inputs = make_inputs(n, d, v, dtype, device)
        rows = []
        for name in wanted:
            reason, loss_fn = table[name]
            if reason:
                continue
            try:
                rows += measure(name, loss_fn, inputs, device, passes, warmup, reps)
            except torch.OutOfMemoryError:
                rows.append({"provider": name, "pass": "fwdbwd", "error": "out of memory"})
            if cuda:
                torch.cuda.empty_cache()
        base = {(r["pass"]): r["median_ms"] for r in rows if r["provider"] == "torch-eager" and "median_ms" in r}
        for row in rows:
            row.update(N=n, D=d, V=v, dtype=str(dtype).replace("torch.", ""),
                       strategy=args.strategy if row["provider"] in ("lacy-triton", "lacy-chunked", "torch-eager",
                                                                     "torch-compile") else "plain-ce")
            if "median_ms" in row:
                row["model_tflops"] = model_tflops(row, n, d, v)
                if row["pass"] in base:
                    row["speedup_vs_eager"] = base[row["pass"]] / row["median_ms"]
        print(f"\nN={n} D={d} V={v} {dtype} on {env['device']}")
        print_table(rows, ["provider", "pass", "median_ms", "p20_ms", "p80_ms", "model_tflops", "speedup_vs_eager",
                           "peak_mem_mb", "error"])
        report_targets(rows, n, d, v, dtype)
        all_rows += rows
        del inputs
    if not args.no_record:
        path = record("lacy_ce", all_rows, env)
        print(f"\n{len(all_rows)} rows appended to {path}")


def report_targets(rows: list[dict], n: int, d: int, v: int, dtype: torch.dtype) -> None:
    """The issue's targets for this shape, where the providers they compare were measured."""
    t = {r["provider"]: r["median_ms"] for r in rows if r["pass"] == "fwdbwd" and "median_ms" in r}
    mem = {r["provider"]: r["peak_mem_mb"] for r in rows if r["pass"] == "fwdbwd" and r.get("peak_mem_mb")}
    ours = "lacy-triton" if "lacy-triton" in t else "lacy-chunked"
    if ours not in t:
        return
    fused = [t[p] for p in ("liger-flce", "cce") if p in t]
    if fused:
        print(f"  {ours} / fastest fused plain CE: {t[ours] / min(fused):.2f}x (target <= 1.10x)")
    if "torch-eager" in t:
        print(f"  torch-eager / {ours}: {t['torch-eager'] / t[ours]:.2f}x faster (target >= 1.5x)")
    if ours in mem:
        elem = torch.finfo(dtype).bits // 8
        line = f"  peak extra memory, MiB: {ours} {mem[ours]:.1f}"
        if "torch-eager" in mem:
            line += f", torch-eager {mem['torch-eager']:.1f}"
        print(f"{line}; (N*D + V*D) {elem} B = {(n * d + v * d) * elem / 2**20:.1f}, "
              f"one (N, V) fp32 buffer = {n * v * 4 / 2**20:.1f}")


if __name__ == "__main__":
    main()
