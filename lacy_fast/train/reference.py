"""Strategy rho's frozen reference model: loading its export, its per-token nll (Rho-1's
excess-loss baseline), and the shard sidecars that hold that nll, written once per
reference and prepared data so no training batch runs the reference."""
from __future__ import annotations

import sys

import numpy as np
import torch

from lacy_fast.config import RunConfig
from lacy_fast.errors import UserError
from lacy_fast.kernels import lacy_linear_cross_entropy
from lacy_fast.model import GPT
from lacy_fast.train.dist import Dist, reduce_host


def load_reference(cfg: RunConfig, source, precision: str, d: Dist, progress: bool):
    """The frozen reference export of strategy rho (and its metadata), else (None, None).
    On prepared shards its nll of every token is written once into sidecars, and ``source``
    attaches them to its batches; on online data the loop runs the reference per batch."""
    from lacy_fast.model.io import load_export

    o = cfg.objective
    if o.strategy != "rho":
        return None, None
    ref, meta = load_export(o.ref_checkpoint, device=d.device,
                            dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    if meta.get("tokenizer_sha256") != source.tokenizer.sha256:
        raise UserError(f"objective.ref_checkpoint {o.ref_checkpoint} was trained with another tokenizer; "
                        "rho needs a reference model on the same tokenizer as data.path")
    ref.requires_grad_(False)
    if source.shards is not None:
        source.ref_sidecar = _sidecars(ref, meta, source, cfg, d, progress)
    return ref, meta


def _sidecars(ref: GPT, meta: dict, source, cfg: RunConfig, d: Dist, progress: bool) -> str:
    """Write the reference's sidecars this rank owns; the name every rank reads them by."""
    from lacy_fast.train.identity import data_fingerprint, export_fingerprint

    o, shards, tok = cfg.objective, source.shards, source.tokenizer
    name = reference_sidecar_name(export_fingerprint(meta), data_fingerprint(shards.dir))
    missing = sum(not s.sidecar_path(name).exists() for s in shards.shards)
    if missing and d.is_main and progress:
        print(f"rho: scoring {missing} shard(s) with the reference once (sidecar {name})", file=sys.stderr)
    write_reference_sidecars(ref, shards, name, tok.call_id, tok.eos_id, o.ignore_index, o.impl, d.device, d.rank,
                             d.world)
    reduce_host([0], d)  # every rank's shards are written before any rank reads them
    return name


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
