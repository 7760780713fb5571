"""Call rules: given the SLM's p(CALL) at a decoding step, does it call the big model?

    rule = make_rule(CascadeConfig(rule="budget", budget=0.22))
    calls = rule.decide(p_call, call_is_argmax)  # (N,) bool

``p_call`` is p(<CALL>) under the full softmax (temperature 1, whatever the sampling
temperature); ``call_is_argmax`` says whether <CALL> is the most likely token. Rules see
the values of one step of a batch together, rows in batch order, and may keep state
across steps (the budget rule does).

- ``never``: no calls (the SLM alone, <CALL> excluded).
- ``argmax``: call where <CALL> is the most likely token: what a LaCy model was trained to
  signal.
- ``threshold``: call where p(CALL) > threshold.
- ``budget``: call on a target share of steps, whatever the scale of p(CALL), so that
  models trained with different strategies are compared at an equal call rate (the paper
  deploys ~22%). A running quantile: the threshold is the exact (1 - b) quantile (linear
  interpolation) of the last ``window`` p(CALL) values seen, the current step's values
  included, and a step calls where p(CALL) exceeds it. Exact over a window rather than a
  streaming estimator (P-square, t-digest): with the default window of 4096 floats the
  quantile is one ``torch.quantile`` per step, cheap next to a forward pass, has no
  approximation to tune, and the window lets the threshold follow p(CALL) as its
  distribution drifts along a generation.

  Following a drift lags, though: when p(CALL) rises (it does along a generation, all
  rows of a batch moving in step, and in bursts over a multi-token fact), new values land
  above the window's quantile more often than b. Two corrections keep the realised share
  on target:
  - the call debt d = budget x values seen - calls made raises or lowers the share asked
    of the quantile: b = budget + d / min(values seen, window), clipped to [0, 1] (before
    the window fills, about 2 budget - realised share);
  - a cap: a step never calls more often than the budget of all values seen so far allows
    (ceil(budget x values seen) - calls made); when more rows pass the threshold, those
    with the highest p(CALL) call. The budget is a budget: the realised share never
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


class CallRule(Protocol):
    def decide(self, p_call: torch.Tensor, call_is_argmax: torch.Tensor) -> torch.Tensor:
        """(N,) p(CALL) and (N,) bool -> (N,) bool: which rows call."""
        ...


class NeverRule:
    def decide(self, p_call: torch.Tensor, call_is_argmax: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(call_is_argmax)


class ArgmaxRule:
    def decide(self, p_call: torch.Tensor, call_is_argmax: torch.Tensor) -> torch.Tensor:
        return call_is_argmax.clone()


class ThresholdRule:
    def __init__(self, threshold: float):
        self.threshold = threshold

    def decide(self, p_call: torch.Tensor, call_is_argmax: torch.Tensor) -> torch.Tensor:
        return p_call > self.threshold


class BudgetRule:
    """Calls on a ``budget`` share of steps: p(CALL) above a running quantile, debt-corrected."""

    def __init__(self, budget: float, window: int = 4096):
        self.budget = budget
        self.window = window
        self.values = torch.empty(window, dtype=torch.float32)  # ring buffer of recent p(CALL), on the host
        self.seen = 0  # values ever recorded
        self.calls = 0  # calls ever decided
        self.threshold = float("nan")  # the last threshold used (for reports)

    def decide(self, p_call: torch.Tensor, call_is_argmax: torch.Tensor) -> torch.Tensor:
        p = p_call.detach().float()  # (N,)
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
            top = torch.topk(torch.where(calls, p, -1.0), allowance).indices  # (allowance,) highest p(CALL)
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
