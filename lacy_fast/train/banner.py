"""What `lacy-fast train` says before it works: start-up stages, then a short banner.

Start-up (data, model, DeepSpeed, resume) can take tens of seconds on a big model; each
stage is one stderr line with the time since the start (``Startup``), so a run is never
silent. Then, before the first step, rank 0 prints the banner (``banner_lines``), as
Hugging Face's Trainer and torchtitan do::

    lacy-fast train: runs/lacy, a new run
      model      tiny: 2 layers x 128 wide, 4 heads, context 256; 0.59M parameters
      objective  lacy (call_fraction 0.6)
      batch      2,048 tokens per step = 8 sequences x 256 tokens x 1 accumulation x 1 rank
      data       data: 75.1k tokens in 580 documents; 300 steps read 614k tokens, 8.2 passes
      device     cpu, fp32, ZeRO 0
      output     runs/lacy/checkpoints every 100 steps, keeping 2, ~7.1 MB each; export runs/lacy/export (2.4 MB)
      logging    runs/lacy/metrics.jsonl every 10 steps; TensorBoard off (not installed: ...); W&B off

The checkpoint size is an estimate: per parameter, the weights in the training precision,
the fp32 master copy (bf16 or ZeRO >= 1), and AdamW's two fp32 moments (measured: 12 bytes
per parameter for an fp32 ZeRO-0 run, ``tests/test_train.py``).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from lacy_fast.progress import human


class Startup:
    """One stderr line per start-up stage, with the seconds since the run started."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = time.perf_counter()

    def stage(self, what: str) -> None:
        if self.enabled:
            print(f"train: {what} ({time.perf_counter() - self.start:.1f} s)", file=sys.stderr, flush=True)


def checkpoint_bytes(params: int, precision: str, zero_stage: int) -> int:
    """Estimated size of one checkpoint (model states and optimizer states, all ranks)."""
    weights = 2 if precision == "bf16" else 4
    master = 4 if precision == "bf16" or zero_stage > 0 else 0
    return params * (weights + master + 8)


def export_bytes(params: int, precision: str) -> int:
    return params * (2 if precision == "bf16" else 4)


def size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def data_line(cfg, steps: int, tokens_per_step: int, stats: dict[str, Any] | None) -> str:
    """Where the data comes from, its size, and how many passes the run makes over it."""
    read = steps * tokens_per_step
    if cfg.data.source == "online":
        return (f"online labeling of {len(cfg.data.inputs)} input(s) with {cfg.data.tokenizer}; {steps} steps read "
                f"{human(read)} tokens")
    tokens, docs = (stats or {}).get("tokens"), (stats or {}).get("documents")
    if not tokens:
        return f"{cfg.data.path}; {steps} steps read {human(read)} tokens"
    passes = read / tokens
    over = f"{passes:.1f} passes" if passes >= 1 else f"{passes:.2g} of a pass"
    return f"{cfg.data.path}: {human(tokens)} tokens in {docs:,} documents; {steps} steps read {human(read)} tokens, {over}"


def run_banner(trainer) -> list[str]:
    """What a built ``loop.Trainer`` is about to do, printed by rank 0 before the first step."""
    cfg, t = trainer.cfg, trainer.t
    stats = None
    if cfg.data.source == "shards" and cfg.data.path:
        try:
            stats = json.loads((Path(cfg.data.path) / "stats.json").read_text())
        except (OSError, ValueError):
            stats = None
    steps = min(t.max_steps, t.lr_decay_steps) if t.max_gt_tokens > 0 else t.max_steps
    start = (f"resuming from step {trainer.step_no}" if trainer.resume_tag is not None else
             trainer.init_note or "a new run from random weights")
    return banner_lines(
        cfg=trainer.run_cfg, out=trainer.out, shape=trainer.model_cfg.shape, model_cfg=trainer.model_cfg,
        params=trainer.model.num_params(), strategy_note=strategy_note(trainer.objective, trainer.call_rate),
        world=trainer.d.world, device=str(trainer.d.device), precision=trainer.precision, steps=steps,
        data_stats=stats, start_note=start, logging_note=trainer.writer.describe())


def banner_lines(*, cfg, out, shape: str, model_cfg, params: int, strategy_note: str, world: int, device: str,
                 precision: str, steps: int, data_stats: dict[str, Any] | None, start_note: str,
                 logging_note: str) -> list[str]:
    t = cfg.train
    per_step = t.seq_len * t.micro_batch_size * t.grad_accum * world
    keep = f"keeping {t.keep_last}"
    every = f"every {t.ckpt_every} steps" if t.ckpt_every else "at the end (and on a signal)"
    budget = f" (stops at {human(t.max_gt_tokens)} ground-truth tokens)" if t.max_gt_tokens else ""
    return [
        f"lacy-fast train: {out}, {start_note}",
        f"  model      {shape}: {model_cfg.n_layer} layer{'s' if model_cfg.n_layer > 1 else ''} x {model_cfg.d_model} wide, {model_cfg.n_head} heads, "
        f"context {model_cfg.max_seq_len}; {human(params)} parameters",
        f"  objective  {strategy_note}",
        f"  batch      {per_step:,} tokens per step = {t.micro_batch_size} sequences x {t.seq_len} tokens x "
        f"{t.grad_accum} accumulation x {world} rank{'s' if world > 1 else ''}",
        f"  data       {data_line(cfg, steps, per_step, data_stats)}{budget}",
        f"  device     {device}, {precision}, ZeRO {cfg.zero_stage}",
        f"  output     {out}/checkpoints {every}, {keep}, ~{size(checkpoint_bytes(params, precision, cfg.zero_stage))} "
        f"each; export {out}/export ({size(export_bytes(params, precision))})",
        f"  logging    {out}/metrics.jsonl every {t.log_every} steps; {logging_note}",
    ]


def strategy_note(objective, call_rate: float | None) -> str:
    from lacy_fast.method import RANK_ALL, RANK_FACTS

    o = objective
    if o.strategy in RANK_FACTS:
        return f"{o.strategy} (call_fraction {o.call_fraction} of fact targets)"
    if o.strategy in RANK_ALL and call_rate is not None:
        return f"{o.strategy} (call_rate {call_rate:.4f} of all targets)"
    return o.strategy
