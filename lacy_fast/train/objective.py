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


@torch.no_grad()
def reference_nll(ref: GPT, idx: torch.Tensor, targets: torch.Tensor, flags: torch.Tensor, call_id: int,
                  ignore_index: int, impl: str) -> torch.Tensor:
    """Per-position NLL of a frozen reference model (Rho-1's excess loss baseline), (B, T) fp32.

    The same renormalised NLL as the trained model's (<CALL> excluded), so the excess loss
    ``nll - ref_nll`` compares like with like: selection ranks by the renormalised NLL under
    either ``objective.renormalize``, so the reference's does not depend on it. Under
    no_grad the op runs its statistics pass alone and never materialises logits here.
    """
    hidden = ref(idx)  # (B, T, C)
    _, stats = lacy_linear_cross_entropy(hidden.flatten(0, 1), ref.head_weight, targets.flatten(), flags.flatten(),
                                         call_id, strategy="none", ignore_index=ignore_index, impl=impl)
    return stats["nll"].view_as(targets)


def reference_sidecar_name(ref_fingerprint: str, data_fingerprint: str) -> str:
    """The shards' sidecar that holds a reference export's per-token nll: one per reference
    and prepared content (re-preparing the data into the same folder names a new one)."""
    return f"refnll-{ref_fingerprint[:12]}-{data_fingerprint[:12]}"


@torch.no_grad()
def write_reference_sidecars(ref: GPT, shards, name: str, call_id: int, eos_id: int, ignore_index: int, impl: str,
                             device: torch.device, rank: int = 0, world: int = 1) -> int:
    """Compute the reference's nll of every token of every shard once, into the sidecar
    ``name`` beside each shard (strategy rho reads it per batch instead of running the
    reference on every batch of every epoch). Returns how many shards this rank wrote.

    A document is scored in its own context: the input before its first token is the EOS
    that ends the document before it in any packed stream, and a document longer than the
    reference's context is scored in consecutive windows. (In a packed batch a token's
    context may also hold the end of the previous document; the reference's nll without it
    is what the reference knows of the document itself.) Rank r writes shards r, r + W, ...
    atomically; a shard whose sidecar exists is skipped, so an interrupted run resumes.
    """
    import numpy as np

    from lacy_fast.data.shards import write_sidecar

    window = ref.cfg.max_seq_len
    written = 0
    for i, shard in enumerate(shards.shards):
        if i % world != rank or shard.sidecar_path(name).exists():
            continue
        values = np.zeros(shard.n_tokens, dtype=np.float32)
        offsets = shard.doc_offsets
        for d in range(shard.n_docs):
            lo, hi = int(offsets[d]), int(offsets[d + 1])
            tokens = np.concatenate([[eos_id], np.asarray(shard.tokens[lo:hi], dtype=np.int64)])  # EOS, then the doc
            flags = np.zeros(hi - lo, dtype=np.uint8)
            for start in range(0, hi - lo, window):
                idx = torch.from_numpy(tokens[start:start + window])[None].to(device)  # (1, W) inputs
                tgt = torch.from_numpy(tokens[start + 1:start + window + 1])[None].to(device)  # (1, W) targets
                nll = reference_nll(ref, idx[:, :tgt.shape[1]], tgt, torch.from_numpy(flags[:tgt.shape[1]])[None]
                                    .to(device), call_id, ignore_index, impl)
                values[lo + start:lo + start + tgt.shape[1]] = nll[0].float().cpu().numpy()
        write_sidecar(shard, name, values)
        written += 1
    return written
