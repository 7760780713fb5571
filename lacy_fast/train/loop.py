"""`lacy-fast train`: the DeepSpeed training loop, as a ``Trainer``.

    lacy-fast train --config tiny data.path=DIR [key=value ...]
    torchrun --nproc_per_node 8 -m lacy_fast.cli train --config lacy-334m data.path=DIR
    deepspeed --num_gpus 8 --module lacy_fast.cli train --config lacy-334m data.path=DIR

``Trainer`` reads top to bottom as a run does: ``__init__`` builds it (data and tokenizer,
the resolved objective, the run identity, the out_dir lock, model, reference model,
schedule, DeepSpeed engine, resume, metrics); ``run`` loops ``step`` until the step or
token budget is spent, calling ``log`` every ``log_every`` steps and ``save`` every
``ckpt_every``. Each guard has one place:

- ``__init__``: a lock on out_dir (``lacy_fast/lock.py``; a second run is refused), then
  the resume check: every setting of the run identity must match the checkpoint's
  (``identity.py``, which lists the settings that may change).
- ``step``: records on the device whether the step's loss and gradient norm are finite
  (``FiniteGuard``), without a host synchronisation.
- ``log``: the one device read per ``log_every`` steps; writes the rows and stops a run
  whose loss or gradient norm stopped being finite.
- ``save``: writes pending metric rows first (so a kill -9 after a checkpoint loses none),
  refuses to save non-finite weights (the guard, then the weights themselves), then writes
  the checkpoint and the export, and only then advances ``checkpoints/latest``
  (``checkpoint.py``: checksums, verification on resume, repair of the export).

Per step, on the host and without touching the device: the batch's ground-truth-gradient
token count (selection sizes are a function of the flags alone, ``lacy_fast.method``) and
the stop signal are summed over ranks on a gloo group, so the equal-budget stopping rule
and SIGTERM handling cost no device synchronisation.

Non-finite steps stop the run; they are not skipped. fp16 loss scaling skips steps because
an overflow there is expected and fixed by lowering the scale; this trainer runs fp32 or
bf16, where a NaN or inf loss or gradient means the weights or the optimiser state have
already gone bad (or a batch is broken, and the data order, a function of the step, would
serve it again on every rerun). A skip cannot be done on the device without a host
decision per step or a copy of the optimiser state, and DeepSpeed's ZeRO-1/2 already skip
such steps silently, hiding the divergence. So the run stops with one sentence naming the
step and exit code 2; nothing after the last finite state is ever saved, so the last
checkpoint and ``OUT/export`` stay finite, and the fix is one command: rerun with a lower
``train.lr`` (or more ``train.warmup_steps``), which resumes from that checkpoint. A run may
compute up to ``log_every - 1`` steps past the bad one before it notices; those are never
saved.

Rerunning the same command on the same ``out_dir`` resumes from the newest checkpoint that
verifies (``--fresh`` starts over instead):
model, optimizer, scheduler, RNG and data position (a pure function of the step). The
method itself is docs/method.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
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
from lacy_fast.kernels import selection_bound
from lacy_fast.method import RANK_ALL, Targets, ground_truth_count, selected_count, selection_fraction
from lacy_fast.progress import Progress, human
from lacy_fast.train.banner import Startup, banner_lines, strategy_note
from lacy_fast.train.metrics import MetricsWriter, mfu, peak_memory_bytes, peak_tflops
from lacy_fast.train.memory import check_fits
from lacy_fast.train.probes import Probe, SelectionTracker

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


def _select_accelerator() -> None:
    """DeepSpeed picks its accelerator once, at its first ``get_accelerator()`` (which
    importing it runs): ``DS_ACCELERATOR`` if set, else CUDA when there is a device, else
    the CPU with a warning that a GPU may have gone undetected. Without CUDA the CPU is
    chosen explicitly here, when a run starts (never at import), and the environment is
    given back as it was: DeepSpeed keeps its choice for the process."""
    if "DS_ACCELERATOR" in os.environ or torch.cuda.is_available():
        return
    os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        from deepspeed.accelerator import get_accelerator

        get_accelerator()
    finally:
        os.environ.pop("DS_ACCELERATOR", None)


def _skip_cpu_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op when it first
    initialises (about 45 s on a fresh machine). Gloo does that job for the CPU runs this
    project has (tests, the demo), so the op is marked unavailable unless LACY_FAST_DS_SHM=1.

    This writes DeepSpeed's own table of compatible ops because no public switch exists:
    in DeepSpeed 0.19.8 ``comm.torch.build_shm_op`` consults only
    ``deepspeed.ops.__compatible_ops__``; ``DS_BUILD_SHM_COMM`` governs ahead-of-time
    builds at install time, not this JIT build, and ``init_distributed`` takes no option.
    """
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


def _reduce_host(values: list[int], d: Dist, op: str = "sum") -> list[int]:
    """Sum (or min, max) small host integers over ranks (gloo, no device sync)."""
    if d.control is None:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op],
                    group=d.control)
    return t.tolist()


# ----------------------------------------------------------------------------------------
# Pieces of a run
# ----------------------------------------------------------------------------------------


def _precision(cfg: RunConfig, device: torch.device) -> str:
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


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear weights, embeddings), not on biases and LayerNorms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _data_source(cfg: RunConfig, d: Dist):
    t = cfg.train
    common = dict(seq_len=t.seq_len, micro_batch=t.micro_batch_size, grad_accum=t.grad_accum, world=d.world,
                  rank=d.rank, seed=cfg.data.seed, pin=d.device.type == "cuda",
                  ignore_index=cfg.objective.ignore_index)
    if cfg.data.source == "online":
        from lacy_fast.data.prefetch import OnlineBatches

        return OnlineBatches(cfg.data, **common)
    if not cfg.data.path:
        raise UserError("data.path is unset; pass data.path=DIR with DIR a `lacy-fast prepare` output")
    from lacy_fast.data.loader import ShardBatches

    return ShardBatches(cfg.data.path, **common)


@dataclass
class StepStats:
    """Device-side sums of one optimizer step (read at log time)."""

    sums: torch.Tensor  # (6,) loss, loss_gt*n, n_gt, loss_call*n, n_call, n_valid
    n_facts: int = 0
    gt_tokens: int = 0
    lr: float = 0.0
    grad_norm: float | torch.Tensor | None = None  # DeepSpeed's (host or device), or ours (device)


def _micro_sums(loss: torch.Tensor, stats: dict[str, torch.Tensor], targets: torch.Tensor, strategy: str,
                rule: Targets, renormalize: bool = True) -> torch.Tensor:
    """(6,) device sums of a micro-batch: loss, gt loss sum, n_gt, CALL loss sum, n_call, n_valid.
    The gt loss is the one the objective trained on: the renormalised nll, or plain
    cross-entropy for strategy none and for objective.renormalize=false."""
    with torch.no_grad():
        valid = rule.valid(targets.flatten())  # (N,) the op's valid targets
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


class FiniteGuard:
    """The first step whose loss or gradient norm was NaN or infinite, kept on the device.

    ``record`` is a few device ops per step and never synchronises; ``first_bad`` reads it
    (one synchronisation, done where the loop synchronises anyway: at log and save time)
    and agrees on it across ranks.
    """

    def __init__(self, device: torch.device):
        self._first = torch.zeros((), dtype=torch.int64, device=device)  # 0: every step finite so far

    def record(self, step: int, loss: torch.Tensor, grad_norm: float | torch.Tensor | None) -> None:
        finite = torch.isfinite(loss.detach())
        if isinstance(grad_norm, torch.Tensor):
            finite = finite & torch.isfinite(grad_norm.detach().to(finite.device))
        elif grad_norm is not None and not math.isfinite(grad_norm):
            finite = torch.zeros_like(finite)
        self._first = torch.where((self._first == 0) & ~finite, step, self._first)

    def first_bad(self, d: Dist) -> int | None:
        first = int(self._first)
        first = _reduce_host([first if first else 1 << 62], d, "min")[0]
        return None if first == 1 << 62 else first


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


def _quiet_deepspeed() -> None:
    import logging

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    if _lr_warning_filter not in ds_logger.filters:
        ds_logger.addFilter(_lr_warning_filter)


def _lr_warning_filter(record) -> bool:
    # WarmupCosineLR asks itself for a learning rate while it is being built; not a problem.
    return "before it has started" not in record.getMessage()


# ----------------------------------------------------------------------------------------
# The Trainer
# ----------------------------------------------------------------------------------------


def train(cfg: RunConfig, *, progress: bool = True, fresh: bool = False, banner: bool | None = None) -> dict[str, Any]:
    """Train (or resume) ``cfg``; returns a summary (final step, tokens, last metrics).
    ``fresh``: delete an earlier run's checkpoints, export and metrics in out_dir first;
    ``banner``: print what the run is about to do (default: when ``progress``)."""
    _select_accelerator()
    _quiet_deepspeed()
    d = setup_distributed()
    try:
        trainer = Trainer(cfg, d, progress=progress, fresh=fresh)
        trainer.show_banner = progress if banner is None else banner
        try:
            return trainer.run()
        finally:
            trainer.close()
    finally:
        d.teardown()


class Trainer:
    """One training run on this rank (see the module doc): build, then ``run``."""

    def __init__(self, cfg: RunConfig, d: Dist, *, progress: bool = True, fresh: bool = False):
        self.cfg, self.d, self.progress, self.fresh = cfg, d, progress, fresh
        self.show_banner = progress
        self.out = Path(cfg.out_dir)
        self.lock = None
        self.batches = None
        self.writer = None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- build ----------------------------------------------------------------------------

    def _build(self) -> None:
        import deepspeed

        from lacy_fast.model import GPT
        from lacy_fast.train.checkpoint import Checkpointer
        from lacy_fast.train.ds_config import deepspeed_config
        from lacy_fast.train.identity import check_resume, data_fingerprint, export_fingerprint, run_identity
        from lacy_fast.train.objective import LacyLM

        cfg, d = self.cfg, self.d
        t = cfg.train
        self.precision = _precision(cfg, d.device)
        startup = Startup(d.is_main and self.progress)

        # Data, tokenizer, and the objective as this data resolves it.
        check_judge_labels(cfg)
        startup.stage(f"opening the data ({cfg.data.path if cfg.data.source == 'shards' else 'online labeling'})")
        self.source = _data_source(cfg, d)
        self.tokenizer = tok = self.source.tokenizer
        self.rule: Targets = self.source.targets
        if cfg.model.vocab_size is not None and cfg.model.vocab_size != tok.vocab_size:
            raise UserError(f"model.vocab_size={cfg.model.vocab_size} but the data's tokenizer has "
                            f"{tok.vocab_size} tokens; leave model.vocab_size unset")
        self.model_cfg = from_dict(type(cfg.model), {**to_dict(cfg.model), "vocab_size": tok.vocab_size})
        rate, _ = resolve_call_rate(cfg)
        self.call_rate = rate if cfg.objective.strategy in RANK_ALL else None  # None: unused by this strategy
        self.objective = o = dataclasses.replace(cfg.objective, call_rate=self.call_rate
                                                 if self.call_rate is not None else cfg.objective.call_rate)
        self.fraction = selection_fraction(o.strategy, o.call_fraction, o.call_rate)
        self.ref, ref_meta = self._reference_model()
        self.tracker = SelectionTracker.maybe(o.strategy, self.source, self.rule) if t.track_selection else None
        self.probe = Probe(t.probe, t.seq_len, tok.sha256, self.rule) if t.probe else None
        self.probe_rows: dict[int, dict[str, float]] = {}

        self.identity = run_identity(
            cfg, model=self.model_cfg, precision=self.precision, call_rate=self.call_rate,
            tokenizer_sha256=tok.sha256, call_id=tok.call_id, world_size=d.world,
            data=data_fingerprint(cfg.data.path) if cfg.data.source == "shards" else None,
            ref=export_fingerprint(ref_meta) if ref_meta is not None else None)

        # Nothing reads or writes out_dir before the lock is held.
        self._lock_out_dir()
        self.ckpt = Checkpointer(self.out, t.keep_last, d.rank)
        self.resume_tag = self.ckpt.resume_tag(self.d.control)  # verified, or an older one that verifies
        if self.resume_tag is not None:
            check_resume(self.ckpt.meta(self.resume_tag).get("identity"), self.identity,
                         self.ckpt.dir / self.resume_tag, self.out,
                         paths={"data.path": cfg.data.path, "objective.ref_checkpoint": cfg.objective.ref_checkpoint})

        startup.stage(f"building the model ({self.model_cfg.shape} shape)")
        torch.manual_seed(t.seed)
        check_fits(self.model_cfg, cfg.zero_stage, d.world, d.device)
        self.model = GPT(self.model_cfg)
        self.init_note = None
        if self.resume_tag is None and t.init_from:
            from lacy_fast.train.init_from import load_initial_weights

            startup.stage(f"loading the initial weights from {t.init_from}")
            self.init_note = load_initial_weights(self.model, t.init_from, tok.sha256)
        self.module = LacyLM(self.model, o, tok.call_id)
        if cfg.zero_stage == 3:  # the loss reads the tied head outside the embedding's forward
            deepspeed.zero.register_external_parameter(self.module, self.model.wte.weight)

        if t.max_gt_tokens > 0 and t.lr_decay_steps == 0:
            t = dataclasses.replace(t, lr_decay_steps=self._budget_steps())
        self.t = t
        self.run_cfg = dataclasses.replace(cfg, train=t)
        ds_cfg = deepspeed_config(self.run_cfg, world_size=d.world, precision=self.precision)
        startup.stage("starting DeepSpeed")
        self.engine, _, _, _ = deepspeed.initialize(model=self.module, config=ds_cfg,
                                                    model_parameters=_param_groups(self.module, t.weight_decay))
        if t.compile:
            self.engine.compile()

        self.step_no, self.gt_tokens, self.data_state = 0, 0, None
        self.last_saved: int | None = None
        if self.resume_tag is not None:
            startup.stage(f"loading checkpoint {self.resume_tag}")
            self._resume()
        if d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "config.json", {**to_dict(self.run_cfg), "resolved": {
                "precision": self.precision, "world_size": d.world, "model": to_dict(self.model_cfg),
                "call_rate": self.call_rate}})
        self.writer = MetricsWriter(self.out, d.is_main, self.step_no, tensorboard=t.tensorboard,
                                    wandb=(t.wandb_project, to_dict(self.run_cfg)) if t.wandb else None)
        self.guard = FiniteGuard(d.device)
        self.own_norm = cfg.zero_stage == 0 and self.precision == "fp32"
        self.grads_of = [p for p in self.module.parameters() if p.requires_grad]
        self.flops_per_token = self.model.estimate_flops_per_token(t.seq_len)
        self.peak = peak_tflops(d.device, self.precision, t.peak_tflops)
        self.tokens_per_step = t.seq_len * t.micro_batch_size * t.grad_accum * d.world
        self.pending: list[StepStats] = []
        self.last_row: dict[str, Any] = {}
        self.interval_start, self.interval_wait = time.perf_counter(), 0.0
        self.profiler = _profiler(t, self.out, d) if t.profile_steps > 0 else None

    def banner(self) -> list[str]:
        """What the run is about to do (``banner.py``), printed by rank 0 before the first step."""
        stats = None
        if self.cfg.data.source == "shards" and self.cfg.data.path:
            try:
                stats = json.loads((Path(self.cfg.data.path) / "stats.json").read_text())
            except (OSError, ValueError):
                stats = None
        t = self.t
        steps = min(t.max_steps, t.lr_decay_steps) if t.max_gt_tokens > 0 else t.max_steps
        start = (f"resuming from step {self.step_no}" if self.resume_tag is not None else
                 self.init_note or "a new run from random weights")
        return banner_lines(
            cfg=self.run_cfg, out=self.out, shape=self.model_cfg.shape, model_cfg=self.model_cfg,
            params=self.model.num_params(), strategy_note=strategy_note(self.objective, self.call_rate),
            world=self.d.world, device=str(self.d.device), precision=self.precision, steps=steps,
            data_stats=stats, start_note=start, logging_note=self.writer.describe())

    def _reference_model(self):
        """The frozen reference export of strategy rho (and its metadata), else (None, None)."""
        from lacy_fast.model.io import load_export

        o = self.cfg.objective
        if o.strategy != "rho":
            return None, None
        ref, meta = load_export(o.ref_checkpoint, device=self.d.device,
                                dtype=torch.bfloat16 if self.precision == "bf16" else torch.float32)
        if meta.get("tokenizer_sha256") != self.tokenizer.sha256:
            raise UserError(f"objective.ref_checkpoint {o.ref_checkpoint} was trained with another tokenizer; "
                            "rho needs a reference model on the same tokenizer as data.path")
        ref.requires_grad_(False)
        self._reference_sidecars(ref, meta)
        return ref, meta

    def _reference_sidecars(self, ref, meta) -> None:
        """Write the reference's nll of every shard token once (objective.write_reference_sidecars)
        and have the loader attach it to batches, so no batch runs the reference."""
        from lacy_fast.train.identity import data_fingerprint, export_fingerprint
        from lacy_fast.train.objective import reference_sidecar_name, write_reference_sidecars

        shards = getattr(self.source, "shards", None)
        if shards is None:  # online data: the loop runs the reference per batch
            return
        o, d = self.cfg.objective, self.d
        name = reference_sidecar_name(export_fingerprint(meta), data_fingerprint(shards.dir))
        missing = sum(not s.sidecar_path(name).exists() for s in shards.shards)
        if missing and d.is_main and self.progress:
            print(f"rho: scoring {missing} shard(s) with the reference once (sidecar {name})", file=sys.stderr)
        write_reference_sidecars(ref, shards, name, self.tokenizer.call_id, self.tokenizer.eos_id, o.ignore_index,
                                 o.impl, d.device, d.rank, d.world)
        _reduce_host([0], d)  # every rank's shards are written before any rank reads them
        self.source.ref_sidecar = name

    def _lock_out_dir(self) -> None:
        """Rank 0 locks out_dir for the run; every rank learns whether it could."""
        from lacy_fast.lock import DirLock

        error = None
        if self.d.is_main:
            lock = DirLock(self.out, "training run")
            try:
                lock.acquire()
                self.lock = lock
                if self.fresh:
                    from lacy_fast.train.checkpoint import start_over

                    deleted = start_over(self.out)
                    print(f"--fresh: deleted the earlier run's {', '.join(deleted)} in {self.out}" if deleted else
                          f"--fresh: {self.out} holds no earlier run", file=sys.stderr)
            except UserError as err:
                error = err
        if _reduce_host([int(error is not None)], self.d)[0]:
            raise error or UserError(f"{self.out} is in use by another training run (rank 0 names it); wait for it "
                                     "to finish or stop it, or use another out_dir")

    def _budget_steps(self, probe: int = 16) -> int:
        """Steps the token budget will take, estimated from the first ``probe`` steps' batches
        (host-side counts, no model run): the cosine schedule's length under an equal-budget run."""
        t, o = self.cfg.train, self.objective
        if not hasattr(self.source, "batch"):
            raise UserError("with data.source=online the token budget cannot be turned into a schedule length up "
                            "front; set train.lr_decay_steps as well as train.max_gt_tokens")
        totals = [0, 0]  # ground-truth targets per probe window: relabeling, and in the warm-up
        for step in range(probe):
            for micro in range(t.grad_accum):
                b = self.source.batch(step, micro)
                totals[0] += self.gt_count(self.fraction, b)
                totals[1] += self.gt_count(0.0, b)
        per_step, warm_per_step = (max(1, x // probe) for x in _reduce_host(totals, self.d))
        warm = o.warmup_share * t.max_gt_tokens
        return min(t.max_steps, math.ceil(warm / warm_per_step + (t.max_gt_tokens - warm) / per_step))

    def _resume(self) -> None:
        state, self.data_state = self.ckpt.load(self.engine, self.resume_tag)
        self.step_no, self.gt_tokens = state["step"], state["gt_tokens"]
        self.last_saved = self.step_no
        # The optimiser state brought back the old learning rate; the schedule, rebuilt from
        # this run's config, sets it again from the first resumed step on (train.lr may change).
        sched = self.engine.lr_scheduler
        sched.step(sched.last_batch_iteration)
        if self.d.is_main:
            print(f"resuming {self.out} from step {self.step_no}", file=sys.stderr)
        self._repair_export()

    def _repair_export(self) -> None:
        """Make OUT/export the export of the checkpoint just resumed (a kill or a full disk
        while a save wrote it leaves none, an older one or a damaged one), saying so."""
        from lacy_fast.train.checkpoint import clean_export_leftovers, export_problem

        problem = None
        if self.d.is_main:
            clean_export_leftovers(self.out)
            problem = export_problem(self.out / "export", self.step_no)
        if not _reduce_host([int(problem is not None)], self.d)[0]:
            return
        state = self._gather_weights()
        if self.d.is_main:
            self._write_export(state)
            print(f"{self.out / 'export'} {problem}; rewrote it from checkpoint step {self.step_no}", file=sys.stderr)

    # -- the loop -------------------------------------------------------------------------

    def step_fraction(self) -> float:
        """The share of candidates relabeled this step: 0 until objective.warmup_share of the
        ground-truth budget is spent, the objective's share after."""
        o, t = self.objective, self.t
        return 0.0 if self.gt_tokens < o.warmup_share * t.max_gt_tokens else self.fraction

    def gt_count(self, fraction: float, batch) -> int:
        """Ground-truth-gradient targets of a micro-batch at ``fraction`` (a soft relabel keeps
        a ground-truth gradient on every target: all of them count)."""
        o = self.objective
        if o.call_weight != 1.0 or o.call_weight_by_error:
            return batch.n_valid
        return ground_truth_count(o.strategy, fraction, batch.n_valid, batch.n_facts, batch.n_judge)

    def budget_left(self) -> bool:
        t = self.t
        return self.step_no < t.max_steps and (t.max_gt_tokens == 0 or self.gt_tokens < t.max_gt_tokens)

    def run(self) -> dict[str, Any]:
        d, t = self.d, self.t
        resumed = self.resume_tag is not None
        if not self.budget_left():
            if d.is_main:
                print(f"{self.out} is already trained to step {self.step_no} ({human(self.gt_tokens)} ground-truth "
                      "tokens); raise train.max_steps (or train.max_gt_tokens) to continue", file=sys.stderr)
            return {"step": self.step_no, "gt_tokens": self.gt_tokens, "resumed": resumed}

        from lacy_fast.data.loader import Background

        if d.is_main and self.show_banner:
            print("\n".join(self.banner()), flush=True)
        self.batches = Background(self.source.batches(self.step_no, self.data_state), self.cfg.data.queue_depth)
        signals = _Signals()
        # Under a token budget the run ends near the schedule's estimated length, not max_steps.
        expected = min(t.max_steps, t.lr_decay_steps) if t.max_gt_tokens > 0 else t.max_steps
        self.bar = Progress("train", total=expected, unit="steps", initial=self.step_no,
                            enabled=d.is_main and self.progress)
        stopped_by = None
        try:
            while self.budget_left():
                stop = self.step(signals)
                done = not self.budget_left()
                if self.step_no % t.log_every == 0 or done or stop:
                    self.log()
                if stop:
                    stopped_by = signals.received or "a signal on another rank"
                    break
                if t.ckpt_every and self.step_no % t.ckpt_every == 0 and not done:
                    self.save()
            self.save()
        finally:
            signals.restore()
            self.bar.close()
        if stopped_by and d.is_main:
            print(f"stopped by {stopped_by} at step {self.step_no}; checkpoint saved in {self.out}/checkpoints; "
                  "rerun the same command to resume", file=sys.stderr)
        return {"step": self.step_no, "gt_tokens": self.gt_tokens, "stopped_by": stopped_by, "last": self.last_row,
                "resumed": resumed}

    def step(self, signals: _Signals | None = None) -> bool:
        """One optimizer step (``grad_accum`` micro-steps); returns whether a rank was asked to stop."""
        d, t, o, engine = self.d, self.t, self.objective, self.engine
        if self.profiler is not None and self.step_no == t.profile_start:
            self.profiler.start()
        waited0 = self.batches.waited
        sums, host_gt, n_facts, norm = None, 0, 0, None
        fraction = self.step_fraction()
        for micro in range(t.grad_accum):
            host = self.batches.next()
            self.data_state = host.position
            batch = host.to(d.device)
            ref_nll = batch.ref_nll
            if self.ref is not None and ref_nll is None:
                from lacy_fast.train.objective import reference_nll

                ref_nll = reference_nll(self.ref, batch.idx, batch.targets, batch.flags, self.tokenizer.call_id,
                                        o.ignore_index, o.impl)
            # The op corrects at most this many selected rows (a bucketed bound of the count
            # the host knows before the copy: no device sync, few distinct values to compile).
            count = selected_count(o.strategy, fraction, batch.n_valid, batch.n_facts, batch.n_judge)
            loss, stats = engine(batch.idx, batch.targets, batch.flags, ref_nll,
                                 selection_bound(count, batch.targets.numel()), fraction)
            if self.tracker is not None and host.target_ids is not None:
                self.tracker.add(host.target_ids, host.targets, host.flags, stats["is_call"])
            engine.backward(loss)
            if micro == t.grad_accum - 1 and self.own_norm:
                # ZeRO-0 in fp32 clips without recording the norm: take it from the
                # (already all-reduced) gradients, on the device.
                norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.grads_of]))
            engine.step()
            micro_sums = _micro_sums(loss, stats, batch.targets, o.strategy, self.rule, o.renormalize)
            sums = micro_sums if sums is None else sums + micro_sums
            host_gt += self.gt_count(fraction, batch)
            n_facts += batch.n_facts
        self.step_no += 1
        stop_here = int(signals is not None and signals.received is not None)
        step_gt, step_facts, stop = _reduce_host([host_gt, n_facts, stop_here], d)
        self.gt_tokens += step_gt
        self.interval_wait += self.batches.waited - waited0
        if not self.own_norm:
            norm = engine.get_global_grad_norm()  # a float or a tensor: never read here
            norm = norm.detach() if isinstance(norm, torch.Tensor) else norm
        self.guard.record(self.step_no, sums[0], norm)
        self.pending.append(StepStats(sums, step_facts, self.gt_tokens, float(engine.get_lr()[0]), norm))
        if self.probe is not None and (self.step_no % t.probe_every == 0 or not self.budget_left()):
            self.probe_rows[self.step_no] = self.probe.measure(self.model, self.tokenizer.call_id, d.device)
        if self.profiler is not None:
            self.profiler.step()
            if self.step_no == t.profile_start + t.profile_steps:
                self.profiler.stop()
                self.profiler = None
        return bool(stop)

    def log(self) -> None:
        """Write the pending steps' rows (one device read) and stop if a step was not finite."""
        if not self.pending:
            return
        t = self.t
        elapsed = time.perf_counter() - self.interval_start
        rows = _rows(self.pending, self.step_no, t.grad_accum, self.tokens_per_step, elapsed, self.interval_wait,
                     self.flops_per_token, self.peak, self.d, self.precision)
        bad = self.guard.first_bad(self.d)
        if bad is not None:
            rows = [r for r in rows if r["step"] <= bad]  # the bad step is shown, what followed it is not
        for row in rows:
            row.update(self.probe_rows.pop(row["step"], {}))
        if self.tracker is not None:
            rows[-1].update(self.tracker.read())  # the interval's shares, on its last row
        self.writer.write(rows if self.d.is_main else [])
        self.bar.update(len(self.pending))
        self.pending, self.interval_start, self.interval_wait = [], time.perf_counter(), 0.0
        if bad is not None:
            raise self._diverged(bad)
        self.last_row = rows[-1]
        self.bar.set_note(f"loss {self.last_row['loss']:.3f} | call {self.last_row['call_rate']:.1%} | "
                          f"{human(self.last_row['tokens_per_s'])} tok/s" +
                          (f" | mfu {self.last_row['mfu']:.1%}" if self.last_row.get("mfu") is not None else ""))

    def save(self) -> None:
        """Checkpoint and export the current step, never a non-finite one."""
        from lacy_fast.model.io import first_non_finite

        self.log()  # rows first: a kill after the checkpoint loses none of them
        bad = self.guard.first_bad(self.d)
        if bad is not None:
            raise self._diverged(bad)
        state = self._gather_weights()
        broken = first_non_finite(state) if self.d.is_main else None
        if _reduce_host([int(broken is not None)], self.d)[0]:
            raise self._diverged(self.step_no, what=f"the weights ({broken or 'on rank 0'})")
        # The export is written once the checkpoint is complete and before `latest` names it:
        # it is never older than `latest` (a resume repairs one a kill left behind).
        self.ckpt.save(self.engine, self.step_no, {"identity": self.identity, "gt_tokens": self.gt_tokens,
                                                   "world_size": self.d.world}, self.data_state,
                       before_latest=lambda: self._write_export(state))
        import torch.distributed as dist

        dist.barrier()
        self.last_saved = self.step_no
        self.interval_start = time.perf_counter()  # throughput counts training, not saving

    def _write_export(self, state: dict[str, torch.Tensor]) -> None:
        """OUT/export of the current step from the gathered weights (rank 0)."""
        from lacy_fast.model.io import save_export

        save_export(self.out / "export", self.model, tokenizer_path=self.tokenizer.path,
                    tokenizer_sha256=self.tokenizer.sha256, call_id=self.tokenizer.call_id,
                    train_config=to_dict(self.run_cfg),
                    extra={"step": self.step_no, "gt_tokens": self.gt_tokens, "strategy": self.objective.strategy},
                    state_dict=state)

    def _gather_weights(self) -> dict[str, torch.Tensor] | None:
        """The model's full state dict on rank 0 (gathered from ZeRO-3 shards), None elsewhere."""
        import deepspeed

        if self.cfg.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                return {k: v.detach().clone().cpu() for k, v in self.model.state_dict().items()} \
                    if self.d.is_main else None
        return self.model.state_dict() if self.d.is_main else None

    def _diverged(self, step: int, what: str = "the loss or the gradient norm") -> UserError:
        if self.last_saved is None:
            kept = ("no checkpoint was saved before it, so start again with a lower train.lr (or more "
                    "train.warmup_steps)")
        else:
            kept = (f"{self.out}/checkpoints/step_{self.last_saved:08d} and {self.out}/export hold the last finite "
                    f"state (step {self.last_saved}), and rerunning with a lower train.lr (or more "
                    "train.warmup_steps) resumes from it")
        return UserError(f"training diverged: {what} is not finite at step {step}, and nothing from that step on was "
                         f"saved; {kept}")

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()
        if self.writer is not None:
            self.writer.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None


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
    on_device = [i for i, x in enumerate(norms) if isinstance(x, torch.Tensor)]
    if on_device:
        for i, value in zip(on_device, torch.stack([norms[i].float() for i in on_device]).tolist()):
            norms[i] = value
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
    parser.add_argument("--config", default="tiny", help="a run file: a built-in one (tiny, gpt2-124m, lacy-334m, "
                        "lacy-1.3b) or a TOML file; model sizes are model.shape=NAME, not run files")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4")
    parser.add_argument("--explain", action="store_true", help="list every config key with its default and meaning "
                        "(with a config and data.path: also what objective.call_rate resolves to)")
    parser.add_argument("--quiet", action="store_true", help="no progress or start-up lines (the banner stays)")
    parser.add_argument("--fresh", action="store_true", help="start over: delete the checkpoints, export and metrics "
                        "an earlier run left in out_dir (without it, a rerun resumes)")


def run(args: argparse.Namespace) -> int:
    if args.explain:
        _explain(args)
        return 0
    from lacy_fast.fileio import disk_full_is_user_error

    cfg = load_config(RunConfig, args.config, args.overrides)
    with disk_full_is_user_error(cfg.out_dir):
        train(cfg, progress=not args.quiet, fresh=args.fresh, banner=True)
    return 0


def _explain(args: argparse.Namespace) -> None:
    from lacy_fast.train.identity import MAY_CHANGE

    print("Every key, its default and meaning (the method: docs/method.md):")
    for key, default, text in explain(RunConfig):
        print(f"{key:<28} {default:<14} {text}")
    print("\nA resumed run must keep every setting above except these, which may change:")
    for key, why in MAY_CHANGE.items():
        print(f"{key:<28} {why}")
    cfg = load_config(RunConfig, args.config, args.overrides)
    if cfg.data.path or cfg.data.source == "online":
        try:
            rate, how = resolve_call_rate(cfg)
        except UserError as err:
            rate, how = None, str(err)
        print(f"\nobjective.call_rate for this config: {'unresolved' if rate is None else f'{rate:.4f}'} ({how})")
