"""Pure-PyTorch pieces of the LaCy LM-head loss: selection, the reference, the one-pass
algorithm and its chunked PyTorch backend. Nothing here synchronises with the host: Python
branches only on arguments (strategy, dtype, shapes, the host-side bound), never on data.

- ``select_calls``: which positions become <CALL> (shared by every implementation).
- ``LossOptions``: the op's scalar options, one value below the custom op's schema.
- ``lacy_ce_torch``: the plain reference over materialised (N, V) logits (the tests' fp64
  truth and error yardstick, the benchmark's baseline).
- ``lacy_ce_one_pass``: the algorithm of the fused implementations, over a backend:
  ``CHUNKED`` here (the CPU training path), the Triton one in lacy_ce.py.
- ``finish_rows``: from the per-row statistics to the loss and the stats.

docs/loss-op.md states the semantics, derives the one-pass algorithm's correction and says
how the selection bound reaches the op.
"""
from __future__ import annotations

import math
import os
import types
from dataclasses import dataclass, fields

import torch

# The strategy names, the flag bits and the valid-target rule are defined once, in
# lacy_fast.method; they are imported (and re-exported) here.
from lacy_fast.method import (FLAG_FACT, FLAG_JUDGE, RANK_FACTS, RANKED, RELABEL_RANKED, STRATEGIES,  # noqa: F401
                              valid_targets)

# Rows per chunk are chosen so one chunk of logits (rows x V) holds about as many elements
# as the larger of hidden (N x D) and weight (V x D): the extra memory stays O(N*D + V*D)
# while each chunk's matmuls stay large enough to run at full speed.
CHUNK_ROWS_ENV = "LACY_FAST_CE_CHUNK_ROWS"  # a fixed number of rows per chunk (tests, tuning)
BOUND_BUCKETS = 128  # selection_bound rounds a count up to a multiple of N / BOUND_BUCKETS rows
BOUND_MIN_BUCKET = 16


def chunk_rows(n: int, d: int, v: int, multiple: int = 128) -> int:
    """Rows per chunk of logits: about max(N, V) * D / V elements, a multiple of ``multiple``."""
    forced = os.environ.get(CHUNK_ROWS_ENV)
    if forced:
        return max(1, int(forced))
    rows = -(-max(n, v) * d // v)
    rows = -(-rows // multiple) * multiple
    return max(1, min(rows, n))


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are fp32 (fp64 for fp64 inputs, which only the tests use)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------
# Selection, on device
# ----------------------------------------------------------------------------------------


def _candidates(strategy: str, valid: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the positions a strategy selects from (all of them for spacy and judge)."""
    if strategy in RANK_FACTS or strategy == "spacy":
        return valid & ((flags & FLAG_FACT) != 0)
    if strategy == "judge":
        return valid & ((flags & FLAG_JUDGE) != 0)
    return valid


def selection_size(strategy: str, valid: torch.Tensor, flags: torch.Tensor, call_fraction: float) -> torch.Tensor:
    """() int64 on device: how many positions ``select_calls`` selects. It depends on the
    flags and the valid targets only, never on the scores."""
    if strategy == "none":
        return torch.zeros((), dtype=torch.int64, device=valid.device)
    count = _candidates(strategy, valid, flags).sum()
    if strategy in RANKED:
        # float64 so that floor() sees the same product Python's float would (0.6 * 10 == 6.0).
        return torch.floor(count.double() * call_fraction).long()
    return count


def select_calls(
    strategy: str,
    nll: torch.Tensor,  # (N,) float: current renormalised nll (0 where invalid)
    valid: torch.Tensor,  # (N,) bool
    flags: torch.Tensor,  # (N,) integer: bit 0 fact, bit 1 judge label
    call_fraction: float,
    ref_nll: torch.Tensor | None = None,  # (N,) float, strategy "rho" only
) -> torch.Tensor:
    """(N,) bool: the positions whose target becomes <CALL> (for ``ignore``: is dropped).

    Ranked strategies take the floor(call_fraction * #candidates) candidates with the
    highest score; ties go to the earlier position (stable sort). ``k`` stays a tensor.
    """
    nll = nll.detach()
    if strategy == "none":
        return torch.zeros_like(valid)
    candidates = _candidates(strategy, valid, flags)
    if strategy not in RANKED:
        return candidates
    score = nll.double()
    if strategy == "rho":
        score = score - ref_nll.detach().double()
    score = torch.where(candidates, score, float("-inf"))
    k = selection_size(strategy, valid, flags, call_fraction)
    order = torch.argsort(score, descending=True, stable=True)  # (N,) positions, best first
    in_top_k = torch.arange(score.numel(), device=score.device) < k  # (N,) by rank
    selected = torch.zeros_like(candidates).scatter(0, order, in_top_k)
    return candidates & selected


# ----------------------------------------------------------------------------------------
# The selection bound, on the host
# ----------------------------------------------------------------------------------------


def static_bound(strategy: str, call_fraction: float, n_rows: int) -> int:
    """The most rows the correction of ``strategy`` can have among ``n_rows``, from the
    arguments alone: floor(call_fraction * n_rows) for the ranked strategies; 0 for none,
    spacy and judge (their selection is known before any logit and needs no correction)."""
    if strategy in RANKED:
        return min(n_rows, math.floor(n_rows * call_fraction))
    return 0


def selection_bound(count: int, n_rows: int) -> int:
    """A host-side selection count rounded up to a bucket of ``n_rows / 128`` rows (at least
    16), at most ``n_rows``: the ``max_selected`` to pass for a batch of ``n_rows`` whose
    count is known on the host (docs/loss-op.md says why buckets)."""
    if count <= 0:
        return 0
    bucket = max(BOUND_MIN_BUCKET, -(-n_rows // BOUND_BUCKETS))
    return min(n_rows, -(-count // bucket) * bucket)


# ----------------------------------------------------------------------------------------
# The objective's options, and the weight of <CALL> on a selected row
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossOptions:
    """The op's scalar options, one value below the custom op's schema (which takes them as
    separate arguments), so a new option is added here and in the schema, not in every
    function between them."""

    strategy: str = "lacy"
    call_fraction: float = 0.6
    ignore_index: int = -100
    renormalize: bool = True
    call_weight: float = 1.0  # lambda: the <CALL> share of a selected row's loss (1: the paper's relabel)
    weight_by_error: bool = False  # lambda_i = call_weight (1 - p(y) / p_max) ([IDK]-token objective)

    def values(self) -> tuple:
        """The options in field order: the op's schema arguments."""
        return tuple(getattr(self, field.name) for field in fields(self))

    @property
    def soft(self) -> bool:
        """Whether a selected row keeps part of its ground-truth loss."""
        return self.call_weight != 1.0 or self.weight_by_error

    @property
    def plain(self) -> bool:
        """Whether ordinary rows are scored by plain cross-entropy over the full vocabulary."""
        return self.strategy == "none" or not self.renormalize


def call_weights(opts: LossOptions, z_target: torch.Tensor, z_max: torch.Tensor) -> torch.Tensor | None:
    """(N,) lambda_i of every row (used on the selected ones), or None for the paper's relabel.

    A selected row's loss is (1 - lambda_i) ordinary(y) + lambda_i (-log p(CALL)). Fixed:
    lambda_i = call_weight. By error (Cohen et al. 2024's [IDK] objective): lambda_i =
    call_weight (1 - p(y) / p_max) with p_max the row's largest probability among the real
    tokens: 0 where the target is already the argmax, near call_weight where the model is
    far from it. p(y) / p_max = exp(z_y - z_max) needs no normaliser. Detached: the weight
    is a coefficient of the loss, not a path for its gradient.
    """
    if not opts.soft:
        return None
    if not opts.weight_by_error:
        return torch.full_like(z_target, opts.call_weight)
    ratio = torch.exp(torch.clamp(z_target - z_max, max=0.0))  # (N,) p(y) / p_max in [0, 1]
    return (opts.call_weight * (1.0 - ratio)).detach()


# ----------------------------------------------------------------------------------------
# The reference: materialised logits, autograd does the backward
# ----------------------------------------------------------------------------------------


def lacy_ce_torch(
    hidden: torch.Tensor,  # (N, D)
    weight: torch.Tensor,  # (V, D)
    targets: torch.Tensor,  # (N,) int64
    flags: torch.Tensor,  # (N,) integer
    call_id: int,
    opts: LossOptions = LossOptions(),
    ref_nll: torch.Tensor | None = None,
    selected: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The LaCy loss written the obvious way, over materialised (N, V) logits.

    The matmul runs in the input dtype (as a PyTorch training step would), everything
    after it in fp32 (fp64 for fp64 inputs). ``selected``: (N,) bool, a selection to use
    instead of ``select_calls``'s (to check another implementation's loss and gradients
    given its own selection where near-ties at the k-th score make rounding decide it).
    """
    sdt = stat_dtype(hidden.dtype)
    vocab = weight.shape[0]
    logits = (hidden @ weight.T).to(sdt)  # (N, V)
    valid = valid_targets(targets, vocab, call_id, opts.ignore_index)  # (N,)
    y = torch.where(valid, targets, 0)  # (N,) a harmless column where there is no target
    log_p = torch.log_softmax(logits, dim=-1)  # (N, V) full softmax, <CALL> included
    no_call = torch.ones(vocab, dtype=torch.bool, device=logits.device)
    no_call[call_id] = False
    log_p_nc = torch.log_softmax(logits.masked_fill(~no_call, float("-inf")), dim=-1)  # (N, V)
    nll = torch.where(valid, -log_p_nc.gather(1, y[:, None])[:, 0], 0.0)  # (N,) renormalised
    full_nll = -log_p.gather(1, y[:, None])[:, 0]  # (N,) plain cross-entropy
    call_nll = -log_p[:, call_id]  # (N,)
    if selected is None:
        selected = select_calls(opts.strategy, nll, valid, flags, opts.call_fraction, ref_nll)
    ordinary = full_nll if opts.plain else nll
    z_max = logits.masked_fill(~no_call, float("-inf")).amax(dim=1)  # (N,) the largest real-token logit
    lam = call_weights(opts, logits.gather(1, y[:, None])[:, 0], z_max)  # (N,) or None
    call_row = call_nll if lam is None else ordinary + lam * (call_nll - ordinary)
    per_row = torch.where(selected, call_row, ordinary)
    counted = valid & ~selected if opts.strategy == "ignore" else valid
    per_row = torch.where(counted, per_row, 0.0)
    loss = per_row.sum() / counted.sum().clamp(min=1)
    stats = {"nll": nll.detach(), "is_call": selected, "p_call": torch.exp(-call_nll).detach()}
    return loss, stats


# ----------------------------------------------------------------------------------------
# From per-row statistics to loss and stats (every fused path)
# ----------------------------------------------------------------------------------------


def finish_rows(
    lse_nc: torch.Tensor,  # (N,) log-sum-exp over every column but <CALL>
    z_call: torch.Tensor,  # (N,) the <CALL> logit
    z_target: torch.Tensor,  # (N,) the target logit (anything where there is no target)
    lam: torch.Tensor | None,  # (N,) call_weights (None: the paper's relabel)
    valid: torch.Tensor,  # (N,) bool
    flags: torch.Tensor,
    ref_nll: torch.Tensor | None,
    opts: LossOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, nll, is_call, p_call), all on device."""
    strategy = opts.strategy
    lse = torch.logaddexp(lse_nc, z_call)  # (N,) full log-normaliser, stable
    nll = torch.where(valid, lse_nc - z_target, 0.0)
    p_call = torch.exp(z_call - lse)
    selected = select_calls(strategy, nll, valid, flags, opts.call_fraction, ref_nll)
    ordinary = lse - z_target if opts.plain else nll
    call_row = lse - z_call if lam is None else ordinary + lam * (lse - z_call - ordinary)
    row_loss = torch.where(selected, call_row, ordinary)
    counted = valid & ~selected if strategy == "ignore" else valid
    denom = counted.sum().clamp(min=1).to(lse.dtype)
    loss = torch.where(counted, row_loss, 0.0).sum() / denom
    return loss, nll, selected, p_call


def ordinary_coefs(lse_nc: torch.Tensor, z_call: torch.Tensor, coef: torch.Tensor, plain: bool,
                   to_call: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, c) of step 1's d loss / d logits, in the form every backend computes:

        dz[i, v] = a[i] exp(z[i, v] - lse_nc[i]) [v != CALL] + c[i] [v == CALL] + b[i] [v == y[i]]

    Renormalised (q - onehot(y)): a = coef, b = -coef, c = 0. Full softmax (p - onehot(y),
    with p_v = (1 - p_c) q_v off the CALL column): a = coef (1 - p_c), b = -coef,
    c = coef p_c. Rows of ``to_call`` (a selection known before any logit: spacy, judge)
    get their final <CALL> gradient p - onehot(CALL): a = coef (1 - p_c), b = 0,
    c = -coef (1 - p_c).
    """
    b = -coef
    if not plain and to_call is None:
        return coef, b, torch.zeros_like(coef)
    keep = torch.sigmoid(lse_nc - z_call)  # 1 - p_c, accurate when p_c is near 1
    if plain:
        a, c = coef * keep, coef * torch.sigmoid(z_call - lse_nc)
    else:
        a, c = coef, torch.zeros_like(coef)
    if to_call is not None:
        a = torch.where(to_call, coef * keep, a)
        b = torch.where(to_call, 0.0, b)
        c = torch.where(to_call, -coef * keep, c)
    return a, b, c


# ----------------------------------------------------------------------------------------
# The one-pass algorithm, over a backend (docs/loss-op.md)
# ----------------------------------------------------------------------------------------


def lacy_ce_one_pass(backend, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, flags: torch.Tensor,
                     ref_nll: torch.Tensor | None, call_id: int, opts: LossOptions, bound: int, grads: bool
                     ) -> tuple[torch.Tensor, ...]:
    """(loss, nll, is_call, p_call, grad_hidden, grad_weight, grad_scale). ``backend``: a
    namespace of row_stats, ordinary and delta_weight (``CHUNKED`` below, or lacy_ce.TRITON).

    The gradients are those of the loss itself (upstream gradient 1), in the input dtypes;
    the backward multiplies them by the upstream gradient times ``grad_scale``, which is 1,
    or NaN when more than ``bound`` rows were selected (the loss is NaN then too). With
    ``grads=False`` only the statistics are computed (one logit pass) and both gradients
    are empty.
    """
    n = hidden.shape[0]
    vocab = weight.shape[0]
    sdt = stat_dtype(hidden.dtype)
    strategy, call_fraction = opts.strategy, opts.call_fraction
    valid = valid_targets(targets, vocab, call_id, opts.ignore_index)
    y = torch.where(valid, targets, 0)  # (N,) a harmless column where there is no target
    if not grads:
        lse_nc, z_call, z_target, z_max = backend.row_stats(hidden, weight, y, call_id)
        loss, nll, selected, p_call = finish_rows(lse_nc, z_call, z_target, call_weights(opts, z_target, z_max),
                                                  valid, flags, ref_nll, opts)
        return (loss, nll, selected, p_call, hidden.new_empty(0), weight.new_empty(0),
                torch.ones((), dtype=sdt, device=hidden.device))

    # 1. Statistics and the ordinary gradients of every valid row, in one pass.
    n_counted = valid.sum()
    if strategy == "ignore":
        n_counted = n_counted - selection_size(strategy, valid, flags, call_fraction)
    # (N,) d loss / d row loss; 0 when nothing is counted (``ignore`` dropping every row), so
    # the gradients are exactly zero then, not a sum cancelled by the correction.
    coef = torch.where(n_counted > 0, valid.to(sdt) / n_counted.clamp(min=1).to(sdt), 0.0)
    # spacy and judge select by the flags alone: their rows get the <CALL> gradient right away.
    to_call = None if strategy in RANKED or strategy == "none" else \
        select_calls(strategy, torch.zeros_like(coef), valid, flags, call_fraction)
    lse_nc, z_call, z_target, z_max, grad_hidden, grad_weight = backend.ordinary(
        hidden, weight, y, coef, call_id, opts.plain, to_call, strategy == "none")
    # 2. Selection.
    lam = call_weights(opts, z_target, z_max)
    loss, nll, selected, p_call = finish_rows(lse_nc, z_call, z_target, lam, valid, flags, ref_nll, opts)
    grad_scale = torch.ones((), dtype=sdt, device=hidden.device)
    # 3. The correction of the selected rows (ranked strategies: selected by the scores).
    if strategy in RANKED and bound > 0 and n > 0:
        _correct_selected(backend, hidden, weight, y, coef, lse_nc, z_call, lam, selected, grad_hidden, grad_weight,
                          call_id, opts, bound)
        grad_scale = torch.where(selected.sum() <= bound, grad_scale, float("nan"))
        loss = loss * grad_scale
    return loss, nll, selected, p_call, grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), grad_scale


def _correct_selected(backend, hidden, weight, y, coef, lse_nc, z_call, lam, selected, grad_hidden, grad_weight,
                      call_id, opts, bound) -> None:
    """Step 3 of the one-pass algorithm, in place on grad_hidden and grad_weight (fp32).

    A soft row (``lam`` not None; never for ignore) moves lam_i of the way from its
    ordinary gradient to the <CALL> one: its loss is linear in lam_i, a detached weight,
    so its grad_weight change is lam_i times the hard change (coef scaled by lam_i) and its
    grad_hidden is dh + lam_i (hard dh - dh).
    """
    strategy, renormalize = opts.strategy, opts.renormalize
    sdt = grad_weight.dtype
    # The selected positions first, in order, then unselected padding up to ``bound`` rows:
    # distinct indices whatever the count, so the write-back below has no conflicts.
    rows = torch.argsort(selected.to(torch.uint8), descending=True, stable=True)[:bound]  # (k,)
    live = selected[rows]
    coef_sel = torch.where(live, coef[rows], 0.0)  # padding rows change nothing
    lam_sel = None if lam is None else lam[rows].to(sdt)  # (k,)
    y_sel = y[rows]
    lse_nc_sel, z_call_sel = lse_nc[rows], z_call[rows]
    keep = torch.sigmoid(lse_nc_sel - z_call_sel)  # 1 - p_c, accurate when p_c is near 1
    p_c = torch.sigmoid(z_call_sel - lse_nc_sel)
    h_sel = hidden[rows]

    dh = grad_hidden[rows].to(sdt)
    if strategy == "ignore":
        changed = torch.zeros_like(dh)
    else:  # (k, D), in place on one buffer: coef (W[y] - W[CALL]) + dh, times 1 - p_c if renormalised
        changed = weight[y_sel].to(sdt).sub_(weight[call_id].to(sdt)).mul_(coef_sel[:, None]).add_(dh)
        if renormalize:
            changed.mul_(keep[:, None])
        if lam_sel is not None:  # dh + lam (hard - dh)
            changed = changed.sub_(dh).mul_(lam_sel[:, None]).add_(dh)
        coef_sel = coef_sel if lam_sel is None else coef_sel * lam_sel  # the weight change scales with lam
    grad_hidden.index_copy_(0, rows, torch.where(live[:, None], changed, dh).to(grad_hidden.dtype))

    if strategy != "ignore" and not renormalize:  # one-hot parts only: no recomputation
        _add_one_hot_rows(grad_weight, y_sel, coef_sel, -coef_sel, h_sel.to(sdt), call_id)
        return
    if strategy == "ignore":  # remove the row's ordinary dz
        a, c = (-coef_sel, torch.zeros_like(coef_sel)) if renormalize else (-coef_sel * keep, -coef_sel * p_c)
    else:  # CALL minus renormalised ordinary: -p_c q, -(1 - p_c) at CALL, +1 at y
        a, c = -coef_sel * p_c, -coef_sel * keep
    backend.delta_weight(h_sel, weight, y_sel, lse_nc_sel, a, coef_sel, c, call_id, grad_weight)


# ----------------------------------------------------------------------------------------
# Chunked PyTorch backend (CPU training): no (N, V) buffer
# ----------------------------------------------------------------------------------------


def _chunked_operands(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The head in the statistics' dtype, and four empty (N,) rows for lse_nc, z_call,
    z_target and z_max."""
    sdt = stat_dtype(hidden.dtype)
    rows = [torch.empty(hidden.shape[0], dtype=sdt, device=hidden.device) for _ in range(4)]
    return weight.to(sdt), tuple(rows)


def row_stats_chunked(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, call_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse_nc, z_call, z_target, z_max), each (N,), one chunk of rows at a time (``targets``
    in [0, V); z_max the largest logit but <CALL>'s). The forward without gradients.

    The chunk's logits are computed in fp32 (fp64 for fp64 inputs): on a CPU a fp32 matmul
    is as fast as a bf16 one and loses nothing. Peak extra memory: one chunk of logits.
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    w, (lse_nc, z_call, z_target, z_max) = _chunked_operands(hidden, weight)
    step = chunk_rows(n, d, vocab)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        z = hidden[rows].to(w.dtype) @ w.T  # (C, V)
        z_target[rows] = z.gather(1, targets[rows, None])[:, 0]
        z_call[rows] = z[:, call_id]
        z[:, call_id] = float("-inf")
        top = z.amax(dim=1)  # (C,) log-sum-exp in place: one chunk buffer, no temporaries
        z_max[rows] = top
        lse_nc[rows] = top + z.sub_(top[:, None]).exp_().sum(dim=1).log()
    return lse_nc, z_call, z_target, z_max


def ordinary_chunked(
    hidden: torch.Tensor,  # (N, D)
    weight: torch.Tensor,  # (V, D)
    targets: torch.Tensor,  # (N,) int64 in [0, V)
    coef: torch.Tensor,  # (N,) d loss / d row loss (0 for rows without loss)
    call_id: int,
    plain: bool,
    to_call: torch.Tensor | None = None,  # (N,) bool: rows whose target is <CALL> from the start
    plain_ce: bool = False,  # strategy none: plain cross-entropy, lse_nc only a statistic
) -> tuple[torch.Tensor, ...]:
    """(lse_nc, z_call, z_target, z_max, grad_hidden, grad_weight): step 1 of the one-pass
    algorithm (z_max: the largest logit but <CALL>'s; for ``plain_ce``, <CALL>'s included,
    which nothing reads: strategy none selects no row).

    Per chunk of C rows, three matmuls: the logits Z (C, V); E = exp(Z - rowmax) in place
    (0 at <CALL>), whose row sums give lse_nc; then, with dz = s E + c onehot(CALL) +
    b onehot(y) and s = a / rowsum(E) (``ordinary_coefs``), grad_hidden[chunk] = s (E @ W)
    + c W[CALL] + b W[y] and grad_weight += E^T (s h) plus the one-hot rows b h at y and
    sum(c h) at CALL. The per-row factors act on (C, D) operands, never on the (C, V)
    buffer, which sees four elementwise passes (max, subtract, exp, sum) and the two
    products. For ``plain_ce`` (strategy none) E keeps its <CALL> column (the max is over
    every column) and c vanishes: dz = coef (E / rowsum(E) - onehot(y)), exactly a plain
    cross-entropy's work; lse_nc, a statistic there, comes from the row sum without the
    <CALL> column (-inf, never a wrong finite value, should every other logit lie more than
    ~87 below the <CALL> logit, which no training towards none produces). Both gradients are fp32 (fp64) buffers: the correction of the selected rows
    reads and adjusts them before they are cast to the input dtype.
    Peak extra memory: one chunk of logits plus the two gradient buffers.
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    w, (lse_nc, z_call, z_target, z_max) = _chunked_operands(hidden, weight)
    sdt = w.dtype
    grad_hidden = torch.empty((n, d), dtype=sdt, device=hidden.device)
    grad_weight = torch.zeros((vocab, d), dtype=sdt, device=weight.device)
    step = chunk_rows(n, d, vocab)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        h = hidden[rows].to(sdt)  # (C, D)
        y = targets[rows]  # (C,)
        z = h @ w.T  # (C, V) logits, turned into E in place
        z_target[rows] = z.gather(1, y[:, None])[:, 0]
        z_call[rows] = z[:, call_id]
        if plain_ce:
            top = z.amax(dim=1)  # (C,) over every column
            z_max[rows] = top
            e = z.sub_(top[:, None]).exp_()  # exp(z - top)
            total = e[:, :call_id].sum(dim=1) + e[:, call_id + 1:].sum(dim=1)  # without <CALL>
            lse_nc[rows] = top + total.log()
            b, c = -coef[rows], None
            s = (coef[rows] / (total + e[:, call_id]))[:, None]
        else:
            z[:, call_id] = float("-inf")
            top = z.amax(dim=1)  # (C,)
            z_max[rows] = top
            e = z.sub_(top[:, None]).exp_()  # exp(z - top), 0 at <CALL>
            total = e.sum(dim=1)
            lnc = top + total.log()
            lse_nc[rows] = lnc
            a, b, c = ordinary_coefs(lnc, z_call[rows], coef[rows], plain, None if to_call is None else to_call[rows])
            c = c if plain or to_call is not None else None  # None: zero (the renormalised rows)
            s = (a / total)[:, None]  # a exp(z - lse_nc) = s E
        one_hot = w[y].mul_(b[:, None])  # (C, D) b W[y] (+ c W[CALL])
        if c is not None:
            one_hot.addr_(c, w[call_id])
        torch.addcmul(one_hot, s, e @ w, out=grad_hidden[rows])
        grad_weight.addmm_(e.T, s * h)
        _add_one_hot_rows(grad_weight, y, b, c, h, call_id)
    return lse_nc, z_call, z_target, z_max, grad_hidden, grad_weight


def _add_one_hot_rows(grad_weight, targets, b, c, h, call_id) -> None:
    """grad_weight += the one-hot parts of dz^T h: b[i] h[i] at row y[i], sum c[i] h[i] at
    <CALL> (c None: zero)."""
    rows = b[:, None] * h
    # The same sums in every process: on CPU, index_add_ adds rows in order, where a
    # multithreaded index_put_ accumulates them in an order that varies between processes;
    # on CUDA, index_put_ sorts the indices, where index_add_ uses atomics.
    if grad_weight.is_cuda:
        grad_weight.index_put_((targets,), rows, accumulate=True)
    else:
        grad_weight.index_add_(0, targets, rows)
    if c is not None:
        grad_weight[call_id] += c @ h


def delta_weight_chunked(
    hidden: torch.Tensor,  # (k, D) the selected rows' hidden states
    weight: torch.Tensor,  # (V, D)
    targets: torch.Tensor,  # (k,) in [0, V)
    lse_nc: torch.Tensor,  # (k,) from step 1
    a: torch.Tensor,  # (k,) coefficients of dz (``ordinary_coefs``' form)
    b: torch.Tensor,
    c: torch.Tensor,
    call_id: int,
    grad_weight: torch.Tensor,  # (V, D) fp32 accumulator, updated in place
) -> None:
    """grad_weight += dz^T @ hidden with dz recomputed from the rows' logits (step 3):
    two matmuls of k x V x D, one chunk of logits at a time, the factors on the (C, D) side."""
    k, d = hidden.shape
    vocab = weight.shape[0]
    sdt = grad_weight.dtype
    w = weight.to(sdt)
    step = chunk_rows(k, d, vocab)
    for start in range(0, k, step):
        rows = slice(start, start + step)
        h = hidden[rows].to(sdt)
        z = h @ w.T  # (C, V)
        z[:, call_id] = float("-inf")
        e = z.sub_(lse_nc[rows, None]).exp_()  # exp(z - lse_nc), 0 at <CALL>
        grad_weight.addmm_(e.T, a[rows, None] * h)
        _add_one_hot_rows(grad_weight, targets[rows], b[rows], c[rows], h, call_id)  # c: a few zero rows at most


CHUNKED = types.SimpleNamespace(row_stats=row_stats_chunked, ordinary=ordinary_chunked,
                                delta_weight=delta_weight_chunked)
