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

  Following a drift lags, though: when p(CALL) keeps rising (it does along a generation,
  and all rows of a batch move in step), new values land above the window's quantile
  more often than b. So b is corrected by the call debt d = budget x values seen - calls
  made: b = budget + d / min(values seen, window), clipped to [0, 1]. Before the window
  fills this is b = 2 budget - realised share (the running share is pulled back to the
  target), afterwards the debt is spread over a window; on a stationary stream the
  correction stays near zero, and the realised share over n values stays within
  O(window / n) of the target, drift or not (without it: 32% instead of 22% over a
  16 x 40-step batch in tests/test_cascade.py; with it, 23%).

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
