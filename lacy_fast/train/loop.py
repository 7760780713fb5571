"""The training loop of one rank, as a ``Trainer``: ``__init__`` builds it (data, the run
identity and out_dir lock, model, DeepSpeed engine, resume, metrics); ``run`` loops
``step`` until the step or token budget is spent, calling ``log`` every ``log_every`` steps
and ``save`` every ``ckpt_every``.

``step`` never synchronises with the device: the loss and gradient norm are checked on it
(``guards.FiniteGuard``), and the ground-truth token count and the stop signal are host
integers summed over ranks on a gloo group. ``log`` is the one device read per interval;
``save`` writes the pending rows first, refuses non-finite weights, and advances
``checkpoints/latest`` last (``checkpoint.py``). A resumed run must keep the settings of its
identity (``identity.py``); its data position is a function of the step (online data:
checkpointed per rank). Why a non-finite step stops the run: docs/training.md.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lacy_fast.config import RunConfig, from_dict, to_dict
from lacy_fast.errors import UserError
from lacy_fast.fileio import write_json
from lacy_fast.kernels import selection_bound
from lacy_fast.method import Targets, selected_count
from lacy_fast.progress import Progress, human
from lacy_fast.train.banner import Startup, run_banner
from lacy_fast.train.checkpoint import (Checkpointer, clean_export_leftovers, export_problem, gather_weights,
                                        lock_out_dir)
from lacy_fast.train.dist import Dist, reduce_host, setup_distributed
from lacy_fast.train.guards import FiniteGuard, Signals, diverged
from lacy_fast.train.memory import check_fits
from lacy_fast.train.metrics import (MetricsWriter, StepStats, interval_measures, micro_sums, peak_tflops, profiler,
                                     step_rows)
from lacy_fast.train.probes import Probe, SelectionTracker
from lacy_fast.train.settings import Settings, budget_steps, resolve


def train(cfg: RunConfig, *, progress: bool = True, fresh: bool = False, banner: bool | None = None) -> dict[str, Any]:
    """Train (or resume) ``cfg``; returns a summary (final step, tokens, last metrics).
    ``fresh``: delete an earlier run's checkpoints, export and metrics in out_dir first;
    ``banner``: print what the run is about to do (default: when ``progress``)."""
    d = setup_distributed()
    try:
        trainer = Trainer(cfg, d, resolve(cfg, d.device, d.world), progress=progress, fresh=fresh)
        trainer.show_banner = progress if banner is None else banner
        try:
            return trainer.run()
        finally:
            trainer.close()
    finally:
        d.teardown()


class Trainer:
    """One training run on this rank (see the module doc): build, then ``run``. ``settings``
    are the run's derived settings (``settings.resolve``)."""

    def __init__(self, cfg: RunConfig, d: Dist, settings: Settings, *, progress: bool = True, fresh: bool = False):
        self.cfg, self.d, self.settings, self.progress, self.fresh = cfg, d, settings, progress, fresh
        self.precision, self.call_rate, self.objective = settings.precision, settings.call_rate, settings.objective
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
        startup = Startup(self.d.is_main and self.progress)
        self._open_data(startup)
        self._check_identity()
        self._build_engine(startup)
        self.step_no, self.gt_tokens, self.data_state = 0, 0, None
        self.last_saved: int | None = None
        if self.resume_tag is not None:
            startup.stage(f"loading checkpoint {self.resume_tag}")
            self._resume()
        self._start_metrics()

    def _open_data(self, startup: Startup) -> None:
        """The data and its tokenizer, the model's shape on it, the reference model, probes."""
        from lacy_fast.data.loader import batch_source
        from lacy_fast.train.reference import load_reference

        cfg, t = self.cfg, self.cfg.train
        startup.stage(f"opening the data ({cfg.data.path if cfg.data.source == 'shards' else 'online labeling'})")
        self.source = batch_source(cfg, self.d.world, self.d.rank, pin=self.d.device.type == "cuda")
        self.tokenizer = tok = self.source.tokenizer
        self.rule: Targets = self.source.targets
        if cfg.model.vocab_size is not None and cfg.model.vocab_size != tok.vocab_size:
            raise UserError(f"model.vocab_size={cfg.model.vocab_size} but the data's tokenizer has "
                            f"{tok.vocab_size} tokens; leave model.vocab_size unset")
        self.model_cfg = from_dict(type(cfg.model), {**to_dict(cfg.model), "vocab_size": tok.vocab_size})
        self.ref, self.ref_meta = load_reference(cfg, self.source, self.precision, self.d, self.progress)
        self.tracker = SelectionTracker.maybe(self.objective.strategy, self.source, self.rule) \
            if t.track_selection else None
        self.probe = Probe(t.probe, t.seq_len, tok.sha256, self.rule) if t.probe else None
        self.probe_rows: dict[int, dict[str, float]] = {}

    def _check_identity(self) -> None:
        """The run identity; the out_dir lock; the checkpoint to resume, if its identity matches."""
        from lacy_fast.train.identity import check_resume, data_fingerprint, export_fingerprint, run_identity

        cfg, d, tok = self.cfg, self.d, self.tokenizer
        self.identity = run_identity(
            cfg, model=self.model_cfg, precision=self.precision, call_rate=self.call_rate,
            tokenizer_sha256=tok.sha256, call_id=tok.call_id, world_size=d.world,
            data=data_fingerprint(cfg.data.path) if cfg.data.source == "shards" else None,
            ref=export_fingerprint(self.ref_meta) if self.ref_meta is not None else None)
        # Nothing reads or writes out_dir before the lock is held.
        self.lock = lock_out_dir(self.out, self.fresh, d)
        self.ckpt = Checkpointer(self.out, cfg.train.keep_last, d.rank)
        self.resume_tag = self.ckpt.resume_tag(d.control)  # verified, or an older one that verifies
        if self.resume_tag is not None:
            check_resume(self.ckpt.meta(self.resume_tag).get("identity"), self.identity,
                         self.ckpt.dir / self.resume_tag, self.out,
                         paths={"data.path": cfg.data.path, "objective.ref_checkpoint": cfg.objective.ref_checkpoint})

    def _build_engine(self, startup: Startup) -> None:
        """The model (initial weights, if any), the schedule's length, the DeepSpeed engine."""
        import deepspeed

        from lacy_fast.model import GPT
        from lacy_fast.train.ds_config import deepspeed_config, param_groups
        from lacy_fast.train.objective import LacyLM

        cfg, d, t = self.cfg, self.d, self.cfg.train
        startup.stage(f"building the model ({self.model_cfg.shape} shape)")
        torch.manual_seed(t.seed)
        check_fits(self.model_cfg, cfg.zero_stage, d.world, d.device)
        self.model = GPT(self.model_cfg)
        self.init_note = None
        if self.resume_tag is None and t.init_from:
            from lacy_fast.train.init_from import load_initial_weights

            startup.stage(f"loading the initial weights from {t.init_from}")
            self.init_note = load_initial_weights(self.model, t.init_from, self.tokenizer.sha256)
        self.module = LacyLM(self.model, self.objective, self.tokenizer.call_id)
        if cfg.zero_stage == 3:  # the loss reads the tied head outside the embedding's forward
            deepspeed.zero.register_external_parameter(self.module, self.model.wte.weight)
        if t.max_gt_tokens > 0 and t.lr_decay_steps == 0:
            t = dataclasses.replace(t, lr_decay_steps=budget_steps(cfg, self.settings, self.source, d))
        self.t = t
        self.run_cfg = dataclasses.replace(cfg, train=t)
        ds_cfg = deepspeed_config(self.run_cfg, world_size=d.world, precision=self.precision)
        startup.stage("starting DeepSpeed")
        self.engine, _, _, _ = deepspeed.initialize(model=self.module, config=ds_cfg,
                                                    model_parameters=param_groups(self.module, t.weight_decay))
        if t.compile:
            self.engine.compile()

    def _start_metrics(self) -> None:
        """config.json with the resolved settings, the metrics writer, guard and interval state."""
        d, t = self.d, self.t
        if d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "config.json", {**to_dict(self.run_cfg), "resolved": {
                "precision": self.precision, "world_size": d.world, "model": to_dict(self.model_cfg),
                "call_rate": self.call_rate}})
        self.writer = MetricsWriter(self.out, d.is_main, self.step_no, tensorboard=t.tensorboard,
                                    wandb=(t.wandb_project, to_dict(self.run_cfg)) if t.wandb else None)
        self.guard = FiniteGuard(d.device)
        self.own_norm = self.cfg.zero_stage == 0 and self.precision == "fp32"
        self.grads_of = [p for p in self.module.parameters() if p.requires_grad]
        self.flops_per_token = self.model.estimate_flops_per_token(t.seq_len)
        self.peak = peak_tflops(d.device, self.precision, t.peak_tflops)
        self.pending: list[StepStats] = []
        self.last_row: dict[str, Any] = {}
        self.interval_start, self.interval_wait = time.perf_counter(), 0.0
        self.profiler = profiler(t.profile_start, self.out, d) if t.profile_steps > 0 else None

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
        problem = None
        if self.d.is_main:
            clean_export_leftovers(self.out)
            problem = export_problem(self.out / "export", self.step_no)
        if not reduce_host([int(problem is not None)], self.d)[0]:
            return
        state = gather_weights(self.model, self.cfg.zero_stage, self.d.is_main)
        if self.d.is_main:
            self._write_export(state)
            print(f"{self.out / 'export'} {problem}; rewrote it from checkpoint step {self.step_no}", file=sys.stderr)

    # -- the loop -------------------------------------------------------------------------

    def step_fraction(self) -> float:
        """The share of candidates relabeled this step: 0 until objective.warmup_share of the
        ground-truth budget is spent, the objective's share after."""
        o, t = self.objective, self.t
        return 0.0 if self.gt_tokens < o.warmup_share * t.max_gt_tokens else self.settings.fraction

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
            print("\n".join(run_banner(self)), flush=True)
        self.batches = Background(self.source.batches(self.step_no, self.data_state), self.cfg.data.queue_depth)
        signals = Signals()
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

    def step(self, signals: Signals | None = None) -> bool:
        """One optimizer step (``grad_accum`` micro-steps); returns whether a rank was asked to stop."""
        engine = self.engine
        if self.profiler is not None and self.step_no == self.t.profile_start:
            self.profiler.start()
        waited_before = self.batches.waited
        sums, host_gt, n_facts, norm = None, 0, 0, None
        fraction = self.step_fraction()
        for micro in range(self.t.grad_accum):
            host = self.batches.next()
            self.data_state = host.position
            batch = host.to(self.d.device)
            loss, stats = engine(batch.idx, batch.targets, batch.flags, self._ref_nll(batch),
                                 self._selection_bound(fraction, batch), fraction)
            if self.tracker is not None and host.target_ids is not None:
                self.tracker.add(host.target_ids, host.targets, host.flags, stats["is_call"])
            engine.backward(loss)
            if micro == self.t.grad_accum - 1 and self.own_norm:
                # ZeRO-0 in fp32 clips without recording the norm: take it from the
                # (already all-reduced) gradients, on the device.
                norm = torch.linalg.vector_norm(torch.stack([param.grad.norm() for param in self.grads_of]))
            engine.step()
            batch_sums = micro_sums(loss, stats, batch.targets, self.objective.strategy, self.rule,
                                    self.objective.renormalize)
            sums = batch_sums if sums is None else sums + batch_sums
            host_gt += self.settings.gt_count(fraction, batch)
            n_facts += batch.n_facts
        self.step_no += 1
        stop_here = int(signals is not None and signals.received is not None)
        step_gt, step_facts, stop = reduce_host([host_gt, n_facts, stop_here], self.d)
        self.gt_tokens += step_gt
        self.interval_wait += self.batches.waited - waited_before
        if not self.own_norm:
            norm = engine.get_global_grad_norm()  # a float or a tensor: never read here
            norm = norm.detach() if isinstance(norm, torch.Tensor) else norm
        self.guard.record(self.step_no, sums[0], norm)
        self.pending.append(StepStats(sums, step_facts, self.gt_tokens, float(engine.get_lr()[0]), norm))
        if self.probe is not None and (self.step_no % self.t.probe_every == 0 or not self.budget_left()):
            self.probe_rows[self.step_no] = self.probe.measure(self.model, self.tokenizer.call_id, self.d.device)
        self._profile_step()
        return bool(stop)

    def _ref_nll(self, batch) -> torch.Tensor | None:
        """The reference's nll of the batch's targets (strategy rho): from the shards'
        sidecars, else computed here (online data); None for the other strategies."""
        if self.ref is None or batch.ref_nll is not None:
            return batch.ref_nll
        from lacy_fast.train.reference import reference_nll

        return reference_nll(self.ref, batch.idx, batch.targets, batch.flags, self.tokenizer.call_id,
                             self.objective.ignore_index, self.objective.impl)

    def _selection_bound(self, fraction: float, batch) -> int:
        """The op corrects at most this many selected rows (a bucketed bound of the count the
        host knows before the copy: no device sync, few distinct values to compile)."""
        count = selected_count(self.objective.strategy, fraction, batch.n_valid, batch.n_facts, batch.n_judge)
        return selection_bound(count, batch.targets.numel())

    def _profile_step(self) -> None:
        if self.profiler is None:
            return
        self.profiler.step()
        if self.step_no == self.t.profile_start + self.t.profile_steps:
            self.profiler.stop()
            self.profiler = None

    def log(self) -> None:
        """Write the pending steps' rows (one device read) and stop if a step was not finite."""
        if not self.pending:
            return
        elapsed = time.perf_counter() - self.interval_start
        rows = step_rows(self.pending, self.step_no, self.t.grad_accum, self.d, self.precision)
        bad = self.guard.first_bad(self.d)
        if bad is not None:
            rows = [r for r in rows if r["step"] <= bad]  # the bad step is shown, what followed it is not
        for row in rows:
            row.update(self.probe_rows.pop(row["step"], {}))
        # The interval's measures and selection shares, on its last row.
        rows[-1].update(interval_measures(self.settings.tokens_per_step * len(self.pending), elapsed,
                                          self.interval_wait, self.flops_per_token, self.peak, self.d))
        if self.tracker is not None:
            rows[-1].update(self.tracker.read())
        self.writer.write(rows if self.d.is_main else [])
        self.bar.update(len(self.pending))
        self.pending, self.interval_start, self.interval_wait = [], time.perf_counter(), 0.0
        if bad is not None:
            raise diverged(bad, self.last_saved, self.out)
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
            raise diverged(bad, self.last_saved, self.out)
        state = gather_weights(self.model, self.cfg.zero_stage, self.d.is_main)
        broken = first_non_finite(state) if self.d.is_main else None
        if reduce_host([int(broken is not None)], self.d)[0]:
            raise diverged(self.step_no, self.last_saved, self.out, what=f"the weights ({broken or 'on rank 0'})")
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

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()
        if self.writer is not None:
            self.writer.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

