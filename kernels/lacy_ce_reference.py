"""Pure-PyTorch pieces of the LaCy LM-head loss: selection, the reference, the chunked path.

Everything here runs on any device and never synchronises with the host: counts, the
selection budget ``k`` and the mean's denominator stay tensors; the only Python branches
are on arguments (strategy, dtype, shapes), never on data.

- ``select_calls``: which positions become <CALL> (shared by every implementation).
- ``lacy_ce_torch``: the plain, obviously-correct reference. It materialises the (N, V)
  logits and lets autograd differentiate; the tests run it in fp64 as the ground truth
  and in the test dtype as the error yardstick, the benchmark runs it as the baseline.
- ``row_stats_chunked`` / ``grads_chunked``: the CPU training path. Chunked over tokens so
  no (N, V) buffer exists; the gradient is written by hand (formula in ``finish_rows``).
- ``finish_rows``: from the per-row statistics every fused path produces (``lse_nc``,
  ``z_call``, ``z_target``) to the loss, the stats and what the backward needs.

Semantics (docs/method.md), decided details marked (*):
- valid = target != ignore_index, and (*) 0 <= target < V and target != call_id
  (``lacy_fast.method.valid_targets``, shared with the data loader's counts). <CALL>
  never occurs in text; as a target its renormalised nll is undefined (that distribution
  excludes <CALL>), so it cannot be ranked, and counting it as a CALL target would let
  the data bypass the selection budget the strategies are compared at. Out-of-range
  targets are dropped the same way instead of reading out of bounds (a device-side check
  would need a host synchronisation).
- nll = lse_nc - z_y on valid positions, 0 elsewhere; p_call = exp(z_call - lse) on every
  position (it does not depend on the target).
- is_call = the selected positions. For ``ignore`` those are the dropped ones: they get no
  loss and leave the count. For ``none`` nothing is selected.
- loss = sum of per-position losses / max(count, 1): exactly 0, with zero gradients, when
  nothing is counted.
- The stats are not differentiated through (they come back detached).
"""
from __future__ import annotations

import os

import torch

# The strategy names, the flag bits and the valid-target rule are defined once, in
# lacy_fast.method; they are imported (and re-exported) here.
from lacy_fast.method import FLAG_FACT, FLAG_JUDGE, RANK_FACTS, RANKED, STRATEGIES, valid_targets  # noqa: F401

# Rows per chunk are chosen so one chunk of logits (rows x V) holds about as many elements
# as the larger of hidden (N x D) and weight (V x D): the extra memory stays O(N*D + V*D)
# while each chunk's matmuls stay large enough to run at full speed.
CHUNK_ROWS_ENV = "LACY_FAST_CE_CHUNK_ROWS"  # a fixed number of rows per chunk (tests, tuning)


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
    facts = valid & ((flags & FLAG_FACT) != 0)
    if strategy == "spacy":
        return facts
    if strategy == "judge":
        return valid & ((flags & FLAG_JUDGE) != 0)
    candidates = facts if strategy in RANK_FACTS else valid
    score = nll.double()
    if strategy == "rho":
        score = score - ref_nll.detach().double()
    score = torch.where(candidates, score, float("-inf"))
    # float64 so that floor() sees the same product Python's float would (0.6 * 10 == 6.0).
    k = torch.floor(candidates.sum().double() * call_fraction).long()
    order = torch.argsort(score, descending=True, stable=True)  # (N,) positions, best first
    in_top_k = torch.arange(score.numel(), device=score.device) < k  # (N,) by rank
    selected = torch.zeros_like(candidates).scatter(0, order, in_top_k)
    return candidates & selected


# ----------------------------------------------------------------------------------------
# The reference: materialised logits, autograd does the backward
# ----------------------------------------------------------------------------------------


def lacy_ce_torch(
    hidden: torch.Tensor,  # (N, D)
    weight: torch.Tensor,  # (V, D)
    targets: torch.Tensor,  # (N,) int64
    flags: torch.Tensor,  # (N,) integer
    call_id: int,
    strategy: str = "lacy",
    call_fraction: float = 0.6,
    ref_nll: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The LaCy loss written the obvious way, over materialised (N, V) logits.

    The matmul runs in the input dtype (as a PyTorch training step would), everything
    after it in fp32 (fp64 for fp64 inputs).
    """
    sdt = stat_dtype(hidden.dtype)
    vocab = weight.shape[0]
    logits = (hidden @ weight.T).to(sdt)  # (N, V)
    valid = valid_targets(targets, vocab, call_id, ignore_index)  # (N,)
    y = torch.where(valid, targets, 0)  # (N,) a harmless column where there is no target
    log_p = torch.log_softmax(logits, dim=-1)  # (N, V) full softmax, <CALL> included
    no_call = torch.ones(vocab, dtype=torch.bool, device=logits.device)
    no_call[call_id] = False
    log_p_nc = torch.log_softmax(logits.masked_fill(~no_call, float("-inf")), dim=-1)  # (N, V)
    nll = torch.where(valid, -log_p_nc.gather(1, y[:, None])[:, 0], 0.0)  # (N,)
    call_nll = -log_p[:, call_id]  # (N,)
    selected = select_calls(strategy, nll, valid, flags, call_fraction, ref_nll)
    if strategy == "none":
        per_row = -log_p.gather(1, y[:, None])[:, 0]
    else:
        per_row = torch.where(selected, call_nll, nll)
    counted = valid & ~selected if strategy == "ignore" else valid
    per_row = torch.where(counted, per_row, 0.0)
    loss = per_row.sum() / counted.sum().clamp(min=1)
    stats = {"nll": nll.detach(), "is_call": selected, "p_call": torch.exp(-call_nll).detach()}
    return loss, stats


# ----------------------------------------------------------------------------------------
# From per-row statistics to loss, stats and backward row parameters (chunked and triton)
# ----------------------------------------------------------------------------------------


def finish_rows(
    lse_nc: torch.Tensor,  # (N,) log-sum-exp over every column but <CALL>
    z_call: torch.Tensor,  # (N,) the <CALL> logit
    z_target: torch.Tensor,  # (N,) the target logit (anything where there is no target)
    targets: torch.Tensor,
    flags: torch.Tensor,
    vocab: int,
    call_id: int,
    strategy: str,
    call_fraction: float,
    ref_nll: torch.Tensor | None,
    ignore_index: int,
) -> tuple[torch.Tensor, ...]:
    """Loss, stats and the backward's row parameters, all on device.

    Returns (loss, nll, is_call, p_call, row_lse, row_target, row_coef). The backward's
    gradient w.r.t. the logits of row i is

        dz[i, v] = grad_loss * row_coef[i] * (exp(z[i, v] - row_lse[i]) * keep[i, v] - [v == row_target[i]])

    with keep[i, call_id] = 0 for an ordinary row under a CALL-aware strategy (its softmax
    excludes <CALL>), 1 otherwise: for a CALL row row_lse = lse (full softmax) and
    row_target = call_id; for an ordinary row row_lse = lse_nc; for ``none`` row_lse = lse.
    Rows without loss have row_coef = 0, row_target = -1 and row_lse = lse (a real
    normaliser, so exp() stays finite).
    """
    valid = valid_targets(targets, vocab, call_id, ignore_index)
    lse = torch.logaddexp(lse_nc, z_call)  # (N,) full log-normaliser, stable
    nll = torch.where(valid, lse_nc - z_target, 0.0)
    p_call = torch.exp(z_call - lse)
    selected = select_calls(strategy, nll, valid, flags, call_fraction, ref_nll)
    call_target = torch.full_like(targets, call_id)
    if strategy == "none":
        row_loss, row_lse, row_target = lse - z_target, lse, targets
    else:
        row_loss = torch.where(selected, lse - z_call, nll)
        row_lse = torch.where(selected, lse, lse_nc)
        row_target = torch.where(selected, call_target, targets)
    counted = valid & ~selected if strategy == "ignore" else valid
    denom = counted.sum().clamp(min=1).to(lse.dtype)
    loss = torch.where(counted, row_loss, 0.0).sum() / denom
    row_coef = counted.to(lse.dtype) / denom
    row_lse = torch.where(counted, row_lse, lse)
    row_target = torch.where(counted, row_target, -1)
    return loss, nll, selected, p_call, row_lse, row_target, row_coef


# ----------------------------------------------------------------------------------------
# Chunked PyTorch path (CPU training): no (N, V) buffer
# ----------------------------------------------------------------------------------------


def row_stats_chunked(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, call_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse_nc, z_call, z_target), each (N,), one chunk of rows at a time.

    The chunk's logits are computed in fp32 (fp64 for fp64 inputs): on a CPU a fp32 matmul
    is as fast as a bf16 one and loses nothing. Peak extra memory: one chunk of logits.
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    sdt = stat_dtype(hidden.dtype)
    w = weight.to(sdt)
    lse_nc = torch.empty(n, dtype=sdt, device=hidden.device)
    z_call = torch.empty_like(lse_nc)
    z_target = torch.empty_like(lse_nc)
    y = targets.clamp(0, vocab - 1)  # invalid rows read a harmless column
    step = chunk_rows(n, d, vocab)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        z = hidden[rows].to(sdt) @ w.T  # (C, V)
        z_target[rows] = z.gather(1, y[rows, None])[:, 0]
        z_call[rows] = z[:, call_id]
        z[:, call_id] = float("-inf")
        top = z.amax(dim=1)  # (C,) log-sum-exp in place: one chunk buffer, no temporaries
        lse_nc[rows] = top + z.sub_(top[:, None]).exp_().sum(dim=1).log()
    return lse_nc, z_call, z_target


def grads_chunked(
    grad_loss: torch.Tensor,  # () upstream gradient of the loss
    hidden: torch.Tensor,
    weight: torch.Tensor,
    row_lse: torch.Tensor,
    row_target: torch.Tensor,
    row_coef: torch.Tensor,
    call_id: int,
    plain: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight) by the formula of ``finish_rows``, one chunk at a time."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    sdt = stat_dtype(hidden.dtype)
    w = weight.to(sdt)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(weight.shape, dtype=sdt, device=weight.device)  # fp32 accumulator
    row_w = row_coef * grad_loss.to(sdt)  # (N,)
    step = chunk_rows(n, d, vocab)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        h = hidden[rows].to(sdt)  # (C, D)
        dz = h @ w.T  # (C, V) logits, turned into d loss / d logits in place
        dz.sub_(row_lse[rows, None]).exp_()
        tgt = row_target[rows]
        if not plain:  # ordinary rows: softmax without <CALL>
            dz[:, call_id] *= tgt == call_id
        dz.scatter_add_(1, tgt.clamp(min=0)[:, None], -(tgt >= 0).to(sdt)[:, None])
        dz.mul_(row_w[rows, None])
        grad_hidden[rows] = (dz @ w).to(hidden.dtype)
        grad_weight.addmm_(dz.T, h)
    return grad_hidden, grad_weight.to(weight.dtype)
