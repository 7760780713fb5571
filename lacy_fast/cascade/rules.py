"""Call rules: given the SLM's call score at a decoding step, does it call the big model?

    rule = make_rule(CascadeConfig(rule="budget", budget=0.22))
    scores = call_scores(logits, call_id)             # every score, (N,) each
    calls = rule.decide(scores["p_call"], call_is_argmax)  # (N,) bool

Scores (higher means "call"): ``p_call``, ``call_logodds``, ``entropy``, ``max_prob``
(``combined`` is in calibration.py); ``resolve_score`` picks one for ``auto``. Rules:
``never``, ``argmax``, ``threshold`` and ``budget`` (a running quantile with a call debt,
a floor and a cap, so the realised call share is the budget within one call). Rules see
one step of a batch at a time and may keep state across steps. docs/cascade.md says what
each score measures and why the budget rule is built as it is.
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
    """(N, V) logits -> the call scores ``kinds`` (docs/cascade.md), (N,) fp32 each."""
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
