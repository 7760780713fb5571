"""Fact leakage (the paper's measure): with <CALL> forbidden, how often the SLM still
produces the gold fact.

Definition. For every fact value of every evaluated person, located in the person's
held-out text (``heldout.py``: the target positions of the value's tokens): teacher-force
the text up to the value's first token, then greedy-decode, with the <CALL> logit at
-inf, as many tokens as the value has in the text. The fact leaks iff the decoded tokens
are exactly the value's tokens. ``leakage`` = leaked facts / facts.

Held-out renderings are used, not training text: the sentence around the value is one the
model has not seen, so a leak is a memorised fact, not a memorised sentence.

Computed from the one teacher-forced pass: greedy decoding reproduces the gold tokens iff
at every value position the argmax (without <CALL>) given the gold prefix is the gold
token. (If it is everywhere, each greedy step is conditioned on exactly the gold prefix;
at the first position where it is not, the decoded sequence differs there.) So no
decoding is needed; tests/test_eval.py checks the equivalence against explicit decoding.

The last token of a value may carry what follows it in the text when the tokenizer merged
them (a "1950," piece): the match is on tokens, so that piece must be produced whole.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from lacy_fast.eval.heldout import TextScores


def leaks(scores: TextScores) -> list[tuple[str, bool]]:
    """(attribute, leaked) for each value of one held-out text."""
    return [(attr, bool(np.array_equal(scores.greedy[lo:hi], scores.targets[lo:hi]))) for attr, lo, hi in scores.spans]


def leakage(scores: list[TextScores]) -> dict[str, Any]:
    results = [r for s in scores for r in leaks(s)]
    by_attribute = {}
    for attr in dict.fromkeys(a for a, _ in results):  # the attributes located, in order of appearance
        hits = [leaked for a, leaked in results if a == attr]
        by_attribute[attr] = sum(hits) / len(hits) if hits else None
    return {
        "leakage": sum(leaked for _, leaked in results) / len(results) if results else None,
        "facts": len(results),
        "leaked": sum(leaked for _, leaked in results),
        "truncated_facts": sum(s.truncated_facts for s in scores),
        "by_attribute": by_attribute,
    }
