"""What the LaCy objective means, defined once: every other module imports it from here.

    from lacy_fast.method import STRATEGIES, FLAG_FACT, valid_targets, selected_count

The method itself, in words, is docs/method.md. This module holds the pieces of it that
code in several places must agree on:

- the strategy names, which of them rank candidates and which candidates they rank;
- the names of the loss implementations;
- the flag bits stored per token in the shards (``prepare`` writes them, the op reads them);
- the rule for a valid target (``valid_targets``), which the op, the data loader's counts
  and the training metrics all apply, on torch tensors and numpy arrays alike;
- how many targets of a micro-batch a strategy relabels (``selected_count``), from counts
  alone, so the loop can budget ground-truth tokens on the host without asking the device;
- which share the ranked strategies relabel (``selection_fraction``): ``call_fraction`` of
  the fact targets for ``lacy`` / ``ignore``, ``call_rate`` of all valid targets for
  ``loss`` / ``rho``.

Light on purpose (no torch, no numpy import): the config module imports it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeVar

# ----------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------

STRATEGIES = ("none", "loss", "spacy", "lacy", "rho", "judge", "ignore")
# Strategies that relabel the top share of their candidates by a score (the current loss,
# or for rho the excess loss over a reference model).
RANKED = ("lacy", "loss", "rho", "ignore")
RANK_FACTS = ("lacy", "ignore")  # candidates: the fact targets; share: objective.call_fraction
RANK_ALL = ("loss", "rho")  # candidates: every valid target; share: objective.call_rate
# Ranked strategies whose selected targets become <CALL> (ignore drops them instead): the
# ones a soft relabel (objective.call_weight < 1) applies to.
RELABEL_RANKED = ("lacy", "loss", "rho")
# Loss implementations (kernels/lacy_ce.py): auto picks triton on CUDA, chunked elsewhere.
IMPLS = ("auto", "triton", "torch", "chunked")

# ----------------------------------------------------------------------------------------
# Flag bits: one byte per token in the shards, describing that token as a target
# ----------------------------------------------------------------------------------------

FLAG_FACT = 1  # bit 0: the spaCy fact proxy marks the token as part of a fact word
FLAG_JUDGE = 2  # bit 1: an external judge says "call here" (strategy judge)
# Bits 2-7 are reserved.

# ----------------------------------------------------------------------------------------
# Valid targets
# ----------------------------------------------------------------------------------------

A = TypeVar("A")  # a torch.Tensor or a numpy.ndarray of integer target ids


def valid_targets(targets: A, vocab: int, call_id: int, ignore_index: int) -> A:
    """Boolean mask of the positions that have a target: ``target != ignore_index`` and
    ``0 <= target < vocab`` and ``target != call_id``.

    Works elementwise on a torch tensor or a numpy array (same expression, same result),
    so the op on the device and the loader on the host count the same positions. Why
    out-of-range ids and <CALL> as a target are not valid: docs/method.md, "Valid targets".
    """
    return (targets != ignore_index) & (targets >= 0) & (targets < vocab) & (targets != call_id)


@dataclass(frozen=True)
class Targets:
    """The valid-target rule with its parameters, and the counts the loop budgets with.

    ``vocab`` is the tokenizer's vocabulary. The op is given the model's head, whose rows
    are padded to a multiple of 64, so its own bound is the padded size; ids between the two
    never reach it, because shards are range-checked against the tokenizer's vocabulary
    (``data/shards.py``) and online labeling produces only the tokenizer's ids.
    """

    vocab: int
    call_id: int
    ignore_index: int = -100

    def valid(self, targets: A) -> A:
        return valid_targets(targets, self.vocab, self.call_id, self.ignore_index)

    def counts(self, targets: Any, flags: Any) -> tuple[int, int, int]:
        """(valid targets, valid fact targets, valid judge targets) of host arrays or tensors:
        the op's candidate counts (``selected_count`` takes them)."""
        valid = self.valid(targets)
        return (int(valid.sum()), int((valid & ((flags & FLAG_FACT) != 0)).sum()),
                int((valid & ((flags & FLAG_JUDGE) != 0)).sum()))


# ----------------------------------------------------------------------------------------
# Selection sizes
# ----------------------------------------------------------------------------------------


def selection_fraction(strategy: str, call_fraction: float, call_rate: Any) -> float:
    """The share of its candidates a ranked strategy relabels: ``call_rate`` (a resolved
    number) for loss / rho, ``call_fraction`` for the others."""
    if strategy in RANK_ALL:
        if isinstance(call_rate, bool) or not isinstance(call_rate, (int, float)):
            raise ValueError(f"strategy {strategy} needs a resolved objective.call_rate (a number), got {call_rate!r}")
        return float(call_rate)
    return float(call_fraction)


def selected_count(strategy: str, fraction: float, n_valid: int, n_facts: int, n_judge: int) -> int:
    """How many targets of a micro-batch the op relabels (for ``ignore``: drops).

    ``n_valid`` counts valid targets, ``n_facts`` / ``n_judge`` the valid targets with the
    fact / judge bit (the op's candidates), ``fraction`` is ``selection_fraction``. The
    op's rule: floor(fraction x candidates) for the ranked strategies (the product taken
    in float64, as the op does), every fact for spacy, every judge label for judge,
    nothing for none.
    """
    if strategy in RANK_FACTS:
        return math.floor(fraction * n_facts)
    if strategy in RANK_ALL:
        return math.floor(fraction * n_valid)
    if strategy == "spacy":
        return n_facts
    if strategy == "judge":
        return n_judge
    return 0


def ground_truth_count(strategy: str, fraction: float, n_valid: int, n_facts: int, n_judge: int) -> int:
    """Targets of a micro-batch trained on their ground truth (the equal-budget measure):
    the valid targets the strategy does not relabel or drop."""
    return n_valid - selected_count(strategy, fraction, n_valid, n_facts, n_judge)
