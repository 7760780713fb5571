"""Inputs and error yardsticks for the LaCy loss tests.

Every case is computed three ways: the ground truth (the reference in
fp64 on the dtype-rounded inputs), the reference in the test dtype (its distance to the
truth is what that dtype costs PyTorch), and the implementation under test, which must
satisfy, per compared tensor,

    max |impl - truth| <= K * max |ref - truth| + ULPS * eps(dtype) * max |truth|

The second term only matters where the reference happens to be exact (it is 0 when the
truth is 0: an all-ignored batch must give exactly zero gradients).

Selection must not depend on rounding: ``make_case`` builds inputs whose scores around
the k-th candidate are separated by far more than either implementation's error (a
margin tied to the reference's measured nll error), trying seeds in a fixed order and
failing loudly if none gives the margin.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lacy_fast.kernels.lacy_ce_reference import RANKED, LossOptions, lacy_ce_torch, valid_targets

K = 2.0  # the implementation may be at most this many times further from the truth than PyTorch
ULPS = 8.0  # slack in units of the compared tensor's epsilon, times the truth's scale
MARGIN = 8.0  # score gap at the k-th candidate, in units of the worst tolerated nll error
IGNORE = -100


@dataclass
class Case:
    hidden: torch.Tensor  # (N, D) test dtype
    weight: torch.Tensor  # (V, D) test dtype
    targets: torch.Tensor
    flags: torch.Tensor
    ref_nll: torch.Tensor
    call_id: int
    strategy: str
    call_fraction: float
    upstream: float  # the random upstream gradient of the loss
    truth: dict  # fp64 results
    ref: dict  # reference in the test dtype
    renormalize: bool = True
    call_weight: float = 1.0
    weight_by_error: bool = False

    def kwargs(self) -> dict:
        return dict(call_id=self.call_id, strategy=self.strategy, call_fraction=self.call_fraction,
                    ref_nll=self.ref_nll if self.strategy == "rho" else None, ignore_index=IGNORE,
                    renormalize=self.renormalize, call_weight=self.call_weight, weight_by_error=self.weight_by_error)

    def host_count(self) -> int:
        """The selection count the training loop computes on the host from the batch's
        counts (``selected_count``), before anything reaches the device."""
        from lacy_fast.method import selected_count

        valid = valid_targets(self.targets, self.weight.shape[0], self.call_id, IGNORE)
        n_facts = int((valid & ((self.flags & 1) != 0)).sum())
        n_judge = int((valid & ((self.flags & 2) != 0)).sum())
        return selected_count(self.strategy, self.call_fraction, int(valid.sum()), n_facts, n_judge)


def reference(hidden, weight, targets, flags, call_id, ref_nll=None, **options):
    """``lacy_ce_torch`` called the way the public function is, the options by keyword."""
    return lacy_ce_torch(hidden, weight, targets, flags, call_id, LossOptions(**options), ref_nll)


def run(fn, hidden, weight, case: Case, device="cpu", **extra) -> dict:
    """Loss, stats and gradients (random upstream gradient) of ``fn`` on ``device``, back on the CPU."""
    h = hidden.detach().to(device).requires_grad_()
    w = weight.detach().to(device).requires_grad_()
    kwargs = case.kwargs()
    if kwargs["ref_nll"] is not None:
        kwargs["ref_nll"] = kwargs["ref_nll"].to(device, torch.float64 if h.dtype == torch.float64 else torch.float32)
    loss, stats = fn(h, w, case.targets.to(device), case.flags.to(device), **kwargs, **extra)
    upstream = torch.tensor(case.upstream, dtype=loss.dtype, device=device)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w), grad_outputs=upstream)
    out = {"loss": loss.detach(), **stats, "grad_hidden": grad_h, "grad_weight": grad_w}
    return {name: value.cpu() for name, value in out.items()}


def make_case(strategy: str, dtype: torch.dtype, *, n=37, d=48, v=211, call_id=105, call_fraction=0.6,
              edge: str | None = None, seed: int = 0, renormalize: bool = True, call_weight: float = 1.0,
              weight_by_error: bool = False) -> Case:
    """A case whose selection is the same in every dtype (see the module docstring).

    edge: None, "all_ignored" (no valid target), "no_facts", "all_facts", or "all_selected"
    (every target valid and flagged fact and judge: with call_fraction=1 every
    strategy but none selects all N rows). call_weight, weight_by_error: the soft relabel.
    """
    soft = (call_weight, weight_by_error)
    for attempt in range(200):
        case = _attempt(strategy, dtype, n, d, v, call_id, call_fraction, edge, seed * 1000 + attempt, renormalize,
                        soft)
        if _margin_ok(case):
            return case
    raise RuntimeError(f"no seed gave a selection margin for {strategy} {dtype} {edge}; widen the score spread")


def _attempt(strategy, dtype, n, d, v, call_id, call_fraction, edge, seed, renormalize, soft) -> Case:
    gen = torch.Generator().manual_seed(seed)
    # logits ~ N(0, 2^2): nll between ~1 and ~12, a realistic range for a 211-token vocabulary
    hidden = torch.randn(n, d, generator=gen).to(dtype)
    weight = (torch.randn(v, d, generator=gen) * (2.0 / math.sqrt(d))).to(dtype)
    targets = torch.randint(0, v - 1, (n,), generator=gen)
    targets = torch.where(targets >= call_id, targets + 1, targets)  # never the <CALL> id
    targets[torch.rand(n, generator=gen) < 0.15] = IGNORE
    fact = torch.rand(n, generator=gen) < 0.4
    judge = torch.rand(n, generator=gen) < 0.3
    flags = (fact.to(torch.uint8) | (judge.to(torch.uint8) << 1))
    if edge == "all_ignored":
        targets[:] = IGNORE
    elif edge == "no_facts":
        flags &= 2
    elif edge == "all_facts":
        flags |= 1
    elif edge == "all_selected":
        targets = torch.where(targets == IGNORE, (call_id + 1) % v, targets)
        flags |= 3
    ref_nll = torch.rand(n, generator=gen) * 6.0
    upstream = float(0.5 + torch.rand((), generator=gen))
    case = Case(hidden, weight, targets, flags, ref_nll, call_id, strategy, call_fraction, upstream, {}, {},
                renormalize, *soft)
    case.truth = run(reference, hidden.double(), weight.double(), case)
    case.ref = run(reference, hidden, weight, case)
    return case


def _margin_ok(case: Case) -> bool:
    """The k-th and (k+1)-th candidate scores differ by MARGIN x the tolerated nll error."""
    if case.strategy not in RANKED:
        return True
    valid = valid_targets(case.targets, case.weight.shape[0], case.call_id, IGNORE)
    cand = valid & ((case.flags & 1) != 0) if case.strategy in ("lacy", "ignore") else valid
    score = case.truth["nll"] - (case.ref_nll.double() if case.strategy == "rho" else 0.0)
    score = score[cand].sort(descending=True).values
    k = math.floor(int(cand.sum()) * case.call_fraction)
    if k == 0 or k == score.numel():
        return True  # no boundary: every candidate is in, or none is
    tolerated = K * err(case.ref["nll"], case.truth["nll"]) + ULPS * eps(torch.float32) * float(score.abs().max())
    return float(score[k - 1] - score[k]) > MARGIN * tolerated


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float((x.double() - truth.double()).abs().max()) if truth.numel() else 0.0


def tolerance(name: str, case: Case) -> float:
    truth = case.truth[name]
    scale = float(truth.abs().max()) if truth.numel() else 0.0
    return K * err(case.ref[name], truth) + ULPS * eps(case.ref[name].dtype) * scale


COMPARED = ("loss", "nll", "p_call", "grad_hidden", "grad_weight")


def check(result: dict, case: Case) -> None:
    """Assert ``result`` is as close to the truth as the tolerance allows; is_call exactly."""
    assert torch.equal(case.ref["is_call"], case.truth["is_call"]), "margin construction failed: the reference flipped"
    assert torch.equal(result["is_call"], case.truth["is_call"]), "selection differs from the truth"
    for name in COMPARED:
        got = result[name]
        assert got.shape == case.truth[name].shape, name
        assert got.dtype == case.ref[name].dtype, f"{name}: dtype {got.dtype}, reference {case.ref[name].dtype}"
        e, tol = err(got, case.truth[name]), tolerance(name, case)
        assert e <= tol, f"{name}: max error {e:.3g} > tolerance {tol:.3g} (reference error {err(case.ref[name], case.truth[name]):.3g})"
