"""Call rules: given the SLM's call score at a decoding step, does it call the big model?

    rule = make_rule(CascadeConfig(rule="budget", budget=0.22))
    scores = call_scores(logits, call_id)             # every score, (N,) each
    calls = rule.decide(scores["p_call"], call_is_argmax)  # (N,) bool

The call score (``CascadeConfig.score``, temperature 1 whatever the sampling temperature),
each in [0, 1] but the log-odds, higher meaning "call":
- ``p_call``: p(<CALL>) under the full softmax: what a LaCy-trained SLM learned to signal.
  ``call_logodds`` is the same signal as log p / (1 - p), unbounded: the budget rule ranks it.
- ``combined`` (``calibration.py``, not computed here): the rank product of p(<CALL>) and
  the entropy below, each ranked by its CDF on training documents.
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
  above the window's quantile more often than b; and a score that saturates (p(<CALL>) of
  a LaCy SLM is 1.0 in fp32 at many steps) ties at the quantile, so that ``score >
  threshold`` holds nowhere: at a 10% budget such SLMs called on 0-1.5% of steps. Three
  corrections make the realised share exact:
  - p(<CALL>) is ranked by its log-odds, z_call - logsumexp of the other logits
    (``ranked_score``: the same order, never saturated), not by p;
  - the call debt d = budget x values seen - calls made raises or lowers the share asked
    of the quantile: b = budget + d / min(values seen, window), clipped to [0, 1];
  - a floor and a cap: with this step's values counted, a step makes at least
    floor(budget x seen - calls made) calls and at most ceil(budget x seen - calls made);
    between them, as many as pass the threshold. The calls go to the step's highest
    scores, equal scores in a seeded random order (``seed``). So after every step the calls
    made are budget x seen within one call, whatever the score's distribution: tied,
    saturated or drifting. The floor is the debt's own bound rather than a tolerance: a
    tolerance would let a saturated score under-call by as much as it allows, and the
    budget is what the strategies are compared at.
  The quantile still decides *which steps* call when it can (calls bunch where scores are
  high, within the one-call band); the floor and cap only bind where it errs.
  (Before the floor, a 4-row generation of the caller model in tests/test_eval.py called on
  37% of steps for a 30% budget, without the cap; a stream of exact 1.0s never called.)

  Warm-up: before ``window`` values have been seen the quantile is over all values seen so
  far (current step included). On the first step of a batch of B rows that ranks the B
  values against each other and the floor makes exactly floor(budget x B) of them call; a
  lone row (B = 1) does not call on its very first step (budget x 1 < 1 call owed).
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
                kinds: tuple[str, ...] = ("p_call", "call_logodds", "entropy", "max_prob")) -> dict[str, torch.Tensor]:
    """(N, V) logits -> the call scores ``kinds`` of the module docstring, (N,) fp32 each."""
    logits = logits.float()
    out = {}
    if "p_call" in kinds:
        out["p_call"] = torch.softmax(logits, -1)[:, call_id]  # (N,) full softmax
    if "call_logodds" in kinds:  # log p / (1 - p) = z_call - logsumexp of the other logits: never saturates
        others = logits.clone()
        others[:, call_id] = float("-inf")
        out["call_logodds"] = logits[:, call_id] - torch.logsumexp(others, -1)  # (N,)
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


def ranked_score(score: str, rule: str) -> str:
    """The score a rule compares: the budget rule ranks p(<CALL>) by its log-odds (the same
    order, without the ties of a saturated p); the threshold rule reads p on its own scale."""
    return "call_logodds" if score == "p_call" and rule == "budget" else score


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
    """Calls on a ``budget`` share of steps: the score above a running quantile, debt-corrected,
    between a floor and a cap that hold the realised share to the budget within one call."""

    def __init__(self, budget: float, window: int = 4096, seed: int = 0):
        self.budget = budget
        self.window = window
        self.values = torch.empty(window, dtype=torch.float32)  # ring buffer of recent scores, on the host
        self.seen = 0  # values ever recorded
        self.calls = 0  # calls ever decided
        self.threshold = float("nan")  # the last threshold used (for reports)
        self.generator = torch.Generator().manual_seed(seed)  # breaks ties among equal scores

    def decide(self, score: torch.Tensor, call_is_argmax: torch.Tensor) -> torch.Tensor:
        p = score.detach().float().cpu()  # (N,)
        debt = self.budget * self.seen - self.calls  # calls owed so far (negative: made too many)
        self._record(p)
        if self.budget <= 0.0:
            return torch.zeros_like(call_is_argmax)
        if self.budget >= 1.0:
            return torch.ones_like(call_is_argmax)
        share = min(max(self.budget + debt / max(1, min(self.seen, self.window)), 0.0), 1.0)
        held = self.values[: min(self.seen, self.window)]  # (W,)
        self.threshold = float(torch.quantile(held, 1.0 - share))
        owed = self.budget * self.seen - self.calls  # with this step's values counted
        floor = min(p.numel(), max(0, math.floor(owed + 1e-9)))  # calls this step must make
        cap = max(0, math.ceil(owed - 1e-9))  # calls this step may make
        n = min(max(int((p > self.threshold).sum()), floor), cap)
        calls = torch.zeros(p.numel(), dtype=torch.bool)
        calls[self._order(p)[:n]] = True  # the n highest scores, ties in random order
        self.calls += n
        return calls.to(call_is_argmax.device)

    def _order(self, p: torch.Tensor) -> torch.Tensor:
        """(N,) indices of ``p`` from the highest score down, equal scores in a random order."""
        perm = torch.randperm(p.numel(), generator=self.generator)  # (N,)
        return perm[torch.argsort(p[perm], descending=True, stable=True)]

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
    return BudgetRule(cfg.budget, cfg.budget_window, cfg.seed)
