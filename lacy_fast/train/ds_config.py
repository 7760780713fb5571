"""The DeepSpeed JSON, built in one place from the typed config."""
from __future__ import annotations

from typing import Any

import torch

from lacy_fast.config import RunConfig


def deepspeed_config(cfg: RunConfig, *, world_size: int, precision: str) -> dict[str, Any]:
    """DeepSpeed config for ``cfg`` on ``world_size`` ranks in ``precision`` ('bf16' | 'fp32').

    - AdamW through ``torch.optim`` (``torch_adam``): no JIT build of DeepSpeed's fused Adam
      (a minute per fresh machine, and impossible without nvcc); the parameter groups passed
      to ``deepspeed.initialize`` carry the weight decay (matrices only).
    - Warmup + cosine decay to ``min_lr_ratio``; warmup starts at lr / (warmup + 1) rather
      than 0 so the first step is not wasted.
    - ZeRO-3 gathers the tied head for the loss outside the embedding's forward: the
      training module registers it as an external parameter.
    """
    t = cfg.train
    decay_steps = t.lr_decay_steps or t.max_steps
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 2:
        zero.update(overlap_comm=True, contiguous_gradients=True)
    if cfg.zero_stage == 3:
        # Gathering the full set of small parameters each step costs more than keeping them.
        zero.update(stage3_param_persistence_threshold=int(1e5), stage3_prefetch_bucket_size=int(5e7))
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": 1e-8, "weight_decay": t.weight_decay,
                       "torch_adam": True},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(decay_steps, t.warmup_steps + 1),
                # DeepSpeed wants at least one warm-up step; with warmup_steps=0 that step
                # starts at the full rate (warmup_min_ratio 1), so there is no warm-up.
                "warmup_num_steps": max(1, t.warmup_steps),
                "warmup_type": "linear",
                "warmup_min_ratio": 1.0 / (t.warmup_steps + 1),
                "cos_min_ratio": t.min_lr_ratio,
            },
        },
        "steps_per_print": 1 << 62,  # our own progress line and metrics.jsonl
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear weights, embeddings), not on biases and LayerNorms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
