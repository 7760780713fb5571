"""Benchmark: the fused LM head + LaCy loss against the ways people compute it today.

    python bench/bench_lacy_ce.py                                  # the device's default shapes
    python bench/bench_lacy_ce.py --shapes 4096x512x32064 --providers lacy-chunked,ce-onepass-torch

Providers, side by side in one run; one that cannot run here is a row saying why, never
a silent skip:
  lacy-triton       our op, impl="triton" (CUDA), once per strategy (--strategies)
  lacy-chunked      our op, impl="chunked" (PyTorch, chunked over tokens: the CPU path)
  lacy-triton-nohint, lacy-chunked-nohint
                    the same calls without ``max_selected``, as a user's own code may call
                    the op: on CPU the op then counts the selection itself (goal: within
                    1.03x of the call with the hint, per round); on CUDA it keeps the
                    static bound floor(call_fraction N) and warns once
  torch-eager       materialised logits + F.cross_entropy (twice for LaCy: full and without
                    <CALL>) + the same on-device selection, autograd backward
  torch-compile     torch.compile of torch-eager
  ce-onepass-torch  plain cross-entropy written the way Liger-Kernel's fused linear
                    cross-entropy works, in PyTorch: per chunk of rows, the logits, then
                    softmax - onehot, grad_hidden = dz @ W and grad_weight += dz^T @ h, all
                    in the forward (three GEMMs per chunk); the backward scales them by the
                    upstream gradient. The outside yardstick of the one-pass algorithm on
                    any device. Its chunks have our op's size (``chunk_rows``, 512 rows at
                    N=4096, D=512, V=32064): Liger's own rule (next power of two of
                    N / ceil(V / D), 128 rows there) ran 1.21x slower on the 2-core CPU
                    (median of 4 interleaved rounds), so the faster one is used.
  liger-flce        Liger-Kernel's fused linear cross-entropy, plain CE (CUDA)
  cce               Cut Cross-Entropy, plain CE, its default (it drops gradient entries
                    below a threshold by design, so its gradients are not checked) (CUDA)
  cce-exact         Cut Cross-Entropy with filter_eps=None (no filtering) (CUDA)
Our providers get the selection bound the training loop passes: ``selection_bound`` of
the host-side count (``selected_count``), computed before anything is timed.

Before timing, every provider is checked against an fp64 reference on the first
--verify-rows rows of the inputs: loss and both gradients within K x PyTorch's own error
in the input dtype + ULPS eps of the scale (the test suite's rule, tests/lacy_ce_cases.py);
our op is checked given its own selection, and the selection itself must be a top-k of
the fp64 scores up to that tolerance (near-ties may go either way). A provider that
crashes or disagrees is a row saying so, and the script exits with status 1.

Timing: --passes of fwd (forward only; our op then runs its statistics pass alone), bwd
(the backward of one forward, repeated with the graph retained) and fwdbwd (both). The
providers are timed in interleaved rounds (one call of each per round, each round starting
with the next provider, after a warm-up of each), so drift of a shared machine hits all
alike; median and 20th/80th percentiles, and the ratios to the yardstick per round.
Peak memory: extra bytes at the peak of one forward + backward (bench/harness.py). TFLOP/s
use the model FLOPs of the LM head, 2 N V D forward and 4 N V D backward, as Liger and
nanoGPT count them; recomputation is not credited. Rows go to bench/results/lacy_ce.jsonl
with the device, library versions and commit.

Targets. CPU (N=4096, D=512, V=32064, fp32): lacy-chunked fwd+bwd with strategy lacy
within 1.12x of ce-onepass-torch, with strategy none no slower than it. GPU (bf16, N=16384,
D=1024, V=32064): lacy-triton within 1.10x of the faster of liger-flce and cce, peak memory
within 1.2x of theirs; extra memory O(N D + V D) everywhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch._functorch.config
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (PINNED_MMAP_THRESHOLD, env_info, peak_memory, print_table, record,  # noqa: E402
                     set_mmap_threshold, synchronize)

from lacy_fast.kernels import lacy_linear_cross_entropy, selection_bound  # noqa: E402
from lacy_fast.kernels.lacy_ce_reference import (RANKED, LossOptions, chunk_rows, lacy_ce_torch, select_calls,  # noqa: E402
                                                 stat_dtype, valid_targets)

GPU_SHAPE = (16384, 1024, 32064)
CPU_SHAPE = (4096, 512, 32064)
GPU_GRID = [(n, d, 32064) for n in (4096, 16384, 65536) for d in (768, 1024, 2048)]
CPU_GRID = [CPU_SHAPE]
IGNORE = -100
CALL_FRACTION = 0.6
K = 2.0  # as tests/lacy_ce_cases.py: at most K times PyTorch's own distance to the fp64 truth
ULPS = 8.0  # + ULPS epsilons of the compared tensor's dtype times the truth's scale
OURS = ("lacy-triton", "lacy-chunked", "lacy-triton-nohint", "lacy-chunked-nohint")
NOHINT = {"lacy-triton-nohint": "lacy-triton", "lacy-chunked-nohint": "lacy-chunked"}  # -> the call with the hint
PLAIN = ("ce-onepass-torch", "liger-flce", "cce", "cce-exact")  # plain cross-entropy, no strategy
# Timing the backward alone retains the graph across calls, which a compiled backward with
# donated buffers refuses; donation only lets the backward reuse saved buffers' memory.
torch._functorch.config.donated_buffer = False  # noqa: E305


# ----------------------------------------------------------------------------------------
# Baselines written in PyTorch
# ----------------------------------------------------------------------------------------


def lacy_ce_eager(hidden, weight, targets, flags, call_id, strategy="lacy", call_fraction=CALL_FRACTION):
    """LaCy loss as one would write it in PyTorch: (N, V) logits, F.cross_entropy, selection.
    Returns (loss, selected)."""
    logits = (hidden @ weight.T).float()  # (N, V)
    valid = valid_targets(targets, weight.shape[0], call_id, IGNORE)
    y = torch.where(valid, targets, IGNORE)
    if strategy == "none":
        return F.cross_entropy(logits, y, ignore_index=IGNORE), torch.zeros_like(valid)
    masked = logits.index_fill(1, torch.tensor([call_id], device=logits.device), float("-inf"))
    nll = F.cross_entropy(masked, y, ignore_index=IGNORE, reduction="none")  # (N,) 0 where ignored
    call_nll = F.cross_entropy(logits, torch.full_like(y, call_id), reduction="none")  # (N,)
    selected = select_calls(strategy, nll, valid, flags, call_fraction)
    per_row = torch.where(selected, call_nll, nll)
    counted = valid & ~selected if strategy == "ignore" else valid
    return torch.where(counted, per_row, 0.0).sum() / counted.sum().clamp(min=1), selected


class OnePassCE(torch.autograd.Function):
    """Plain cross-entropy through the LM head, gradients in the forward (see the module
    docstring, ce-onepass-torch). Logits and gradients in fp32 (fp64 for fp64 inputs), the
    same elementwise passes over a chunk as our chunked op: max, subtract, exp, sum (the
    per-row factors act on the (C, D) operands, the one-hot part is added by rows)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index):
        n, d = hidden.shape
        vocab = weight.shape[0]
        sdt = stat_dtype(hidden.dtype)
        w = weight.to(sdt)
        valid = targets != ignore_index
        coef = valid.to(sdt) / valid.sum().clamp(min=1).to(sdt)  # (N,) mean over valid rows
        y = torch.where(valid, targets, 0)
        grad_hidden = torch.empty((n, d), dtype=sdt, device=hidden.device)
        grad_weight = torch.zeros((vocab, d), dtype=sdt, device=hidden.device)
        loss = torch.zeros((), dtype=sdt, device=hidden.device)
        step = chunk_rows(n, d, vocab)
        for start in range(0, n, step):
            rows = slice(start, start + step)
            h = hidden[rows].to(sdt)
            yc, cc = y[rows], coef[rows]
            z = h @ w.T  # (C, V)
            z_target = z.gather(1, yc[:, None])[:, 0]
            top = z.amax(dim=1)
            e = z.sub_(top[:, None]).exp_()  # exp(z - max)
            total = e.sum(dim=1)
            loss += ((top + total.log() - z_target) * cc).sum()
            s = (cc / total)[:, None]  # dz = s E - coef onehot(y)
            torch.addcmul(w[yc].mul_(-cc[:, None]), s, e @ w, out=grad_hidden[rows])
            grad_weight.addmm_(e.T, s * h)
            grad_weight.index_put_((yc,), -cc[:, None] * h, accumulate=True)
        ctx.save_for_backward(grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None


def ce_onepass_torch(hidden, weight, targets, ignore_index=IGNORE):
    return OnePassCE.apply(hidden, weight, targets, ignore_index)


# ----------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Provider:
    name: str
    strategy: str  # ours and the torch baselines: the LaCy strategy; the others: "plain-ce"
    fn: Callable | None  # (hidden, weight, targets, flags, call_id) -> (loss, is_call or None)
    missing: str | None = None  # why it cannot run here
    check_grads: bool = True  # False: gradients approximate by design (cce)


def _import_liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)


def _import_cce():
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def providers(device: torch.device, strategies: list[str], bounds: dict[str, int]) -> list[Provider]:
    """Every provider for this device; ``bounds``: the selection bound of each strategy."""
    cuda = device.type == "cuda"
    compiled = torch.compile(lacy_ce_eager, fullgraph=True)
    out = []

    def ours(impl, strategy, hint=True):
        def fn(h, w, t, f, c):
            loss, stats = lacy_linear_cross_entropy(h, w, t, f, c, strategy=strategy, call_fraction=CALL_FRACTION,
                                                    impl=impl, max_selected=bounds[strategy] if hint else None)
            return loss, stats["is_call"]
        return fn

    for strategy in strategies:
        out.append(Provider("lacy-triton", strategy, ours("triton", strategy), None if cuda else "needs CUDA"))
        out.append(Provider("lacy-chunked", strategy, ours("chunked", strategy)))
        out.append(Provider("lacy-triton-nohint", strategy, ours("triton", strategy, False),
                            None if cuda else "needs CUDA"))
        out.append(Provider("lacy-chunked-nohint", strategy, ours("chunked", strategy, False)))
    for strategy in strategies:
        out.append(Provider("torch-eager", strategy, lambda h, w, t, f, c, s=strategy: lacy_ce_eager(h, w, t, f, c, s)))
        out.append(Provider("torch-compile", strategy, lambda h, w, t, f, c, s=strategy: compiled(h, w, t, f, c, s)))
    out.append(Provider("ce-onepass-torch", "plain-ce", lambda h, w, t, f, c: (ce_onepass_torch(h, w, t), None)))

    def outside(name, module, package, build, call, check_grads=True):
        reasons = [] if cuda else ["needs CUDA"]
        if not _installed(module):
            reasons.insert(0, f"not installed (pip install {package})")
        if reasons:
            return Provider(name, "plain-ce", None, "; ".join(reasons), check_grads)
        state = {}

        def fn(h, w, t, f, c):
            if "impl" not in state:  # imported on first use: an import that fails is that provider's error
                state["impl"] = build()
            return call(state["impl"], h, w, t), None
        return Provider(name, "plain-ce", fn, None, check_grads)

    out.append(outside("liger-flce", "liger_kernel", "liger-kernel", _import_liger, lambda m, h, w, t: m(w, h, t)))
    out.append(outside("cce", "cut_cross_entropy", "cut-cross-entropy", _import_cce,
                       lambda m, h, w, t: m(h, w, t, ignore_index=IGNORE), check_grads=False))
    out.append(outside("cce-exact", "cut_cross_entropy", "cut-cross-entropy", _import_cce,
                       lambda m, h, w, t: m(h, w, t, ignore_index=IGNORE, filter_eps=None)))
    return out


# ----------------------------------------------------------------------------------------
# Inputs, the reference check, measurement
# ----------------------------------------------------------------------------------------


def make_inputs(n, d, v, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=gen, device=device) / math.sqrt(d)).to(dtype).requires_grad_()
    targets = torch.randint(0, v - 1, (n,), generator=gen, device=device)  # <CALL> = v - 1 never a target
    targets[torch.rand(n, generator=gen, device=device) < 0.05] = IGNORE
    flags = (torch.rand(n, generator=gen, device=device) < 0.25).to(torch.uint8)  # ~25% fact targets
    return hidden, weight, targets, flags, v - 1


def host_bounds(inputs, strategies: list[str]) -> dict[str, int]:
    """The selection bound the training loop would pass, from host-side counts (read here,
    outside every timed region, as the loader has them before the copy to the device)."""
    from lacy_fast.method import selected_count

    _, weight, targets, flags, call_id = inputs
    valid = valid_targets(targets, weight.shape[0], call_id, IGNORE)
    n_valid = int(valid.sum())
    n_facts = int((valid & ((flags & 1) != 0)).sum())
    n_judge = int((valid & ((flags & 2) != 0)).sum())
    return {s: selection_bound(selected_count(s, CALL_FRACTION, n_valid, n_facts, n_judge), targets.numel())
            for s in strategies}


class Disagreement(AssertionError):
    pass


def _err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float((x.double() - truth.double()).abs().max()) if truth.numel() else 0.0


def _run(fn, hidden, weight, rest, upstream):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    loss, is_call = fn(h, w, *rest)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w), grad_outputs=torch.full_like(loss, upstream))
    return {"loss": loss.detach(), "grad_hidden": grad_h, "grad_weight": grad_w}, is_call


def verify(p: Provider, inputs, rows: int) -> str:
    """Check ``p`` against the fp64 reference on the first ``rows`` rows (module docstring);
    returns what was checked, raises Disagreement with the numbers otherwise."""
    hidden, weight, targets, flags, call_id = inputs
    hidden, targets, flags = hidden[:rows], targets[:rows], flags[:rows]
    rest = (targets, flags, call_id)
    upstream = 0.8
    got, is_call = _run(p.fn, hidden, weight, rest, upstream)
    strategy = "none" if p.strategy == "plain-ce" else p.strategy

    def reference(h, w):
        def fn(hh, ww, t, f, c):
            loss, stats = lacy_ce_torch(hh, ww, t, f, c, LossOptions(strategy, CALL_FRACTION, IGNORE),
                                        selected=is_call)
            return loss, stats
        out, stats = _run(fn, h, w, rest, upstream)
        return out, stats

    truth, truth_stats = reference(hidden.double(), weight.double())
    ref, ref_stats = reference(hidden, weight)
    problems = []
    if is_call is not None and strategy in RANKED:
        # The selection: k equal, and no unselected candidate scores above a selected one by
        # more than the tolerated nll error.
        own = select_calls(strategy, truth_stats["nll"], valid_targets(targets, weight.shape[0], call_id, IGNORE),
                           flags, CALL_FRACTION)
        nll = truth_stats["nll"]
        tol = K * _err(ref_stats["nll"], nll) + ULPS * torch.finfo(hidden.dtype).eps * float(nll.abs().max())
        candidates = own | is_call
        low = float(nll[is_call].min()) if is_call.any() else float("inf")
        high = float(nll[candidates & ~is_call].max()) if (candidates & ~is_call).any() else float("-inf")
        if int(is_call.sum()) != int(own.sum()) or high > low + tol:
            problems.append(f"selection: {int(is_call.sum())} rows vs {int(own.sum())}, an unselected score "
                            f"{high:.6g} above a selected {low:.6g} by more than {tol:.3g}")
    names = ("loss", "grad_hidden", "grad_weight") if p.check_grads else ("loss",)
    for name in names:
        scale = float(truth[name].abs().max())
        tol = K * _err(ref[name], truth[name]) + ULPS * torch.finfo(ref[name].dtype).eps * scale
        e = _err(got[name], truth[name])
        if not e <= tol:
            problems.append(f"{name}: max error {e:.3g} > tolerance {tol:.3g}")
    if problems:
        raise Disagreement(f"{p.name} ({p.strategy}) disagrees with the fp64 reference on {rows} rows: "
                           + "; ".join(problems))
    return "loss" if not p.check_grads else "loss+grads" + ("+selection" if is_call is not None else "")


def _callables(fn, inputs, pass_):
    hidden, weight = inputs[0], inputs[1]
    if pass_ == "fwd":
        def call():
            with torch.no_grad():
                return fn(*inputs)
        return call
    if pass_ == "fwdbwd":
        return lambda: torch.autograd.grad(fn(*inputs)[0], (hidden, weight))
    state = {}

    def bwd():
        if "loss" not in state:
            state["loss"] = fn(*inputs)[0]
        return torch.autograd.grad(state["loss"], (hidden, weight), retain_graph=True)
    return bwd


def measure(provs: list[Provider], inputs, device, passes, warmup, reps) -> list[dict]:
    """Interleaved timing of every provider, pass by pass (module docstring)."""
    rows = []
    for pass_ in passes:
        calls = [_callables(p.fn, inputs, pass_) for p in provs]
        if pass_ == "bwd":
            for call in calls:
                call()  # the one forward whose backward is timed
        times = [[] for _ in provs]
        for call in calls:
            for _ in range(warmup):
                call()
        for r in range(reps):
            for j in range(len(calls)):  # each round starts one provider later: no fixed order
                i = (j + r) % len(calls)
                synchronize(device)
                t0 = time.perf_counter()
                calls[i]()
                synchronize(device)
                times[i].append((time.perf_counter() - t0) * 1e3)
        for p, ts in zip(provs, times):
            q = _quintiles(ts)
            rows.append({"provider": p.name, "strategy": p.strategy, "pass": pass_, "median_ms": statistics.median(ts),
                         "p20_ms": q[0], "p80_ms": q[3], "reps": reps, "times_ms": [round(t, 2) for t in ts],
                         "loadavg_1m": os.getloadavg()[0]})
        calls = None
    for p in provs:
        peak = peak_memory(_callables(p.fn, inputs, "fwdbwd"), device)
        for row in rows:
            if row["provider"] == p.name and row["strategy"] == p.strategy:
                row["peak_mem_mb"] = None if peak is None else peak / 2**20
    return rows


def _quintiles(values: list[float]) -> list[float]:
    return statistics.quantiles(values, n=5, method="inclusive") if len(values) >= 2 else [values[0]] * 4


def model_tflops(row: dict, n: int, d: int, v: int) -> float:
    flops = {"fwd": 2, "bwd": 4, "fwdbwd": 6}[row["pass"]] * n * v * d
    return flops / (row["median_ms"] * 1e-3) / 1e12


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in item.lower().split("x")) for item in text.split(",") if item]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", help="NxDxV,... (default: the GPU grid on CUDA, 4096x512x32064 on CPU)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--strategies", default="lacy,none", help="strategies of our op and the torch baselines")
    parser.add_argument("--providers", help="comma-separated subset of the providers")
    parser.add_argument("--passes", default="fwd,bwd,fwdbwd")
    parser.add_argument("--reps", type=int, help="timed rounds (default 20 on CUDA, 5 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed calls of each provider first (default 5 on CUDA, 1 on CPU)")
    parser.add_argument("--verify-rows", type=int, help="rows checked against the fp64 reference (default: 4096 "
                                                        "on CUDA, 512 on CPU; 0: no check)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results", type=Path, help="the jsonl file rows are appended to (default "
                                                     "bench/results/lacy_ce.jsonl)")
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
    verify_rows = args.verify_rows if args.verify_rows is not None else (4096 if cuda else 512)
    passes = args.passes.split(",")
    strategies = args.strategies.split(",")
    names = sorted({p.name for p in providers(device, strategies, {s: 0 for s in strategies})})
    wanted = args.providers.split(",") if args.providers else names
    unknown = [w for w in wanted if w not in names]
    if unknown:
        parser.error(f"unknown provider(s) {', '.join(unknown)}; choose from {', '.join(names)}")

    env = env_info(device)
    all_rows, failed = [], False
    for n, d, v in shapes:
        inputs = make_inputs(n, d, v, dtype, device)
        provs = [p for p in providers(device, strategies, host_bounds(inputs, strategies)) if p.name in wanted]
        rows, runnable = [], []
        for p in provs:
            if p.missing:
                rows.append({"provider": p.name, "strategy": p.strategy, "status": f"not run: {p.missing}"})
                continue
            try:
                checked = verify(p, inputs, min(verify_rows, n)) if verify_rows else "not checked"
            except Disagreement as err:
                rows.append({"provider": p.name, "strategy": p.strategy, "status": "disagrees", "error": str(err)})
                failed = True
                continue
            except Exception as err:  # noqa: BLE001 - a crash is that provider's row, and fails the run
                rows.append({"provider": p.name, "strategy": p.strategy, "status": "crashed",
                             "error": f"{type(err).__name__}: {err}"[:500]})
                failed = True
                continue
            runnable.append((p, checked))
        try:
            timed = measure([p for p, _ in runnable], inputs, device, passes, warmup, reps) if runnable else []
        except Exception as err:  # noqa: BLE001
            timed = []
            rows.append({"provider": "all", "status": "crashed while timed", "error": f"{type(err).__name__}: {err}"})
            failed = True
        for row in timed:
            row["status"] = "ok"
            row["checked"] = dict((p.name + p.strategy, c) for p, c in runnable)[row["provider"] + row["strategy"]]
        rows = timed + rows
        add_ratios(rows)
        for row in rows:
            row.update(N=n, D=d, V=v, dtype=str(dtype).replace("torch.", ""))
            if "median_ms" in row:
                row["model_tflops"] = model_tflops(row, n, d, v)
        print(f"\nN={n} D={d} V={v} {dtype} on {env['device']}")
        print_table(rows, ["provider", "strategy", "pass", "median_ms", "p20_ms", "p80_ms", "model_tflops",
                           "vs_yardstick", "vs_fused", "peak_mem_mb", "status"])
        for row in rows:
            if row.get("error"):
                print(f"  {row['provider']}: {row['error']}", file=sys.stderr)
        report_targets(rows, n, d, v, dtype)
        all_rows += rows
        del inputs
    if not args.no_record:  # the environment again: the versions of the providers imported since
        path = record("lacy_ce", all_rows, env_info(device), out=args.results)
        print(f"\n{len(all_rows)} rows appended to {path}")
    if failed:
        print("FAILED: a provider crashed or disagrees with the reference (rows above)", file=sys.stderr)
    return 1 if failed else 0


def add_ratios(rows: list[dict]) -> None:
    """vs_yardstick: time / ce-onepass-torch's; vs_fused: time / the faster of liger-flce and cce
    (same pass), both from the medians. vs_yardstick_rounds: the median and 20th / 80th
    percentiles of the ratio within each timed round (the calls of one round run back to
    back, so a shared machine's changing load cancels out of them). vs_hinted_rounds: the
    same per-round ratio of a -nohint provider to the same call with the hint."""
    t = {(r["provider"], r["pass"]): r["median_ms"] for r in rows if "median_ms" in r}
    rounds = {(r["provider"], r["pass"]): r["times_ms"] for r in rows if "times_ms" in r}
    by_strategy = {(r["provider"], r["strategy"], r["pass"]): r["times_ms"] for r in rows if "times_ms" in r}
    for row in rows:
        if "median_ms" not in row:
            continue
        base = t.get(("ce-onepass-torch", row["pass"]))
        if base:
            row["vs_yardstick"] = row["median_ms"] / base
            ratios = [a / b for a, b in zip(row["times_ms"], rounds[("ce-onepass-torch", row["pass"])])]
            q = _quintiles(ratios)
            row["vs_yardstick_rounds"] = {"median": statistics.median(ratios), "p20": q[0], "p80": q[3]}
        hinted = (NOHINT.get(row["provider"]), row["strategy"], row["pass"])
        if hinted in by_strategy:
            ratios = [a / b for a, b in zip(row["times_ms"], by_strategy[hinted])]
            q = _quintiles(ratios)
            row["vs_hinted_rounds"] = {"median": statistics.median(ratios), "p20": q[0], "p80": q[3]}
        fused = [t[(p, row["pass"])] for p in ("liger-flce", "cce") if (p, row["pass"]) in t]
        if fused:
            row["vs_fused"] = row["median_ms"] / min(fused)


def report_targets(rows: list[dict], n: int, d: int, v: int, dtype: torch.dtype) -> None:
    """The issue's targets for this shape, where the providers they compare were measured."""
    for row in rows:
        if row.get("pass") != "fwdbwd" or row["provider"] not in OURS:
            continue
        line = f"  {row['provider']} [{row['strategy']}] fwd+bwd:"
        if "vs_yardstick" in row:
            goal = "<= 1.12x" if row["strategy"] != "none" else "<= 1.00x"
            paired = row["vs_yardstick_rounds"]
            line += (f" {row['vs_yardstick']:.3f}x ce-onepass-torch (medians), per round {paired['median']:.3f}x "
                     f"[p20 {paired['p20']:.3f}, p80 {paired['p80']:.3f}] (CPU goal {goal})")
        if "vs_fused" in row:
            line += f", {row['vs_fused']:.3f}x the faster of liger-flce and cce (GPU goal <= 1.10x)"
        if "vs_hinted_rounds" in row:
            paired = row["vs_hinted_rounds"]
            line += (f", {paired['median']:.3f}x the call with the hint per round [p20 {paired['p20']:.3f}, "
                     f"p80 {paired['p80']:.3f}] (CPU goal <= 1.03x)")
        print(line)
    mem = {(r["provider"], r["strategy"]): r.get("peak_mem_mb") for r in rows if r.get("pass") == "fwdbwd"}
    elem = torch.finfo(dtype).bits // 8
    ours = {k: m for k, m in mem.items() if k[0] in OURS and m is not None}
    if ours:
        print("  peak extra memory, MiB: " + ", ".join(f"{p} [{s}] {m:.1f}" for (p, s), m in ours.items())
              + f"; (N*D + V*D) {elem} B = {(n * d + v * d) * elem / 2**20:.1f}, one (N, V) fp32 buffer = "
              f"{n * v * 4 / 2**20:.1f}")


if __name__ == "__main__":
    sys.exit(main())
