"""lacy_linear_cross_entropy: every strategy x implementation against an fp64 ground truth.

On a machine without CUDA the Triton kernels run in the interpreter (conftest.py sets
TRITON_INTERPRET=1), at tiny odd shapes (N=37, D=48, V=211) with small interpreter tiles,
and with 16 rows per chunk so every loop runs more than once. Tolerances are explained in
lacy_ce_cases.py. GPU-only cases are marked ``gpu``.

The fused implementations get the selection bound the training loop passes
(``selection_bound`` of the host-side count: rounded up, so the correction also handles
unselected padding rows), unless a test says otherwise.
"""
from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lacy_ce_cases import COMPARED, IGNORE, K, check, err, make_case, run, tolerance
from lacy_fast.errors import UserError
from lacy_fast.kernels import STRATEGIES, LacyLossArgumentError, lacy_linear_cross_entropy, selection_bound
from lacy_fast.kernels import lacy_ce as op
from lacy_fast.kernels.lacy_ce_reference import (
    CHUNK_ROWS_ENV,
    CHUNKED,
    RANKED,
    RELABEL_RANKED,
    LossOptions,
    chunk_rows,
    lacy_ce_one_pass,
    select_calls,
    selection_size,
    static_bound,
    valid_targets,
)

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_runs = op.HAS_TRITON and (torch.cuda.is_available() or op._interpreted())
TRITON = pytest.param("triton", marks=pytest.mark.skipif(not triton_runs, reason="needs CUDA or TRITON_INTERPRET=1"))
IMPLS = ["torch", "chunked", TRITON]
FUSED = ["chunked", TRITON]  # the implementations of the one-pass algorithm
CALL_IDS = {"middle": 105, "end": 210}  # V = 211
RENORMALIZE = [pytest.param(True, id="renorm"), pytest.param(False, id="fullsoftmax")]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setenv(CHUNK_ROWS_ENV, "16")  # 37 rows -> chunks of 16, 16 and 5


cached_case = functools.lru_cache(maxsize=None)(make_case)


def loop_bound(case) -> int:
    """The max_selected the training loop passes for this batch."""
    return selection_bound(case.host_count(), case.targets.numel())


def run_impl(case, impl, device=DEVICE, hint="loop"):
    """hint: "loop" (the training loop's bucketed bound), "exact" (the host count), "none"."""
    extra = {}
    if impl != "torch" and hint != "none":
        extra["max_selected"] = loop_bound(case) if hint == "loop" else case.host_count()
    return run(lacy_linear_cross_entropy, case.hidden, case.weight, case, device=device, impl=impl, **extra)


# ----------------------------------------------------------------------------------------
# Every strategy x implementation x dtype x <CALL> position x objective
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", RENORMALIZE)
@pytest.mark.parametrize("call_pos", list(CALL_IDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_fp64_truth(strategy, impl, dtype, call_pos, renormalize):
    case = cached_case(strategy, dtype, call_id=CALL_IDS[call_pos], renormalize=renormalize)
    check(run_impl(case, impl), case)


SOFT = [pytest.param((0.3, False), id="fixed0.3"), pytest.param((0.8, True), id="byerror0.8")]


@pytest.mark.parametrize("soft", SOFT)
@pytest.mark.parametrize("renormalize", RENORMALIZE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("strategy", RELABEL_RANKED)
def test_soft_relabel_matches_fp64_truth(strategy, impl, dtype, renormalize, soft):
    """objective.call_weight (fixed, or scaled by the row's error): loss, stats and both
    gradients against the fp64 truth, every implementation, <CALL> at the last column."""
    call_weight, by_error = soft
    case = cached_case(strategy, dtype, call_id=CALL_IDS["end"], renormalize=renormalize, call_weight=call_weight,
                       weight_by_error=by_error)
    check(run_impl(case, impl), case)


@pytest.mark.parametrize("impl", FUSED)
def test_soft_relabel_edges(impl):
    """Every row selected (k = N), and no bound hint (the correction's padding rows)."""
    case = cached_case("lacy", torch.float32, call_id=CALL_IDS["middle"], edge="all_selected", call_fraction=1.0,
                       call_weight=0.6, weight_by_error=True)
    check(run_impl(case, impl), case)
    case = cached_case("loss", torch.float32, call_id=CALL_IDS["middle"], call_weight=0.25)
    check(run_impl(case, impl, hint="none"), case)


@pytest.mark.parametrize("impl", IMPLS)
def test_soft_relabel_by_hand(impl):
    """The by-hand case of test_semantics_by_hand with lambda: a selected row's loss is
    (1 - lambda) nll(y) + lambda (-log p(CALL)); by error, lambda = w (1 - p(y) / p_max), so
    a selected row whose target is already the argmax keeps its ordinary loss alone."""
    call_id = 3
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0, 0.3],  # fact, target 2: high nll -> selected
                           [3.0, 0.1, 0.2, -0.5, 1.0, 0.0],  # fact, target 0: low nll
                           [0.0, 1.0, 2.0, 0.5, -2.0, 1.5],  # not a fact
                           [0.2, -0.3, 0.9, 2.5, 0.4, 2.7]], dtype=torch.float64)  # fact, target 5: the argmax
    targets = torch.tensor([2, 0, 5, 5])
    flags = torch.tensor([1, 1, 0, 1], dtype=torch.uint8)
    dtype = torch.float64 if impl in ("torch", "chunked") else torch.float32
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for call_weight, by_error in ((0.4, False), (0.9, True)):
        h = logits.to(dtype).to(DEVICE).clone().requires_grad_()
        w = torch.eye(6, dtype=dtype, device=DEVICE).requires_grad_()
        loss, stats = lacy_linear_cross_entropy(h, w, targets.to(DEVICE), flags.to(DEVICE), call_id, strategy="lacy",
                                                call_fraction=0.67, impl=impl, call_weight=call_weight,
                                                weight_by_error=by_error)
        loss.backward()
        assert stats["is_call"].cpu().tolist() == [True, False, False, True]  # floor(0.67 * 3) = 2 highest nll
        log_p = torch.log_softmax(logits, -1)
        real = torch.tensor([v != call_id for v in range(6)])
        log_q = torch.log_softmax(logits.masked_fill(~real, float("-inf")), -1)
        grads, total = torch.zeros_like(logits), 0.0
        for i in range(4):
            y, p, q = int(targets[i]), log_p[i].exp(), log_q[i].exp()
            dq = q - torch.eye(6, dtype=torch.float64)[y]
            dp = p - torch.eye(6, dtype=torch.float64)[call_id]
            lam = 0.0
            if stats["is_call"][i]:
                lam = call_weight * (1 - float(q[y] / q[real].max())) if by_error else call_weight
            total += (1 - lam) * float(-log_q[i, y]) + lam * float(-log_p[i, call_id])
            grads[i] = (1 - lam) * dq + lam * dp
        if by_error:  # row 3's target is its argmax: no <CALL> term at all
            assert float(logits[3, 5]) == float(logits[3, real].max())
        assert abs(float(loss) - total / 4) < tol
        assert torch.allclose(h.grad.cpu().double(), grads / 4, atol=tol, rtol=0)
        assert torch.allclose(w.grad.cpu().double(), (grads / 4).T @ logits, atol=tol * 10, rtol=0)


@pytest.mark.parametrize("renormalize", RENORMALIZE)
@pytest.mark.parametrize("hint", ["exact", "none"])
@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_selection_bound_exact_or_absent(strategy, impl, hint, renormalize):
    """The bound equal to the count (no padding rows) and no bound at all (the strategy's
    most: for spacy and judge every row goes through the correction)."""
    case = cached_case(strategy, torch.float32, call_id=CALL_IDS["middle"], renormalize=renormalize)
    assert case.host_count() == int(case.truth["is_call"].sum())
    check(run_impl(case, impl, hint=hint), case)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("strategy", ["spacy", "judge"])
def test_selection_by_flags_needs_no_bound(strategy, impl):
    """spacy and judge select by the flags, before any logit: no correction, no bound."""
    case = cached_case(strategy, torch.float32, call_id=CALL_IDS["end"])
    assert case.host_count() > 0
    check(run(lacy_linear_cross_entropy, case.hidden, case.weight, case, device=DEVICE, impl=impl, max_selected=0),
          case)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("strategy", RANKED)
def test_a_bound_below_the_count_gives_nan_not_a_wrong_gradient(strategy, impl):
    case = cached_case(strategy, torch.float32, call_id=CALL_IDS["end"])
    count = case.host_count()
    assert count > 0
    h = case.hidden.to(DEVICE).requires_grad_()
    w = case.weight.to(DEVICE).requires_grad_()
    kwargs = case.kwargs()
    loss, stats = lacy_linear_cross_entropy(h, w, case.targets.to(DEVICE), case.flags.to(DEVICE), impl=impl,
                                            max_selected=count - 1, **kwargs)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(h.grad).all() and torch.isnan(w.grad).all()
    assert torch.equal(stats["is_call"].cpu(), case.truth["is_call"])  # the stats stay right


def test_selection_bound_buckets():
    for n in (1, 37, 4096, 16384):
        bucket = max(16, -(-n // 128))
        values = set()
        for count in range(n + 1):
            bound = selection_bound(count, n)
            assert count <= bound <= n and (bound == n or bound % bucket == 0)
            assert bound - count < bucket
            values.add(bound)
        assert len(values) <= 129
    assert selection_bound(0, 100) == 0
    assert static_bound("lacy", 0.6, 37) == 22 and static_bound("ignore", 1.0, 37) == 37
    assert static_bound("none", 0.6, 37) == 0 and static_bound("spacy", 0.6, 37) == 0  # nothing to correct


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_selection_size_is_the_selected_count(strategy):
    gen = torch.Generator().manual_seed(3)
    for fraction in (0.0, 0.37, 0.6, 1.0):
        nll = torch.rand(50, generator=gen).double()
        valid = torch.rand(50, generator=gen) < 0.8
        flags = torch.randint(0, 4, (50,), generator=gen, dtype=torch.uint8)
        ref = torch.rand(50, generator=gen).double()
        selected = select_calls(strategy, nll, valid, flags, fraction, ref)
        assert int(selection_size(strategy, valid, flags, fraction)) == int(selected.sum())
        if strategy in RANKED:
            assert int(selected.sum()) <= static_bound(strategy, fraction, 50)


@pytest.mark.parametrize("impl", FUSED)
def test_without_gradients_only_the_statistics_run(impl, monkeypatch):
    """Under no_grad (evaluation, the rho reference) the op runs one logit pass: the
    ordinary-gradient pass is not called, and the results equal the training forward's."""
    case = cached_case("lacy", torch.float32, call_id=CALL_IDS["middle"])
    with_grads = run_impl(case, impl)
    backend = op.TRITON if impl == "triton" else CHUNKED

    def refuse(*args):
        raise AssertionError("the gradient pass ran without a gradient to compute")

    monkeypatch.setattr(backend, "ordinary", refuse)
    for context in (torch.no_grad(), torch.enable_grad()):
        with context:
            loss, stats = lacy_linear_cross_entropy(case.hidden.to(DEVICE), case.weight.to(DEVICE),
                                                    case.targets.to(DEVICE), case.flags.to(DEVICE), impl=impl,
                                                    **case.kwargs())
        assert not loss.requires_grad
        assert torch.allclose(loss.cpu(), with_grads["loss"], rtol=1e-6, atol=0)
        assert torch.equal(stats["is_call"].cpu(), with_grads["is_call"])
        assert torch.allclose(stats["nll"].cpu(), with_grads["nll"], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------
# Edge batches
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", RENORMALIZE)
@pytest.mark.parametrize("edge", ["all_ignored", "no_facts", "all_facts", "all_selected"])
@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_edge_batches(strategy, impl, edge, renormalize):
    """Nothing valid, no fact token, every token a fact, and k = N (every row selected)."""
    case = cached_case(strategy, torch.float32, call_id=CALL_IDS["end"], edge=edge, renormalize=renormalize,
                       call_fraction=1.0 if edge == "all_selected" else 0.6)
    result = run_impl(case, impl)
    check(result, case)
    if edge == "all_ignored":
        assert float(result["loss"]) == 0.0
        assert not result["grad_hidden"].any() and not result["grad_weight"].any()
        assert not result["is_call"].any() and not result["nll"].any()
    if edge == "no_facts" and strategy in ("lacy", "spacy", "ignore"):
        assert not result["is_call"].any()
    if edge == "all_facts" and strategy == "spacy":
        assert torch.equal(result["is_call"], case.targets != IGNORE)
    if edge == "all_selected":
        n = case.targets.numel()
        assert int(result["is_call"].sum()) == (0 if strategy == "none" else n) and loop_bound(case) in (0, n)
        if strategy == "ignore":  # every row dropped: nothing counted
            assert float(result["loss"]) == 0.0 and not result["grad_hidden"].any()


@pytest.mark.parametrize("call_fraction", [0.0, 1.0])
@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("strategy", RANKED)
def test_call_fraction_extremes(strategy, impl, call_fraction):
    case = cached_case(strategy, torch.float32, call_id=CALL_IDS["middle"], call_fraction=call_fraction)
    result = run_impl(case, impl)
    check(result, case)
    valid = case.targets != IGNORE
    candidates = valid & ((case.flags & 1) != 0) if strategy in ("lacy", "ignore") else valid
    assert torch.equal(result["is_call"], candidates if call_fraction == 1.0 else torch.zeros_like(valid))


# ----------------------------------------------------------------------------------------
# Semantics, checked by hand rather than against the reference
# ----------------------------------------------------------------------------------------


def _by_hand(logits, targets, flags, call_id, strategy, call_fraction, renormalize=True):
    """Loss and d loss / d logits from the method's definition, in plain Python floats."""
    rows = []
    for z, y, f in zip(logits.tolist(), targets.tolist(), flags.tolist()):
        e = [math.exp(x) for x in z]
        total = sum(e)
        p = [x / total for x in e]
        if y == IGNORE:
            rows.append(None)
            continue
        p_nc = [0.0 if v == call_id else x / (total - e[call_id]) for v, x in enumerate(e)]
        rows.append({"p": p, "p_nc": p_nc, "y": y, "fact": f & 1, "nll": -math.log(p_nc[y])})
    facts = [i for i, r in enumerate(rows) if r and r["fact"]]
    k = math.floor(call_fraction * len(facts))
    # ranked by the renormalised nll under both objectives
    selected = set(sorted(facts, key=lambda i: -rows[i]["nll"])[:k]) if strategy in ("lacy", "ignore") else set()
    losses, grads = {}, {}
    for i, r in enumerate(rows):
        if r is None or (strategy == "ignore" and i in selected):
            continue
        if strategy == "none" or (not renormalize and i not in selected):
            losses[i] = -math.log(r["p"][r["y"]])
            grads[i] = [p - (v == r["y"]) for v, p in enumerate(r["p"])]
        elif i in selected:
            losses[i] = -math.log(r["p"][call_id])
            grads[i] = [p - (v == call_id) for v, p in enumerate(r["p"])]
        else:
            losses[i] = r["nll"]
            grads[i] = [p - (v == r["y"]) for v, p in enumerate(r["p_nc"])]
    count = len(losses)
    grad = torch.zeros_like(logits)
    for i, g in grads.items():
        grad[i] = torch.tensor(g, dtype=logits.dtype) / count
    return sum(losses.values()) / count, grad, selected


@pytest.mark.parametrize("renormalize", RENORMALIZE)
@pytest.mark.parametrize("strategy", ["lacy", "ignore", "none"])
@pytest.mark.parametrize("impl", IMPLS)
def test_semantics_by_hand(impl, strategy, renormalize):
    """Weight = identity, so the logits are the hidden states and every number is checkable."""
    call_id = 3
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0, 0.3],  # fact, target 2: high nll -> CALL
                           [3.0, 0.1, 0.2, -0.5, 1.0, 0.0],  # fact, target 0: low nll
                           [0.0, 1.0, 2.0, 0.5, -2.0, 1.5],  # not a fact
                           [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # no target
                           [0.2, -0.3, 0.9, 2.5, 0.4, -1.1]], dtype=torch.float64)  # fact, target 4
    targets = torch.tensor([2, 0, 5, IGNORE, 4])
    flags = torch.tensor([1, 1, 0, 1, 1], dtype=torch.uint8)
    loss_hand, grad_hand, selected = _by_hand(logits, targets, flags, call_id, strategy, 0.67, renormalize)
    assert selected == ({0, 4} if strategy != "none" else set())  # floor(0.67 * 3) = 2 highest-nll facts
    if not renormalize and strategy != "none":  # the full softmax pushes p(CALL) down on row 2
        assert grad_hand[2, call_id] > 0
    dtype = torch.float64 if impl in ("torch", "chunked") else torch.float32
    h = logits.to(dtype).to(DEVICE).requires_grad_()
    w = torch.eye(6, dtype=dtype, device=DEVICE).requires_grad_()
    loss, stats = lacy_linear_cross_entropy(h, w, targets.to(DEVICE), flags.to(DEVICE), call_id,
                                            strategy=strategy, call_fraction=0.67, impl=impl, renormalize=renormalize)
    loss.backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(float(loss) - loss_hand) < tol
    assert torch.allclose(h.grad.cpu().double(), grad_hand, atol=tol, rtol=0)
    assert torch.allclose(w.grad.cpu().double(), grad_hand.T @ logits, atol=tol * 10, rtol=0)
    assert stats["is_call"].cpu().tolist() == [i in selected for i in range(5)]
    p_call = torch.softmax(logits, -1)[:, call_id]
    assert torch.allclose(stats["p_call"].cpu().double(), p_call, atol=tol, rtol=0)
    assert float(stats["nll"][3]) == 0.0


def test_select_calls_matches_brute_force():
    gen = torch.Generator().manual_seed(7)
    for trial in range(40):
        n = int(torch.randint(1, 60, (), generator=gen))
        nll = torch.randint(0, 6, (n,), generator=gen).double()  # many ties
        valid = torch.rand(n, generator=gen) < 0.8
        flags = torch.randint(0, 4, (n,), generator=gen, dtype=torch.uint8)
        ref_nll = torch.randint(0, 3, (n,), generator=gen).double()
        fraction = [0.0, 0.29, 0.5, 0.6, 1.0][trial % 5]
        for strategy in STRATEGIES:
            got = select_calls(strategy, nll, valid, flags, fraction, ref_nll).tolist()
            fact = [bool(v and f & 1) for v, f in zip(valid.tolist(), flags.tolist())]
            if strategy == "none":
                want = set()
            elif strategy == "spacy":
                want = {i for i in range(n) if fact[i]}
            elif strategy == "judge":
                want = {i for i in range(n) if valid[i] and flags[i] & 2}
            else:
                cands = [i for i in range(n) if (fact[i] if strategy in ("lacy", "ignore") else valid[i])]
                score = (nll - ref_nll if strategy == "rho" else nll).tolist()
                ranked = sorted(cands, key=lambda i: (-score[i], i))  # ties: earlier position first
                want = set(ranked[:math.floor(fraction * len(cands))])
            assert got == [i in want for i in range(n)], (strategy, fraction, n)


@pytest.mark.parametrize("impl", IMPLS)
def test_target_equal_to_call_id_counts_as_no_target(impl):
    """<CALL> never occurs in text; as a target (or out of range) it is treated like ignore_index."""
    case = cached_case("lacy", torch.float32, call_id=CALL_IDS["middle"])
    odd = case.targets.clone()
    odd[[0, 5]] = case.call_id
    odd[[9]] = 10_000
    ignored = odd.clone()
    ignored[[0, 5, 9]] = IGNORE
    results = []
    for targets in (odd, ignored):
        h = case.hidden.to(DEVICE).requires_grad_()
        w = case.weight.to(DEVICE).requires_grad_()
        loss, stats = lacy_linear_cross_entropy(h, w, targets.to(DEVICE), case.flags.to(DEVICE), case.call_id,
                                                impl=impl)
        loss.backward()
        results.append((loss.detach(), stats["nll"], stats["is_call"], h.grad, w.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert not results[0][2][[0, 5, 9]].any() and not results[0][1][[0, 5, 9]].any()


# ----------------------------------------------------------------------------------------
# The tolerance scheme can fail
# ----------------------------------------------------------------------------------------


def test_check_rejects_a_result_just_outside_the_tolerance():
    case = cached_case("lacy", torch.bfloat16, call_id=CALL_IDS["end"])
    for name in COMPARED:
        bad = dict(case.truth)
        bad = {k: (v.to(case.ref[k].dtype) if k in COMPARED else v) for k, v in bad.items()}
        bad[name] = (case.truth[name] + 1.5 * tolerance(name, case)).to(case.ref[name].dtype)
        with pytest.raises(AssertionError, match=name):
            check(bad, case)
    assert K * err(case.ref["nll"], case.truth["nll"]) > 0  # bf16 costs PyTorch a measurable error


# ----------------------------------------------------------------------------------------
# torch.compile, opcheck, no host synchronisation, no (N, V) buffer
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", RENORMALIZE)
@pytest.mark.parametrize("impl", ["chunked", TRITON])
def test_torch_compile_fullgraph(impl, renormalize):
    """The op traces with no graph break, with the selection bound a host int that changes
    from step to step (the compiled function sees two values), and agrees with eager."""
    case = cached_case("lacy", torch.float32, call_id=CALL_IDS["middle"], renormalize=renormalize)

    def step(h, w, t, f, bound):
        loss, stats = lacy_linear_cross_entropy(h, w, t, f, case.call_id, strategy="lacy", impl=impl,
                                                renormalize=renormalize, max_selected=bound)
        return loss, stats["is_call"], stats["nll"]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    for bound in (loop_bound(case), case.host_count()):
        outs = []
        for fn in (step, compiled):
            h = case.hidden.to(DEVICE).requires_grad_()
            w = case.weight.to(DEVICE).requires_grad_()
            loss, is_call, nll = fn(h, w, case.targets.to(DEVICE), case.flags.to(DEVICE), bound)
            loss.backward()
            outs.append((loss.detach(), is_call, nll, h.grad, w.grad))
        for eager, comp in zip(*outs):
            assert torch.allclose(eager, comp, rtol=0, atol=0) if eager.dtype == torch.bool else \
                torch.allclose(eager, comp, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("grads", [True, False])
def test_opcheck(grads, renormalize):
    case = cached_case("rho", torch.float32, call_id=CALL_IDS["middle"])
    h = case.hidden.clone().requires_grad_(grads)
    w = case.weight.clone().requires_grad_(grads)
    args = (h, w, case.targets, case.flags, case.ref_nll, case.call_id, loop_bound(case), grads, "chunked",
            "rho", 0.6, IGNORE, renormalize, 0.5, True)
    torch.library.opcheck(torch.ops.lacy_fast.lacy_ce.default, args)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_chunked_path_runs_on_meta_tensors(strategy, renormalize, monkeypatch):
    """Meta tensors have no data: a .item(), a bool(tensor) or any data-dependent branch in
    the one-pass algorithm, its chunked backend or the selection would raise here, so this
    proves there is none."""
    monkeypatch.delenv(CHUNK_ROWS_ENV)
    n, d, v, call_id = 37, 48, 211, 105
    meta = dict(device="meta")
    h, w = torch.empty(n, d, **meta), torch.empty(v, d, **meta)
    targets, flags = torch.empty(n, dtype=torch.int64, **meta), torch.empty(n, dtype=torch.uint8, **meta)
    for grads in (True, False):
        opts = LossOptions(strategy, 0.6, IGNORE, renormalize, *((0.5, True) if strategy in RELABEL_RANKED else ()))
        out = lacy_ce_one_pass(CHUNKED, h, w, targets, flags, torch.empty(n, **meta), call_id, opts, 20, grads)
        loss, _, is_call, _, grad_h, grad_w, scale = out
        assert loss.shape == () and is_call.dtype == torch.bool and scale.shape == ()
        assert (grad_h.shape, grad_w.shape) == ((h.shape, w.shape) if grads else ((0,), (0,)))


def _peak_bytes(fn) -> int:
    """Peak resident bytes of ``fn()`` after a warm-up call (harness.peak_memory, VmHWM),
    with glibc's mmap threshold pinned (harness.set_mmap_threshold says why)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from harness import GLIBC_MMAP_THRESHOLD, PINNED_MMAP_THRESHOLD, peak_memory, set_mmap_threshold

    if not set_mmap_threshold(PINNED_MMAP_THRESHOLD):
        pytest.skip("needs glibc to pin malloc's mmap threshold")
    try:
        fn()
        peak = peak_memory(fn, "cpu")
    finally:
        set_mmap_threshold(GLIBC_MMAP_THRESHOLD)
    if peak is None:
        pytest.skip("this system does not report peak memory")
    return peak


@pytest.mark.slow
def test_chunked_allocates_no_n_by_v_buffer(monkeypatch):
    monkeypatch.delenv(CHUNK_ROWS_ENV)
    n, d, v = 4096, 64, 32064
    nv_bytes = n * v * 4  # one fp32 (N, V) buffer: 525 MB
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=gen).requires_grad_()
    w = (torch.randn(v, d, generator=gen) / 8).requires_grad_()
    targets = torch.randint(0, v - 1, (n,), generator=gen)
    flags = torch.randint(0, 4, (n,), generator=gen, dtype=torch.uint8)

    def step(impl):
        loss, _ = lacy_linear_cross_entropy(h, w, targets, flags, v - 1, impl=impl)
        torch.autograd.grad(loss, (h, w))

    materialised = _peak_bytes(lambda: step("torch"))
    chunked = _peak_bytes(lambda: step("chunked"))
    assert materialised > nv_bytes, "the measurement should see the reference's (N, V) logits"
    # The design's bound: one chunk of logits, hidden- and weight-sized fp32 buffers, each a few times.
    bound = 4 * (chunk_rows(n, d, v) * v + n * d + v * d) * 4
    assert chunked < bound < nv_bytes / 2, f"chunked peak {chunked / 1e6:.0f} MB, bound {bound / 1e6:.0f} MB"


# ----------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, fragment", [
    ({"strategy": "lazy"}, "strategy 'lazy' is unknown"),
    ({"renormalize": "no"}, "renormalize must be True or False"),
    ({"max_selected": -1}, "max_selected must be None or a host-side int"),
    ({"max_selected": torch.tensor(3)}, "max_selected must be None or a host-side int"),
    ({"impl": "cuda"}, "impl 'cuda' is unknown"),
    ({"strategy": "rho"}, 'strategy "rho" needs ref_nll'),
    ({"call_fraction": 1.5}, "call_fraction is 1.5"),
    ({"call_id": 211}, "call_id 211 is outside"),
    ({"targets": torch.zeros(36, dtype=torch.int64)}, "must both be"),
    ({"flags": torch.zeros(37)}, "flags an integer tensor"),
    ({"hidden": torch.zeros(37, 47)}, "must be \\(N, D\\) and \\(V, D\\)"),
    ({"call_weight": 0.0}, "call_weight is 0.0; it must lie in \\(0, 1\\]"),
    ({"call_weight": 1.5}, "call_weight is 1.5"),
    ({"weight_by_error": 1}, "weight_by_error must be True or False"),
    ({"strategy": "spacy", "call_weight": 0.5}, "not to 'spacy'"),
    ({"strategy": "ignore", "weight_by_error": True}, "not to 'ignore'"),
])
def test_bad_arguments_raise_one_sentence(change, fragment):
    args = dict(hidden=torch.zeros(37, 48), weight=torch.zeros(211, 48), targets=torch.zeros(37, dtype=torch.int64),
                flags=torch.zeros(37, dtype=torch.uint8), call_id=210, impl="chunked")
    args.update(change)
    with pytest.raises(LacyLossArgumentError, match=fragment) as info:
        lacy_linear_cross_entropy(**args)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not op.HAS_TRITON, reason="needs triton")
def test_triton_on_cpu_without_interpreter_fails_clearly():
    code = ("import torch\nfrom lacy_fast.kernels import lacy_linear_cross_entropy as f\n"
            "try:\n    f(torch.zeros(3, 8), torch.zeros(5, 8), torch.zeros(3, dtype=torch.int64), "
            "torch.zeros(3, dtype=torch.uint8), 4, impl='triton')\n"
            "except ValueError as e:\n    print('ERROR:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert 'ERROR: impl="triton" needs CUDA tensors' in out.stdout, out.stdout + out.stderr


def test_without_triton_the_torch_paths_work():
    """No triton wheel (macOS, Windows): the package imports, chunked runs, triton says why not."""
    code = ("import sys\nsys.modules['triton'] = None\nimport torch\n"
            "from lacy_fast.kernels import lacy_linear_cross_entropy as f\n"
            "args = (torch.randn(5, 8), torch.randn(7, 8), torch.tensor([0, 1, 2, -100, 4]), "
            "torch.ones(5, dtype=torch.uint8), 6)\n"
            "print('LOSS', float(f(*args, impl='auto')[0]))\n"
            "try:\n    f(*args, impl='triton')\nexcept ValueError as e:\n    print('ERROR:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "LOSS" in out.stdout and 'ERROR: impl="triton" needs the triton package' in out.stdout, out.stderr


# ----------------------------------------------------------------------------------------
# GPU only: real kernels, model-sized shapes, CUDA graphs, no host sync, memory bound
# ----------------------------------------------------------------------------------------


def _gpu_inputs(n, d, v, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(n, d, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(v, d, device="cuda", generator=gen) * (2.0 / math.sqrt(d))).to(dtype)
    targets = torch.randint(0, v - 1, (n,), device="cuda", generator=gen)
    targets[torch.rand(n, device="cuda", generator=gen) < 0.1] = IGNORE
    flags = torch.randint(0, 4, (n,), device="cuda", generator=gen, dtype=torch.uint8)
    return h, w, targets, flags


@pytest.mark.gpu
@pytest.mark.parametrize("renormalize", RENORMALIZE)
@pytest.mark.parametrize("strategy, call_fraction", [("none", 0.6), ("spacy", 0.6), ("judge", 0.6), ("lacy", 1.0),
                                                     ("ignore", 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_triton_at_model_shapes(strategy, call_fraction, dtype, renormalize, monkeypatch):
    """Real tiles (128 x 128) at an odd N and the paper's vocabulary, several chunks, with
    the loop's selection bound; strategies whose selection does not depend on rounding (a
    large N has near-ties at the k-th score)."""
    n, d, v = 1031, 768, 32064
    monkeypatch.setenv(CHUNK_ROWS_ENV, "384")  # 3 chunks: 384, 384, 263 rows
    h, w, targets, flags = _gpu_inputs(n, d, v, dtype)
    call_id = v // 2
    valid = valid_targets(targets, v, call_id, IGNORE)
    count = int(selection_size(strategy, valid, flags, call_fraction))  # the host-side count, read outside the op
    kwargs = dict(call_id=call_id, strategy=strategy, call_fraction=call_fraction, renormalize=renormalize)
    results = {}
    for name, impl, hh, ww in (("truth", "torch", h.double(), w.double()), ("ref", "torch", h, w), ("impl", "triton", h, w)):
        hh, ww = hh.detach().requires_grad_(), ww.detach().requires_grad_()
        hint = {} if impl == "torch" else {"max_selected": selection_bound(count, n)}
        loss, stats = lacy_linear_cross_entropy(hh, ww, targets, flags, impl=impl, **kwargs, **hint)
        gh, gw = torch.autograd.grad(loss, (hh, ww), grad_outputs=torch.tensor(0.8, dtype=loss.dtype, device="cuda"))
        results[name] = {"loss": loss.detach(), **stats, "grad_hidden": gh, "grad_weight": gw}
    truth, ref, got = results["truth"], results["ref"], results["impl"]
    assert torch.equal(got["is_call"], truth["is_call"])
    for name in COMPARED:
        scale = float(truth[name].abs().max())
        tol = K * err(ref[name], truth[name]) + 8 * torch.finfo(ref[name].dtype).eps * scale
        assert err(got[name], truth[name]) <= tol, name


@pytest.mark.gpu
@pytest.mark.parametrize("renormalize", RENORMALIZE)
def test_gpu_no_host_sync_and_cuda_graph(renormalize):
    n, d, v = 4096, 768, 32064
    h, w, targets, flags = _gpu_inputs(n, d, v, torch.bfloat16)
    h.requires_grad_()
    w.requires_grad_()
    bound = selection_bound(int(selection_size("lacy", valid_targets(targets, v, v - 1, IGNORE), flags, 0.6)), n)

    def step():
        loss, stats = lacy_linear_cross_entropy(h, w, targets, flags, v - 1, impl="triton", renormalize=renormalize,
                                                max_selected=bound)
        gh, gw = torch.autograd.grad(loss, (h, w))
        return loss, stats["is_call"], gh, gw

    eager = step()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)  # deterministic kernels: bitwise the same


@pytest.mark.gpu
def test_gpu_extra_memory_is_not_n_by_v():
    n, d, v = 16384, 1024, 32064
    h, w, targets, flags = _gpu_inputs(n, d, v, torch.bfloat16)
    h.requires_grad_()
    w.requires_grad_()
    lacy_linear_cross_entropy(h, w, targets, flags, v - 1, impl="triton")  # compile outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, _ = lacy_linear_cross_entropy(h, w, targets, flags, v - 1, impl="triton")
    torch.autograd.grad(loss, (h, w))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    bound = 4 * (n * d + v * d) * 4  # a few fp32 copies of hidden and weight
    assert extra < bound, f"{extra / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"
    assert extra < n * v * 2 / 2


def test_top_level_kernels_name_registers_nothing_twice():
    """transformers imports a top-level ``kernels`` when it finds one; from a checkout's root
    that is this folder. The op must keep working after such an import (it once crashed)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import torch\n"
        "from lacy_fast.kernels import lacy_linear_cross_entropy as op\n"
        "import kernels\n"
        "assert not hasattr(kernels, 'lacy_linear_cross_entropy') and 'kernels.lacy_ce' not in sys.modules\n"
        "h = torch.randn(5, 8, requires_grad=True); w = torch.randn(11, 8, requires_grad=True)\n"
        "loss, _ = op(h, w, torch.randint(3, 11, (5,)), torch.ones(5, dtype=torch.uint8), 2, impl='chunked')\n"
        "loss.backward(); print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


_ROW_SUMS = """
import hashlib, torch
from lacy_fast.kernels.lacy_ce_reference import _add_one_hot_rows
torch.manual_seed(0)
n, d, v = 1024, 128, 2049
h, b = torch.randn(n, d), torch.randn(n)
targets = torch.randint(0, 64, (n,))  # many rows per target: the order of the sums matters
grad_weight = torch.zeros(v, d)
_add_one_hot_rows(grad_weight, targets, b, None, h, call_id=v - 1)
print(hashlib.sha256(grad_weight.numpy().tobytes()).hexdigest())
"""


def test_one_hot_rows_sum_the_same_in_every_process():
    """The op's gradients must not depend on the process: a multithreaded index_put_ on CPU
    summed the one-hot rows in another order in each process (two runs of one training could
    end with other weights), which no in-process test sees. Two threads, three processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    digests = {subprocess.run([sys.executable, "-c", _ROW_SUMS], env=env, capture_output=True, text=True,
                              check=True).stdout for _ in range(3)}
    assert len(digests) == 1, digests
