"""The run's derived settings, resolved from its config before the ``Trainer`` exists:
precision, the objective with its call rate as a number (and the judge-label check), the
relabeled share, the tokens of one step; and the cosine schedule's length under a token
budget, from the data's host-side counts."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lacy_fast.config import ObjectiveConfig, RunConfig
from lacy_fast.errors import UserError
from lacy_fast.method import RANK_ALL, ground_truth_count, selection_fraction
from lacy_fast.train.dist import Dist, reduce_host


@dataclass(frozen=True)
class Settings:
    precision: str  # "bf16" | "fp32"
    call_rate: float | None  # objective.call_rate as a number; None: unused by this strategy
    objective: ObjectiveConfig  # cfg.objective with call_rate resolved where it is used
    fraction: float  # the share of candidates relabeled once the warm-up is over
    tokens_per_step: int  # tokens of one optimizer step over all ranks

    def gt_count(self, fraction: float, batch) -> int:
        """Ground-truth-gradient targets of a micro-batch at ``fraction`` (a soft relabel keeps
        a ground-truth gradient on every target: all of them count)."""
        o = self.objective
        if o.call_weight != 1.0 or o.call_weight_by_error:
            return batch.n_valid
        return ground_truth_count(o.strategy, fraction, batch.n_valid, batch.n_facts, batch.n_judge)


def resolve(cfg: RunConfig, device: torch.device, world: int) -> Settings:
    """The derived settings of ``cfg`` on ``world`` ranks of ``device``'s kind; a setting
    that cannot be resolved is a UserError."""
    precision = resolve_precision(cfg, device)
    check_judge_labels(cfg)
    if cfg.data.source == "shards" and not cfg.data.path:
        raise UserError("data.path is unset; pass data.path=DIR with DIR a `lacy-fast prepare` output")
    rate, _ = resolve_call_rate(cfg)
    call_rate = rate if cfg.objective.strategy in RANK_ALL else None
    objective = dataclasses.replace(cfg.objective, call_rate=call_rate if call_rate is not None else
                                    cfg.objective.call_rate)
    t = cfg.train
    return Settings(precision=precision, call_rate=call_rate, objective=objective,
                    fraction=selection_fraction(objective.strategy, objective.call_fraction, objective.call_rate),
                    tokens_per_step=t.seq_len * t.micro_batch_size * t.grad_accum * world)


def resolve_precision(cfg: RunConfig, device: torch.device) -> str:
    if cfg.train.precision != "auto":
        if cfg.train.precision == "bf16" and device.type == "cpu":
            raise UserError("train.precision=bf16 needs a GPU here; use fp32 (or auto) on CPU")
        return cfg.train.precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def resolve_call_rate(cfg: RunConfig) -> tuple[float | None, str]:
    """``objective.call_rate`` as a number, and how it was found. Only loss and rho read it
    (they rank all targets); for the others it is None when it cannot be resolved."""
    o = cfg.objective
    if o.call_rate != "auto":
        return float(o.call_rate), "set"
    stats_path = Path(cfg.data.path) / "stats.json" if cfg.data.path else None
    fact_fraction = None
    if cfg.data.source == "shards" and stats_path is not None and stats_path.is_file():
        try:
            fact_fraction = json.loads(stats_path.read_text()).get("fact_fraction")
        except json.JSONDecodeError:
            fact_fraction = None
    if not isinstance(fact_fraction, (int, float)):
        if o.strategy not in RANK_ALL:
            return None, "unused by this strategy"
        where = "data.source=online labels its data as it trains" if cfg.data.source == "online" else \
            f"{stats_path} holds no fact_fraction" if stats_path is not None else "data.path is unset"
        raise UserError(f"objective.call_rate=auto needs the fact fraction that `lacy-fast prepare` measured, but "
                        f"{where}; set objective.call_rate to a number in [0, 1]")
    rate = o.call_fraction * float(fact_fraction)
    return rate, f"objective.call_fraction {o.call_fraction} x fact fraction {fact_fraction:.4f} of {stats_path}"


def check_judge_labels(cfg: RunConfig) -> None:
    """strategy=judge relabels the targets a judge flagged; on data without judge labels it
    would silently train a plain LM, so that is refused."""
    if cfg.objective.strategy != "judge" or cfg.data.source != "shards" or not cfg.data.path:
        return
    stats_path = Path(cfg.data.path) / "stats.json"
    try:
        judged = json.loads(stats_path.read_text()).get("judge_tokens", 0) if stats_path.is_file() else None
    except json.JSONDecodeError:
        judged = None
    if judged == 0:
        raise UserError(f"objective.strategy=judge but {cfg.data.path} has no judge labels; add them with "
                        "`lacy-fast prepare ... --judge oracle:FACTS` (or hf:DIR), or choose another strategy")



def budget_steps(cfg: RunConfig, settings: Settings, source, d: Dist, probe: int = 16) -> int:
    """Steps the token budget will take, estimated from the first ``probe`` steps' batches
    (host-side counts, no model run): the cosine schedule's length under an equal-budget run."""
    t, o = cfg.train, settings.objective
    if source.batch(0, 0) is None:
        raise UserError("with data.source=online the token budget cannot be turned into a schedule length up "
                        "front; set train.lr_decay_steps as well as train.max_gt_tokens")
    totals = [0, 0]  # ground-truth targets per probe window: relabeling, and in the warm-up
    for step in range(probe):
        for micro in range(t.grad_accum):
            batch = source.batch(step, micro)
            totals[0] += settings.gt_count(settings.fraction, batch)
            totals[1] += settings.gt_count(0.0, batch)
    per_step, warm_per_step = (max(1, x // probe) for x in reduce_host(totals, d))
    warm = o.warmup_share * t.max_gt_tokens
    return min(t.max_steps, math.ceil(warm / warm_per_step + (t.max_gt_tokens - warm) / per_step))
