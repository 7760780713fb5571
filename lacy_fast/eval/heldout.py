"""Teacher-forced measures on held-out text: perplexity, call precision / recall, fact leakage.

One forward pass per held-out text (inference only, fp32 logits, per text) gives at every
target position all three need. The model reads EOS then the text and predicts every text
token and the closing EOS; a text longer than the context is cut to ``max_seq_len``
targets, and the facts cut off are counted in ``truncated_facts``. Fact positions: the
targets whose characters overlap a value of the person (its first whole-word occurrence,
``facts.value_spans``), leading whitespace excluded.

- ``perplexity``: exp of the mean NLL renormalised without <CALL> (``-log(p(y) / (1 -
  p(CALL)))``, what the LaCy objective trains), over all targets, fact and other positions.
- ``call_stats``: the call rule decides at every position from the call score, in text
  order, as in generation; precision / recall against the fact positions, ``recall_first``
  (values whose first token is called), where the calls land (unknown fact, known fact,
  free wording, other) and the ROC AUC of the score between unknown-fact tokens and the rest.
- ``leakage``: a value leaks when greedy decoding from the gold prefix, <CALL> forbidden,
  reproduces its tokens exactly: from the one pass, iff the argmax without <CALL> is the
  gold token at every position of the value (``tests/test_eval.py`` checks it against
  explicit decoding). The held-out sentence is new to the model, so a leak is a memorised
  fact, not a memorised sentence.

docs/method.md (section 8) defines each measure in full.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lacy_fast.cascade.rules import CallRule, call_scores
from lacy_fast.cascade.slm import ExportedModel
from lacy_fast.data.facts import HeldOut, value_spans
from lacy_fast.progress import Progress


@dataclass
class TextScores:
    """Per target position of one held-out text (all arrays (T,))."""

    targets: np.ndarray  # int64 token ids
    nll: np.ndarray  # float64 -log(p(y) / (1 - p(CALL)))
    scores: dict[str, np.ndarray]  # float32 call scores (rules.call_scores): p_call, entropy, max_prob
    call_argmax: np.ndarray  # bool: <CALL> is the most likely token
    greedy: np.ndarray  # int64 argmax with <CALL> excluded
    spans: list[tuple[str, int, int]]  # (attribute, first, last + 1) target positions of each value
    truncated_facts: int  # values past the context cut
    free: np.ndarray  # bool: the target is a token of a free-wording span

    @property
    def p_call(self) -> np.ndarray:
        return self.scores["p_call"]

    @property
    def fact(self) -> np.ndarray:
        """(T,) bool: the position's target is a fact-value token."""
        mask = np.zeros(len(self.targets), dtype=bool)
        for _, lo, hi in self.spans:
            mask[lo:hi] = True
        return mask

    def known(self) -> list[bool]:
        """Per value of ``spans``: greedy decoding from the gold prefix reproduces it."""
        return [bool(np.array_equal(self.greedy[lo:hi], self.targets[lo:hi])) for _, lo, hi in self.spans]

    def classes(self) -> np.ndarray:
        """(T,) int8 class of each position: UNKNOWN_FACT, KNOWN_FACT, FREE or OTHER."""
        out = np.where(self.free, FREE, OTHER).astype(np.int8)
        for (_, lo, hi), known in zip(self.spans, self.known()):
            out[lo:hi] = KNOWN_FACT if known else UNKNOWN_FACT
        return out


UNKNOWN_FACT, KNOWN_FACT, FREE, OTHER = 0, 1, 2, 3
CLASSES = ("unknown_fact", "known_fact", "free", "other")


@torch.inference_mode()
def score_texts(slm: ExportedModel, texts: list[HeldOut], *, batch_size: int = 16,
                device: torch.device | str = "cpu", progress: Progress | None = None) -> list[TextScores]:
    """One teacher-forced pass over each held-out text (batched by length, right-padded)."""
    model, tok = slm.model, slm.tokenizer
    limit = model.cfg.max_seq_len
    items = []
    for h in texts:
        ids, starts, ends = tok.encode_with_offsets(h.text)
        inputs = [tok.eos_id] + ids.tolist()  # context_ids(tok, h.text): EOS, then the text
        targets = inputs[1:] + [tok.eos_id]
        spans, cut = [], 0
        free = np.zeros(len(targets), dtype=bool)
        for f_start, f_end in h.free:
            free[np.flatnonzero((starts < f_end) & (ends > f_start))] = True  # target j is token j
        for attr, (v_start, v_end) in value_spans(h.text, h.person).items():
            inside = np.flatnonzero((starts < v_end) & (ends > v_start))  # token j is target position j
            if len(inside) == 0:
                continue
            if inside[-1] >= limit:
                cut += 1
            else:
                spans.append((attr, int(inside[0]), int(inside[-1]) + 1))
        items.append((inputs[:limit], targets[:limit], sorted(spans, key=lambda s: s[1]), cut, free[:limit]))
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    out: list[TextScores | None] = [None] * len(items)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(items[i][0]) for i in chunk)
        # Right padding: causal attention never lets a real position see the padding after it.
        ids = torch.full((len(chunk), width), tok.eos_id, dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(items[i][0])] = torch.tensor(items[i][0])
        hidden = model(ids.to(device))  # (B, T, D)
        for row, i in enumerate(chunk):
            inputs, targets, spans, cut, free = items[i]
            out[i] = _score_row(model.logits(hidden[row, : len(inputs)]).float(), targets, tok.call_id, spans, cut,
                                free)
        if progress is not None:
            progress.update(len(chunk))
    return [s for s in out if s is not None]


def _score_row(logits: torch.Tensor, targets: list[int], call_id: int, spans: list[tuple[str, int, int]],
               cut: int, free: np.ndarray) -> TextScores:
    """(T, V) fp32 logits of one text -> its per-position scores."""
    y = torch.tensor(targets, device=logits.device)  # (T,)
    scores = {k: v.cpu().numpy() for k, v in call_scores(logits, call_id).items()}  # (T,) each
    call_argmax = logits.argmax(-1) == call_id  # (T,)
    masked = logits.clone()
    masked[:, call_id] = float("-inf")
    # log(p(y) / (1 - p(CALL))) is the log-softmax over the vocabulary without <CALL>.
    nll = -torch.log_softmax(masked, -1).gather(1, y[:, None])[:, 0]  # (T,)
    greedy = masked.argmax(-1)  # (T,)
    return TextScores(np.asarray(targets, dtype=np.int64), nll.double().cpu().numpy(), scores,
                      call_argmax.cpu().numpy(), greedy.cpu().numpy(), spans, cut, free)


def perplexity(scores: list[TextScores]) -> dict[str, Any]:
    """exp(mean renormalised NLL) over all targets, and over fact / other positions apart."""
    nll = np.concatenate([s.nll for s in scores])
    fact = np.concatenate([s.fact for s in scores])

    def ppl(x: np.ndarray) -> float | None:
        return math.exp(float(x.mean())) if len(x) else None

    return {"perplexity": ppl(nll), "fact": ppl(nll[fact]), "other": ppl(nll[~fact]), "tokens": int(len(nll)),
            "fact_tokens": int(fact.sum())}


def call_stats(scores: list[TextScores], rule: CallRule, score: str = "p_call", ranked: str | None = None
               ) -> dict[str, Any]:
    """The rule's calls on ``score`` at every held-out position against the fact positions,
    where they land, and how the score separates unknown facts from the rest. ``ranked``: the
    form of the score the rule and the AUC read (``rules.ranked_score``; default ``score``)."""
    ranked = ranked or score
    calls, facts, firsts = [], [], []
    for s in scores:
        decided = rule.decide(torch.from_numpy(s.scores[ranked]), torch.from_numpy(s.call_argmax)).numpy()  # (T,)
        calls.append(decided)
        facts.append(s.fact)
        firsts += [bool(decided[lo]) for _, lo, _ in s.spans]
    call = np.concatenate(calls)
    fact = np.concatenate(facts)
    p = np.concatenate([s.p_call for s in scores]).astype(np.float64)
    hits = int((call & fact).sum())
    precision = hits / int(call.sum()) if call.any() else None
    recall = hits / int(fact.sum()) if fact.any() else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else None
    classes = np.concatenate([s.classes() for s in scores])  # (P,)
    value = np.concatenate([s.scores[score] for s in scores]).astype(np.float64)  # (P,)
    rank = np.concatenate([s.scores[ranked] for s in scores]).astype(np.float64)  # (P,) same order, no saturation
    first = np.zeros(len(value), dtype=bool)  # first token of an unknown value
    offset = 0
    for s in scores:
        for (_, lo, _), known in zip(s.spans, s.known()):
            first[offset + lo] = not known
        offset += len(s.targets)
    outside = (classes == FREE) | (classes == OTHER)
    return {
        "score": score,
        "auc": roc_auc(rank[classes == UNKNOWN_FACT], rank[classes != UNKNOWN_FACT]),
        "auc_first": roc_auc(rank[first], rank[outside]),
        "landing": {name: float((classes[call] == k).mean()) if call.any() else None
                    for k, name in enumerate(CLASSES)},
        "class_share": {name: float((classes == k).mean()) if len(classes) else 0.0 for k, name in enumerate(CLASSES)},
        "mean_score": {name: float(value[classes == k].mean()) if (classes == k).any() else None
                       for k, name in enumerate(CLASSES)},
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "recall_first": sum(firsts) / len(firsts) if firsts else None,
        "call_rate": float(call.mean()) if len(call) else 0.0,
        "fact_share": float(fact.mean()) if len(fact) else 0.0,
        "mean_p_call_fact": float(p[fact].mean()) if fact.any() else None,
        "mean_p_call_other": float(p[~fact].mean()) if (~fact).any() else None,
        "positions": int(len(call)),
    }


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """P(a positive scores above a negative) + P(tie) / 2 (the Mann-Whitney U statistic over
    |pos| |neg|); None when either side is empty."""
    if len(positive) == 0 or len(negative) == 0:
        return None
    both = np.concatenate([positive, negative])
    order = np.argsort(both, kind="stable")
    ranks = np.empty(len(both), dtype=np.float64)
    sorted_values = both[order]
    # Average ranks over ties: each run of equal values gets the mean of its 1-based ranks.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(both)]
    for lo, hi in zip(starts, ends):
        ranks[order[lo:hi]] = (lo + 1 + hi) / 2
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def leaks(scores: TextScores) -> list[tuple[str, bool]]:
    """(attribute, leaked) for each value of one held-out text."""
    return [(attr, known) for (attr, _, _), known in zip(scores.spans, scores.known())]


def leakage(scores: list[TextScores]) -> dict[str, Any]:
    """Leaked values / values, also per attribute (in order of appearance)."""
    results = [r for s in scores for r in leaks(s)]
    by_attribute = {}
    for attr in dict.fromkeys(a for a, _ in results):
        hits = [leaked for a, leaked in results if a == attr]
        by_attribute[attr] = sum(hits) / len(hits) if hits else None
    return {
        "leakage": sum(leaked for _, leaked in results) / len(results) if results else None,
        "facts": len(results),
        "leaked": sum(leaked for _, leaked in results),
        "truncated_facts": sum(s.truncated_facts for s in scores),
        "by_attribute": by_attribute,
    }
