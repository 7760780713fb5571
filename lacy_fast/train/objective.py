"""The module DeepSpeed trains: the GPT and the fused LaCy loss on its tied head.

It holds no distributed code either; the loop wraps it in a DeepSpeed engine. Under ZeRO-3
the head weight is read here, outside the embedding's own forward, so the loop registers
it as an external parameter of this module (DeepSpeed then gathers it for our forward and
backward).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lacy_fast.config import ObjectiveConfig
from lacy_fast.kernels import lacy_linear_cross_entropy
from lacy_fast.method import selection_fraction
from lacy_fast.model import GPT


class LacyLM(nn.Module):
    """``objective`` is resolved: for loss / rho its ``call_rate`` is a number (the loop
    resolves ``auto``), which the op receives as the share of candidates to relabel."""

    def __init__(self, model: GPT, objective: ObjectiveConfig, call_id: int):
        super().__init__()
        self.model = model
        self.objective = objective
        self.call_id = call_id

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, flags: torch.Tensor,
                ref_nll: torch.Tensor | None = None, max_selected: int | None = None,
                fraction: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """idx, targets, flags: (B, T); ref_nll: (B, T) for strategy rho; max_selected: a
        host-side bound on the positions the strategy selects in this batch
        (``selection_bound`` of the loop's ``selected_count``; None: the op's safe bound);
        fraction: the share of candidates to relabel in this step (None: the objective's;
        0 during ``objective.warmup_share``).

        Returns the loss (mean over counted positions) and the op's per-position stats
        (flattened to B*T): nll, is_call, p_call.
        """
        hidden = self.model(idx)  # (B, T, C)
        o = self.objective
        return lacy_linear_cross_entropy(
            hidden.flatten(0, 1),  # (B*T, C)
            self.model.head_weight,  # (V, C)
            targets.flatten(),
            flags.flatten(),
            self.call_id,
            strategy=o.strategy,
            call_fraction=selection_fraction(o.strategy, o.call_fraction, o.call_rate) if fraction is None else fraction,
            ref_nll=None if ref_nll is None else ref_nll.flatten(),
            ignore_index=o.ignore_index,
            impl=o.impl,
            renormalize=o.renormalize,
            max_selected=max_selected,
            call_weight=o.call_weight,
            weight_by_error=o.call_weight_by_error,
        )
