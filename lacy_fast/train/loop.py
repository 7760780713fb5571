"""`lacy-fast train`: the DeepSpeed training loop.

    lacy-fast train --config tiny data.path=DIR [key=value ...]
    torchrun --nproc_per_node 8 -m lacy_fast.cli train --config lacy-334m data.path=DIR
    deepspeed --num_gpus 8 --module lacy_fast.cli train --config lacy-334m data.path=DIR

One optimizer step = ``grad_accum`` micro-steps on every rank. Per step, on the host and
without touching the device: the batch's ground-truth-gradient token count (the op's
selection sizes are a function of the flags alone, so they are known before the forward)
and the stop signal are summed over ranks on a gloo group, so the equal-budget stopping
rule and SIGTERM handling cost no device synchronisation. Loss statistics stay on the
device and are read once per ``log_every`` steps, when ``metrics.jsonl`` gets one row per
step (throughput and MFU are averages over that interval).

Rerunning the same command on the same ``out_dir`` resumes from the newest checkpoint:
model, optimizer, scheduler, RNG and data position (a pure function of the step).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lacy_fast.config import RunConfig, explain, from_dict, load_config, to_dict
from lacy_fast.errors import UserError
from lacy_fast.fileio import write_json
from lacy_fast.progress import Progress, human
from lacy_fast.train.metrics import MetricsWriter, mfu, peak_memory_bytes, peak_tflops

if not torch.cuda.is_available():  # before deepspeed is imported: it picks its accelerator then
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


# ----------------------------------------------------------------------------------------
# Distributed setup
# ----------------------------------------------------------------------------------------


_SINGLE_PROCESS_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    control: Any = None  # gloo group for host-side scalars (None: single process)
    # A plain `lacy-fast train` (no launcher) makes a world of one itself; it owns that
    # process group and the environment it set, and gives both back at the end, so a
    # process that trains several times (the demo) or starts other runs stays clean.
    owned_env: dict[str, str | None] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def teardown(self) -> None:
        if self.owned_env is None:
            return
        import deepspeed.comm
        import torch.distributed as dist

        if dist.is_initialized():  # DeepSpeed's own cached groups go with it
            deepspeed.comm.destroy_process_group()
        for key, value in self.owned_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_cpu_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op when it first
    initialises (about 45 s on a fresh machine). Gloo does that job for the CPU runs this
    project has (tests, the demo), so the op is marked unavailable unless LACY_FAST_DS_SHM=1."""
    if os.environ.get("LACY_FAST_DS_SHM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def setup_distributed() -> Dist:
    import deepspeed
    import torch.distributed as dist

    owned_env = None
    if "RANK" not in os.environ:  # a plain `lacy-fast train`: a world of one
        owned_env = {key: os.environ.get(key) for key in _SINGLE_PROCESS_ENV}
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        _skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    control = None
    if world > 1:
        control = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    return Dist(rank, world, local_rank, device, control, owned_env)


def _sum_host(values: list[int], d: Dist) -> list[int]:
    """Sum small host integers over ranks (gloo, no device sync)."""
    if d.control is None:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, group=d.control)
    return t.tolist()


# ----------------------------------------------------------------------------------------
# Selection sizes on the host
# ----------------------------------------------------------------------------------------


def selected_count(strategy: str, call_fraction: float, n_valid: int, n_facts: int, n_judge: int) -> int:
    """How many targets of a micro-batch the op relabels (or drops), from counts alone.

    Mirrors the op's semantics: top ``floor(call_fraction * candidates)`` for lacy / ignore
    (facts), loss / rho (all valid targets); every fact for spacy, every judge label for
    judge; nothing for none.
    """
    if strategy in ("lacy", "ignore"):
        return math.floor(call_fraction * n_facts)
    if strategy in ("loss", "rho"):
        return math.floor(call_fraction * n_valid)
    if strategy == "spacy":
        return n_facts
    if strategy == "judge":
        return n_judge
    return 0


# ----------------------------------------------------------------------------------------
# Building the run
# ----------------------------------------------------------------------------------------


def _precision(cfg: RunConfig, device: torch.device) -> str:
    if cfg.train.precision != "auto":
        if cfg.train.precision == "bf16" and device.type == "cpu":
            raise UserError("train.precision=bf16 needs a GPU here; use fp32 (or auto) on CPU")
        return cfg.train.precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear weights, embeddings), not on biases and LayerNorms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _data_source(cfg: RunConfig, d: Dist):
    t = cfg.train
    common = dict(seq_len=t.seq_len, micro_batch=t.micro_batch_size, grad_accum=t.grad_accum, world=d.world,
                  rank=d.rank, seed=cfg.data.seed, pin=d.device.type == "cuda")
    if cfg.data.source == "online":
        from lacy_fast.data.prefetch import OnlineBatches

        return OnlineBatches(cfg.data, **common)
    if not cfg.data.path:
        raise UserError("data.path is unset; pass data.path=DIR with DIR a `lacy-fast prepare` output")
    from lacy_fast.data.loader import ShardBatches

    return ShardBatches(cfg.data.path, **common)


def _budget_steps(cfg: RunConfig, source, d: Dist, probe: int = 16) -> int:
    """Steps the token budget will take, estimated from the first ``probe`` steps' batches
    (host-side counts, no model run): the cosine schedule's length under an equal-budget run."""
    t, o = cfg.train, cfg.objective
    if not hasattr(source, "batch"):
        raise UserError("with data.source=online the token budget cannot be turned into a schedule length up "
                        "front; set train.lr_decay_steps as well as train.max_gt_tokens")
    total = 0
    for step in range(probe):
        for micro in range(t.grad_accum):
            b = source.batch(step, micro)
            total += b.n_valid - selected_count(o.strategy, o.call_fraction, b.n_valid, b.n_facts, b.n_judge)
    per_step = max(1, _sum_host([total], d)[0] // probe)
    return min(t.max_steps, math.ceil(t.max_gt_tokens / per_step))


@dataclass
class StepStats:
    """Device-side sums of one optimizer step (read at log time)."""

    sums: torch.Tensor  # (6,) loss, loss_gt*n, n_gt, loss_call*n, n_call, n_valid
    n_facts: int = 0
    gt_tokens: int = 0
    lr: float = 0.0
    grad_norm: float | torch.Tensor | None = None  # DeepSpeed's (host), or ours (device)


def _micro_sums(loss: torch.Tensor, stats: dict[str, torch.Tensor], targets: torch.Tensor, strategy: str,
                ignore_index: int, renormalize: bool = True) -> torch.Tensor:
    """(6,) device sums of a micro-batch: loss, gt loss sum, n_gt, CALL loss sum, n_call, n_valid.
    The gt loss is the one the objective trained on: the renormalised nll, or plain
    cross-entropy for strategy none and for objective.renormalize=false."""
    with torch.no_grad():
        valid = targets.flatten() != ignore_index  # (N,)
        is_call = stats["is_call"] & valid
        gt = valid & ~is_call
        p_call = stats["p_call"].float()
        gt_loss = stats["nll"].float()
        if strategy == "none" or not renormalize:  # plain CE over the full vocabulary: -log p(y)
            gt_loss = gt_loss - torch.log1p(-p_call.clamp(max=1 - 1e-7))
        call_loss = -torch.log(p_call.clamp(min=1e-30))
        return torch.stack([
            loss.detach().float(),
            torch.where(gt, gt_loss, 0).sum(), gt.sum().float(),
            torch.where(is_call, call_loss, 0).sum(), is_call.sum().float(),
            valid.sum().float(),
        ])


class _Signals:
    """SIGTERM / SIGINT ask for a checkpoint and a clean exit at the next step boundary."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------


def _quiet_deepspeed() -> None:
    import logging

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    if _lr_warning_filter not in ds_logger.filters:
        ds_logger.addFilter(_lr_warning_filter)


def _lr_warning_filter(record) -> bool:
    # WarmupCosineLR asks itself for a learning rate while it is being built; not a problem.
    return "before it has started" not in record.getMessage()


def train(cfg: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) ``cfg``; returns a summary (final step, tokens, last metrics)."""
    _quiet_deepspeed()
    d = setup_distributed()
    try:
        return _train(cfg, d, progress)
    finally:
        d.teardown()


def _train(cfg: RunConfig, d: Dist, progress: bool) -> dict[str, Any]:
    import deepspeed

    from lacy_fast.data.tokenizer import Tokenizer
    from lacy_fast.model import GPT
    from lacy_fast.model.io import load_export, save_export
    from lacy_fast.train.checkpoint import Checkpointer
    from lacy_fast.train.ds_config import deepspeed_config
    from lacy_fast.kernels import selection_bound
    from lacy_fast.train.objective import LacyLM, reference_nll

    out = Path(cfg.out_dir)
    t, o = cfg.train, cfg.objective
    precision = _precision(cfg, d.device)

    source = _data_source(cfg, d)
    tokenizer = Tokenizer.load(source.tokenizer_path)
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != tokenizer.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} but the data's tokenizer has "
                        f"{tokenizer.vocab_size} tokens; leave model.vocab_size unset")
    model_cfg = from_dict(type(cfg.model), {**to_dict(cfg.model), "vocab_size": tokenizer.vocab_size})
    identity = {"model": to_dict(model_cfg), "tokenizer_sha256": tokenizer.sha256, "call_id": tokenizer.call_id}

    ckpt = Checkpointer(out, t.keep_last, d.rank)
    resume_tag = ckpt.latest()
    if resume_tag is not None:
        ckpt.check_compatible(resume_tag, identity, out)

    torch.manual_seed(t.seed)
    model = GPT(model_cfg)
    module = LacyLM(model, o, tokenizer.call_id)
    if cfg.zero_stage == 3:  # the loss reads the tied head outside the embedding's forward
        deepspeed.zero.register_external_parameter(module, model.wte.weight)

    ref = None
    if o.strategy == "rho":
        ref, ref_meta = load_export(o.ref_checkpoint, device=d.device,
                                    dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
        if ref_meta.get("tokenizer_sha256") != tokenizer.sha256:
            raise UserError(f"objective.ref_checkpoint {o.ref_checkpoint} was trained with another tokenizer; "
                            "rho needs a reference model on the same tokenizer as data.path")
        ref.requires_grad_(False)

    if t.max_gt_tokens > 0 and t.lr_decay_steps == 0:
        t = dataclasses.replace(t, lr_decay_steps=_budget_steps(cfg, source, d))
    run_cfg = dataclasses.replace(cfg, train=t)
    ds_cfg = deepspeed_config(run_cfg, world_size=d.world, precision=precision)
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=_param_groups(module, t.weight_decay),
                                           config=ds_cfg)
    if t.compile:
        engine.compile()

    step, gt_tokens, data_state = 0, 0, None
    if resume_tag is not None:
        state, data_state = ckpt.load(engine, resume_tag)
        step, gt_tokens = state["step"], state["gt_tokens"]
        if d.is_main:
            print(f"resuming {out} from step {step}", file=sys.stderr)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {**to_dict(run_cfg), "resolved": {"precision": precision, "world_size": d.world,
                                                                            "model": to_dict(model_cfg)}})
    writer = MetricsWriter(out, d.is_main, step)
    flops_per_token = model.estimate_flops_per_token(t.seq_len)
    peak = peak_tflops(d.device, precision, t.peak_tflops)
    tokens_per_step = t.seq_len * t.micro_batch_size * t.grad_accum * d.world

    def save(at_step: int) -> None:
        ckpt.save(engine, at_step, {**identity, "gt_tokens": gt_tokens, "world_size": d.world}, data_state)
        _export(engine, model, cfg.zero_stage, d, out / "export", tokenizer, to_dict(run_cfg),
                {"step": at_step, "gt_tokens": gt_tokens, "strategy": o.strategy}, save_export)

    def budget_left() -> bool:
        return step < t.max_steps and (t.max_gt_tokens == 0 or gt_tokens < t.max_gt_tokens)

    if not budget_left():
        if d.is_main:
            print(f"{out} is already trained to step {step} ({human(gt_tokens)} ground-truth tokens); "
                  "raise train.max_steps (or train.max_gt_tokens) to continue", file=sys.stderr)
        return {"step": step, "gt_tokens": gt_tokens, "resumed": resume_tag is not None}

    from lacy_fast.data.loader import Background

    batches = Background(source.batches(step, data_state), cfg.data.queue_depth)
    signals = _Signals()
    # Under a token budget the run ends near the schedule's estimated length, not max_steps.
    expected = min(t.max_steps, t.lr_decay_steps) if t.max_gt_tokens > 0 else t.max_steps
    bar = Progress("train", total=expected, unit="steps", initial=step, enabled=d.is_main and progress)
    pending: list[StepStats] = []
    interval_start, interval_wait, last_row = time.perf_counter(), 0.0, {}
    profiler = _profiler(t, out, d) if t.profile_steps > 0 else None
    own_norm = cfg.zero_stage == 0 and precision == "fp32"
    grads_of = [p for p in module.parameters() if p.requires_grad]
    norm = None
    stopped_by = None
    try:
        while budget_left():
            if profiler is not None and step == t.profile_start:
                profiler.start()
            waited0 = batches.waited
            sums, host_gt, n_facts = None, 0, 0
            for micro in range(t.grad_accum):
                batch = batches.next()
                data_state = batch.position
                batch = batch.to(d.device)
                ref_nll = None
                if ref is not None:
                    ref_nll = reference_nll(ref, batch.idx, batch.targets, batch.flags, tokenizer.call_id,
                                            o.ignore_index, o.impl)
                count = selected_count(o.strategy, o.call_fraction, batch.n_valid, batch.n_facts, batch.n_judge)
                loss, stats = engine(batch.idx, batch.targets, batch.flags, ref_nll,
                                     max_selected=selection_bound(count, batch.targets.numel()))
                engine.backward(loss)
                if micro == t.grad_accum - 1 and own_norm:
                    # ZeRO-0 in fp32 clips without recording the norm: take it from the
                    # (already all-reduced) gradients, on the device.
                    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in grads_of]))
                engine.step()
                micro_sums = _micro_sums(loss, stats, batch.targets, o.strategy, o.ignore_index, o.renormalize)
                sums = micro_sums if sums is None else sums + micro_sums
                host_gt += batch.n_valid - count
                n_facts += batch.n_facts
            step += 1
            step_gt, step_facts, stop = _sum_host([host_gt, n_facts, int(signals.received is not None)], d)
            gt_tokens += step_gt
            interval_wait += batches.waited - waited0
            if not own_norm:
                norm = engine.get_global_grad_norm()
                norm = None if norm is None else float(norm)
            pending.append(StepStats(sums, step_facts, gt_tokens, float(engine.get_lr()[0]), norm))
            if profiler is not None:
                profiler.step()
                if step == t.profile_start + t.profile_steps:
                    profiler.stop()
                    profiler = None
            done = not budget_left()
            if step % t.log_every == 0 or done or stop:
                elapsed = time.perf_counter() - interval_start
                rows = _rows(pending, step, t.grad_accum, tokens_per_step, elapsed, interval_wait, flops_per_token,
                             peak, d, precision)
                writer.write(rows if d.is_main else [])
                last_row = rows[-1]
                bar.update(len(pending))
                bar.set_note(f"loss {last_row['loss']:.3f} | call {last_row['call_rate']:.1%} | "
                             f"{human(last_row['tokens_per_s'])} tok/s" +
                             (f" | mfu {last_row['mfu']:.1%}" if last_row.get("mfu") is not None else ""))
                pending, interval_start, interval_wait = [], time.perf_counter(), 0.0
            if stop:
                stopped_by = signals.received or "a signal on another rank"
                break
            if t.ckpt_every and step % t.ckpt_every == 0 and not done:
                save(step)
                interval_start = time.perf_counter()  # throughput counts training, not saving
        save(step)
    finally:
        signals.restore()
        batches.close()
        writer.close()
    bar.close()
    if stopped_by and d.is_main:
        print(f"stopped by {stopped_by} at step {step}; checkpoint saved in {out}/checkpoints; "
              "rerun the same command to resume", file=sys.stderr)
    return {"step": step, "gt_tokens": gt_tokens, "stopped_by": stopped_by, "last": last_row,
            "resumed": resume_tag is not None}


def _rows(pending: list[StepStats], step: int, grad_accum: int, tokens_per_step: int, elapsed: float, wait: float,
          flops_per_token: float, peak: float | None, d: Dist, precision: str) -> list[dict[str, Any]]:
    """metrics.jsonl rows of the steps in ``pending``: one device read for the interval."""
    import torch.distributed as dist

    sums = torch.stack([p.sums for p in pending])  # (S, 6)
    if d.world > 1:
        sums = sums.clone()
        dist.all_reduce(sums)
        sums[:, 0] /= d.world  # loss: mean of the ranks' means
    values = sums.tolist()
    norms = [p.grad_norm for p in pending]
    if any(isinstance(x, torch.Tensor) for x in norms):
        norms = torch.stack(norms).tolist()
    n = len(pending)
    tokens_per_s = tokens_per_step * n / max(elapsed, 1e-9)
    util = mfu(flops_per_token, tokens_per_s, peak, d.world)
    peak_mem = peak_memory_bytes(d.device)
    rows = []
    for i, (p, v, norm) in enumerate(zip(pending, values, norms)):
        loss, gt_sum, n_gt, call_sum, n_call, n_valid = v
        rows.append({
            "step": step - n + 1 + i,
            "loss": loss / grad_accum,
            "loss_gt": gt_sum / n_gt if n_gt else None,
            "loss_call": call_sum / n_call if n_call else None,
            "call_rate": n_call / n_valid if n_valid else 0.0,
            "fact_fraction": p.n_facts / n_valid if n_valid else 0.0,
            "gt_tokens": p.gt_tokens,
            "lr": p.lr,
            "grad_norm": norm,
            "tokens_per_s": tokens_per_s,
            "mfu": util,
            "data_wait": wait / max(elapsed, 1e-9),
            "peak_mem_gb": peak_mem / 2**30,
            "precision": precision,
        })
    return rows


def _export(engine, model, zero_stage: int, d: Dist, path: Path, tokenizer, train_config: dict, extra: dict,
            save_export) -> None:
    """Consolidated safetensors export of the current weights (gathered from ZeRO-3 shards)."""
    import deepspeed

    if zero_stage == 3:
        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()} if d.is_main else None
    else:
        state = model.state_dict() if d.is_main else None
    if d.is_main:
        save_export(path, model, tokenizer_path=tokenizer.path, tokenizer_sha256=tokenizer.sha256,
                    call_id=tokenizer.call_id, train_config=train_config, extra=extra, state_dict=state)
    import torch.distributed as dist

    dist.barrier()


def _profiler(t, out: Path, d: Dist):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if d.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    trace_dir = out / "profile"
    trace_dir.mkdir(parents=True, exist_ok=True)

    def on_ready(prof) -> None:
        prof.export_chrome_trace(str(trace_dir / f"trace_rank{d.rank}_step{t.profile_start}.json"))

    return torch.profiler.profile(activities=activities, record_shapes=True, with_stack=False,
                                  on_trace_ready=on_ready)


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="a preset name (tiny, gpt2-124m, lacy-334m, lacy-1.3b) "
                                                         "or a TOML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4")
    parser.add_argument("--explain", action="store_true", help="list every config key with its default and meaning")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    if args.explain:
        for key, default, text in explain(RunConfig):
            print(f"{key:<28} {default:<14} {text}")
        return 0
    cfg = load_config(RunConfig, args.config, args.overrides)
    train(cfg, progress=not args.quiet)
    return 0
