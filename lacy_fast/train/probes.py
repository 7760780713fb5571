"""What training does to the selection and to the facts an SLM can learn, measured as it runs.

- ``SelectionTracker``: for the ranked strategies, ``selection_persistence``, the share of
  the targets selected in an interval that were also selected at their previous occurrence
  in training (the same corpus token, an epoch earlier), beside ``selection_chance``, the
  share of those targets' fellow candidates that had been selected then: what persistence
  would be if this step's ranking ignored the last one. Persistence far above chance means
  the same targets stay relabeled; a relabeled target gets no ground-truth gradient under
  the paper's objective, so nothing lowers its loss to move it out ("lock-in").
- ``Probe``: the ground-truth nll (renormalised, <CALL> excluded: what the model knows of
  the target among real tokens) of a fixed prepared set, on all its targets, on its fact
  targets (spaCy's flag) and, where the set carries judge labels, on those (the demo's
  oracle judge labels exactly the fact values), and the mean p(<CALL>) on fact targets,
  every ``train.probe_every`` steps. The demo points it at biographies of the frequent
  people, whose facts a plain LM learns.

Both are host-side bookkeeping at log time or every few hundred steps, off the step's
hot path: the tracker reads each micro-batch's selection when the loop reads its metrics
anyway (one synchronisation per logging interval), the probe runs a few forward passes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lacy_fast.errors import UserError
from lacy_fast.method import FLAG_FACT, FLAG_JUDGE, RANK_FACTS, RANKED, Targets

SEEN, WAS_SELECTED = 1, 2  # bits of the tracker's per-token state
MAX_TRACKED_TOKENS = 1 << 30  # one byte of state per corpus token: at most 1 GiB


class SelectionTracker:
    """``selection_persistence`` and ``selection_chance`` of the module docstring."""

    def __init__(self, strategy: str, n_tokens: int, rule: Targets):
        self.strategy, self.rule = strategy, rule
        self.state = np.zeros(n_tokens, dtype=np.uint8)  # (corpus tokens,) SEEN | WAS_SELECTED bits
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]] = []
        self._reset()

    @classmethod
    def maybe(cls, strategy: str, source: Any, rule: Targets) -> "SelectionTracker | None":
        """A tracker for ranked strategies on prepared shards of a trackable size, else None."""
        n_tokens = getattr(getattr(source, "shards", None), "total_tokens", None)
        if strategy not in RANKED or n_tokens is None or n_tokens > MAX_TRACKED_TOKENS:
            return None
        return cls(strategy, n_tokens, rule)

    def _reset(self) -> None:
        self.selected_seen = self.selected_again = self.candidates_seen = self.candidates_were = 0

    def add(self, target_ids: np.ndarray, targets: torch.Tensor, flags: torch.Tensor, is_call: torch.Tensor) -> None:
        """Queue one micro-batch: its host-side ids, targets and flags (never copied from the
        device), and the device's selection, read at ``read``."""
        self.pending.append((target_ids.reshape(-1), targets.reshape(-1).numpy(), flags.reshape(-1).numpy(),
                             is_call.detach().reshape(-1)))

    def read(self) -> dict[str, float | None]:
        """Apply the queued micro-batches in training order; the interval's two shares."""
        for ids, targets, flags, is_call in self.pending:
            valid = self.rule.valid(targets)
            cand = valid & ((flags & FLAG_FACT) != 0) if self.strategy in RANK_FACTS else valid
            now = is_call.cpu().numpy() & cand
            before = self.state[ids]
            seen = (before & SEEN) != 0
            was = (before & WAS_SELECTED) != 0
            self.selected_seen += int((now & seen).sum())
            self.selected_again += int((now & seen & was).sum())
            self.candidates_seen += int((cand & seen).sum())
            self.candidates_were += int((cand & seen & was).sum())
            self.state[ids[cand]] = SEEN | (now[cand].astype(np.uint8) * WAS_SELECTED)
        self.pending = []
        out = {"selection_persistence": self.selected_again / self.selected_seen if self.selected_seen else None,
               "selection_chance": self.candidates_were / self.candidates_seen if self.candidates_seen else None}
        self._reset()
        return out


class Probe:
    """The fixed probe of the module docstring, over a prepared directory's packed samples."""

    def __init__(self, path: str, seq_len: int, tokenizer_sha256: str, rule: Targets, max_samples: int = 64):
        from lacy_fast.data.packing import PackedSamples
        from lacy_fast.data.shards import ShardSet

        shards = ShardSet(path)
        if shards.tokenizer_sha256 != tokenizer_sha256:
            raise UserError(f"train.probe={path} was prepared with another tokenizer than the training data; prepare "
                            f"it with `lacy-fast prepare --tokenizer DATA/tokenizer.model`")
        samples = PackedSamples(shards, seq_len, seed=0)
        if len(samples) == 0:
            raise UserError(f"train.probe={path} holds fewer than {seq_len + 1} tokens, not one sample; add text to it")
        rows = [samples[i] for i in range(min(len(samples), max_samples))]
        tokens = torch.from_numpy(np.stack([r[0] for r in rows]))  # (S, T + 1)
        self.idx, self.targets = tokens[:, :-1], tokens[:, 1:]
        self.flags = torch.from_numpy(np.stack([r[1][1:] for r in rows]))
        self.rule = rule
        self.path = Path(path)

    @torch.no_grad()
    def measure(self, model, call_id: int, device: torch.device, batch: int = 8) -> dict[str, float]:
        """probe_nll, probe_fact_nll, probe_p_call (mean p(<CALL>) on fact targets),
        probe_call_rate (share of targets where p(<CALL>) > 0.5, so <CALL> is the most likely
        token) of ``model``, and probe_judge_nll where the probe has judge labels."""
        from lacy_fast.kernels import lacy_linear_cross_entropy

        was_training = model.training
        model.eval()
        sums = torch.zeros(8, dtype=torch.float64)  # nll, n, fact nll, n facts, p_call on facts, judge nll, n, calls
        try:
            head = model.head_weight.float()  # (V, C) once, not per batch
            for start in range(0, len(self.idx), batch):
                part = slice(start, start + batch)
                targets, flags = self.targets[part].flatten(), self.flags[part].flatten()
                hidden = model(self.idx[part].to(device)).flatten(0, 1)  # (B*T, C)
                _, stats = lacy_linear_cross_entropy(hidden.float(), head, targets.to(device),
                                                     flags.to(device), call_id, strategy="none")
                valid = self.rule.valid(targets)
                fact = valid & ((flags & FLAG_FACT) != 0)
                judge = valid & ((flags & FLAG_JUDGE) != 0)
                nll, p_call = stats["nll"].double().cpu(), stats["p_call"].double().cpu()
                sums += torch.stack([nll[valid].sum(), valid.sum(), nll[fact].sum(), fact.sum(), p_call[fact].sum(),
                                     nll[judge].sum(), judge.sum(), (valid & (p_call > 0.5)).sum()])
        finally:
            model.train(was_training)
        nll, n, fact_nll, n_fact, p_call, judge_nll, n_judge, calls = sums.tolist()
        out = {"probe_nll": nll / max(n, 1), "probe_fact_nll": fact_nll / max(n_fact, 1),
               "probe_p_call": p_call / max(n_fact, 1), "probe_call_rate": calls / max(n, 1)}
        if n_judge:
            out["probe_judge_nll"] = judge_nll / n_judge
        return out
