"""Call rules: given the SLM's call score at a decoding step, does it call the big model?

    rule = make_rule(CascadeConfig(rule="budget", budget=0.22))
    scores = call_scores(logits, call_id)             # every score, (N,) each
    calls = rule.decide(scores["p_call"], call_is_argmax)  # (N,) bool

The call score (``CascadeConfig.score``, temperature 1 whatever the sampling temperature),
each in [0, 1], higher meaning "call":
- ``p_call``: p(<CALL>) under the full softmax: what a LaCy-trained SLM learned to signal.
- ``entropy``: the entropy of the SLM's own next-token distribution (the vocabulary without
  <CALL>, renormalised: what it would emit) divided by log(V - 1), its maximum.
- ``max_prob``: 1 - the largest probability of that distribution.
The last two are the standard deferral signals of LLM cascades: a plain LM, never taught
to emit <CALL>, defers by its own uncertainty, not by p(<CALL>) of a token it never saw
as a target. ``auto`` (``resolve_score``) takes p_call for an SLM trained with <CALL>
targets and entropy for one trained without (strategies none and ignore).
``call_is_argmax`` says whether <CALL> is the most likely token. Rules see the values of
one step of a batch together, rows in batch order, and may keep state across steps (the
budget rule does).

- ``never``: no calls (the SLM alone, <CALL> excluded).
- ``argmax``: call where <CALL> is the most likely token: what a LaCy model was trained to
  signal.
- ``threshold``: call where the score > threshold.
- ``budget``: call on a target share of steps, whatever the scale of the score, so that
  models trained with different strategies are compared at an equal call rate (the paper
  deploys ~22%). A running quantile: the threshold is the exact (1 - b) quantile (linear
  interpolation) of the last ``window`` scores seen, the current step's values
  included, and a step calls where the score exceeds it. Exact over a window rather than a
  streaming estimator (P-square, t-digest): with the default window of 4096 floats the
  quantile is one ``torch.quantile`` per step, cheap next to a forward pass, has no
  approximation to tune, and the window lets the threshold follow the score as its
  distribution drifts along a generation.

  Following a drift lags, though: when the score rises (it does along a generation, all
  rows of a batch moving in step, and in bursts over a multi-token fact), new values land
  above the window's quantile more often than b. Two corrections keep the realised share
  on target:
  - the call debt d = budget x values seen - calls made raises or lowers the share asked
    of the quantile: b = budget + d / min(values seen, window), clipped to [0, 1] (before
    the window fills, about 2 budget - realised share);
  - a cap: a step never calls more often than the budget of all values seen so far allows
    (ceil(budget x values seen) - calls made); when more rows pass the threshold, those
    with the highest scores call. The budget is a budget: the realised share never
    exceeds it by more than one call.
  Without them a 4-row generation of the caller model in tests/test_eval.py called on 37%
  of steps for a 30% budget, and a 16 x 40-step batch in tests/test_cascade.py on 32% for
  22%; on a stationary stream both stay close to idle.

  Warm-up: before ``window`` values have been seen the quantile is over all values seen so
  far (current step included). On the first step of a batch of B rows that ranks the B
  values against each other, so about budget x B of them call; a lone row (B = 1) cannot
  call on its very first step (a value never exceeds the quantile of itself) and calls on
  the top share of its history afterwards, the debt making up for the first steps. The
  realised share reaches the target: within 0.01 on drifting streams of 8k-32k values,
  within 0.03 over a 640-step batched generation (tests/test_cascade.py).
  ``budget`` 0 and 1 are exact: never and always.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch

from lacy_fast.config import CascadeConfig

# Strategies whose SLM is trained without <CALL> targets: its p(<CALL>) means nothing.
_NO_CALL_TARGETS = ("none", "ignore")


def call_scores(logits: torch.Tensor, call_id: int,
                kinds: tuple[str, ...] = ("p_call", "entropy", "max_prob")) -> dict[str, torch.Tensor]:
    """(N, V) logits -> the call scores ``kinds`` of the module docstring, (N,) fp32 each."""
    logits = logits.float()
    out = {}
    if "p_call" in kinds:
        out["p_call"] = torch.softmax(logits, -1)[:, call_id]  # (N,) full softmax
    if "entropy" in kinds or "max_prob" in kinds:
        own = logits.clone()
        own[:, call_id] = float("-inf")
        log_q = torch.log_softmax(own, -1)  # (N, V) the SLM's own distribution, <CALL> excluded
        q = log_q.exp()
        if "entropy" in kinds:
            entropy = -(q * log_q.masked_fill(q == 0, 0.0)).sum(-1)  # (N,) with 0 log 0 = 0
            out["entropy"] = entropy / math.log(max(2, logits.shape[-1] - 1))
        if "max_prob" in kinds:
            out["max_prob"] = 1.0 - q.amax(-1)
    return out


def resolve_score(score: str, strategy: str | None) -> str:
    """``auto`` -> p_call for an SLM trained with <CALL> targets, entropy otherwise."""
    if score != "auto":
        return score
    return "entropy" if strategy in _NO_CALL_TARGETS else "p_call"


class CallRule(Protocol):
    def decide(self, score: torch.Tensor, call_is_argmax: torch.Tensor) -> torch.Tensor:
        """(N,) call scores and (N,) bool -> (N,) bool: which rows call."""
        ...


class NeverRule:
    def decide(self, score: torch.Tensor, call_is_argmax: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(call_is_argmax)


class ArgmaxRule:
    def decide(self, score: torch.Tensor, call_is_argmax: torch.Tensor) -> torch.Tensor:
        return call_is_argmax.clone()


class ThresholdRule:
    def __init__(self, threshold: float):
        self.threshold = threshold

    def decide(self, score: torch.Tensor, call_is_argmax: torch.Tensor) -> torch.Tensor:
        return score > self.threshold


class BudgetRule:
    """Calls on a ``budget`` share of steps: the score above a running quantile, debt-corrected."""

    def __init__(self, budget: float, window: int = 4096):
        self.budget = budget
        self.window = window
        self.values = torch.empty(window, dtype=torch.float32)  # ring buffer of recent scores, on the host
        self.seen = 0  # values ever recorded
        self.calls = 0  # calls ever decided
        self.threshold = float("nan")  # the last threshold used (for reports)

    def decide(self, score: torch.Tensor, call_is_argmax: torch.Tensor) -> torch.Tensor:
        p = score.detach().float()  # (N,)
        debt = self.budget * self.seen - self.calls  # calls owed so far (negative: made too many)
        self._record(p.cpu())
        if self.budget <= 0.0:
            return torch.zeros_like(call_is_argmax)
        if self.budget >= 1.0:
            return torch.ones_like(call_is_argmax)
        share = min(max(self.budget + debt / max(1, min(self.seen, self.window)), 0.0), 1.0)
        held = self.values[: min(self.seen, self.window)]  # (W,)
        self.threshold = float(torch.quantile(held, 1.0 - share))
        calls = p > self.threshold  # (N,)
        # The cap: never more calls than the budget of every value seen so far allows.
        allowance = max(0, math.ceil(self.budget * self.seen - self.calls - 1e-9))
        if int(calls.sum()) > allowance:
            top = torch.topk(torch.where(calls, p, -1.0), allowance).indices  # (allowance,) highest scores
            calls = torch.zeros_like(calls)
            calls[top] = True
        self.calls += int(calls.sum())
        return calls

    def _record(self, p: torch.Tensor) -> None:
        """Append ``p`` (N,) to the ring buffer; only the last ``window`` values are kept."""
        keep = p[-self.window:]  # (K,) the values that survive this append
        start = self.seen + p.numel() - keep.numel()  # stream index of keep[0]
        self.values[(start + torch.arange(keep.numel())) % self.window] = keep
        self.seen += p.numel()

def make_rule(cfg: CascadeConfig) -> CallRule:
    if cfg.rule == "never":
        return NeverRule()
    if cfg.rule == "argmax":
        return ArgmaxRule()
    if cfg.rule == "threshold":
        return ThresholdRule(cfg.threshold)
    return BudgetRule(cfg.budget, cfg.budget_window)
