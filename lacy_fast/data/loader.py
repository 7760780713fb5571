"""Training batches: packed samples from prepared shards, disjoint per rank, in an order that
is a pure function of (seed, step, rank), fed by a background thread.

Global sample numbering: micro-step ``m`` of optimizer step ``s`` on rank ``r`` of ``W``
takes the ``B`` consecutive global samples starting at ``((s * A + m) * W + r) * B`` (``A``
micro-steps per step). Global sample ``g`` is sample ``perm_e[g mod S]`` of epoch
``e = g div S``, where epoch ``e`` packs the documents in its own seeded order
(``PackedSamples``) and ``perm_e`` shuffles its ``S`` samples (Megatron-LM's document and
sample shuffles). So ranks never share a sample, and a run resumed at step ``s`` reads
exactly what an uninterrupted run would have read: nothing is replayed or skipped.

A batch holds inputs ``idx = tokens[:, :-1]``, targets ``tokens[:, 1:]`` and the flags of
the targets (bit 0: the target is a fact token), and counts of its valid, fact and judge
targets by the rule the op applies (``lacy_fast.method.Targets``), made here, off the
training thread.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Protocol

import numpy as np
import torch

from lacy_fast.data.packing import PackedSamples
from lacy_fast.data.shards import ShardSet
from lacy_fast.errors import UserError
from lacy_fast.method import Targets

if TYPE_CHECKING:
    from lacy_fast.config import RunConfig
    from lacy_fast.data.tokenizer import Tokenizer


@dataclass
class Batch:
    idx: torch.Tensor  # (B, T) int64 inputs
    targets: torch.Tensor  # (B, T) int64
    flags: torch.Tensor  # (B, T) uint8, flags of the targets
    n_valid: int  # valid targets (lacy_fast.method.valid_targets; packed samples have no padding)
    n_facts: int  # valid targets with FLAG_FACT
    n_judge: int  # valid targets with FLAG_JUDGE
    # Stream position after this batch, for sources whose position is not a function of
    # the step (the online prefetcher); the loop checkpoints it per rank.
    position: dict | None = None
    # (B, T) int64 on the host: each target's index in the prepared corpus (the same token
    # in every epoch), for the selection-persistence metric; None where unknown (online).
    target_ids: np.ndarray | None = None
    # (B, T) float32: the reference model's nll of each target (strategy rho), read from the
    # shards' sidecars (``ShardBatches.ref_sidecar``); None: the loop computes it.
    ref_nll: torch.Tensor | None = None

    def to(self, device: torch.device) -> "Batch":
        move = dict(device=device, non_blocking=True)
        return dataclasses.replace(self, idx=self.idx.to(**move), targets=self.targets.to(**move),
                                   flags=self.flags.to(**move),
                                   ref_nll=None if self.ref_nll is None else self.ref_nll.to(**move))


def make_batch(tokens: np.ndarray, flags: np.ndarray, pin: bool, targets: Targets) -> Batch:
    """tokens, flags: (B, T + 1) -> a Batch of T positions per row, its targets counted by ``targets``."""
    n_valid, n_facts, n_judge = targets.counts(tokens[:, 1:], flags[:, 1:])
    t = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))  # (B, T + 1)
    f = torch.from_numpy(np.ascontiguousarray(flags[:, 1:], dtype=np.uint8))  # (B, T)
    idx, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
    if pin:
        idx, y, f = idx.pin_memory(), y.pin_memory(), f.pin_memory()
    return Batch(idx, y, f, n_valid, n_facts, n_judge)


class BatchSource(Protocol):
    """What the trainer reads from its data: the shard loader (``ShardBatches``) and the
    online prefetcher (``prefetch.OnlineBatches``)."""

    tokenizer: Tokenizer
    targets: Targets  # the valid-target rule of the batches' counts
    shards: ShardSet | None  # the prepared shards behind the batches; None: labeled online
    ref_sidecar: str | None  # a shards' sidecar of reference nll to attach to batches

    def batches(self, start_step: int, state: dict | None = None) -> Iterator[Batch]:
        """Micro-batches from optimizer step ``start_step`` or the checkpointed ``state``."""

    def batch(self, step: int, micro: int) -> Batch | None:
        """Micro-batch ``micro`` of optimizer step ``step``; None where the stream position is
        not a function of the step (online data)."""


class ShardBatches:
    """Micro-batches of one rank from a ``lacy-fast prepare`` directory (see the module doc)."""

    def __init__(self, path: str, seq_len: int, micro_batch: int, grad_accum: int, world: int, rank: int,
                 seed: int, pin: bool = False, ignore_index: int = -100):
        from lacy_fast.data.tokenizer import Tokenizer

        self.shards = ShardSet(path)
        if not self.shards.complete:
            raise UserError(f"{path} is still being prepared (no stats.json yet); let `lacy-fast prepare` finish "
                            "or rerun it to resume")
        self.tokenizer = Tokenizer.load(self.shards.tokenizer_path)
        for shard in self.shards.shards:
            if shard.header.vocab_size != self.tokenizer.vocab_size:
                raise UserError(f"shard {shard.path} says its vocabulary has {shard.header.vocab_size} tokens but "
                                f"{self.shards.tokenizer_path} has {self.tokenizer.vocab_size}; the shard is corrupt, "
                                "delete it and rerun `lacy-fast prepare` to rewrite it")
        self.targets = Targets(self.tokenizer.vocab_size, self.tokenizer.call_id, ignore_index)
        self.seq_len, self.micro_batch, self.grad_accum = seq_len, micro_batch, grad_accum
        self.world, self.rank, self.seed, self.pin = world, rank, seed, pin
        self.ref_sidecar: str | None = None  # a per-token sidecar of reference nll to attach to batches
        self._epoch: int | None = None
        self._samples: PackedSamples | None = None
        self._perm: np.ndarray | None = None
        self._load_epoch(0)
        if len(self._samples) < world * micro_batch:
            raise UserError(f"{path} holds {self.shards.total_tokens} tokens, fewer than one step of "
                            f"{world} rank(s) x {micro_batch} sequences x {seq_len + 1} tokens; prepare more text "
                            "or lower train.seq_len / train.micro_batch_size")

    @property
    def tokenizer_path(self):
        return self.shards.tokenizer_path

    @property
    def samples_per_epoch(self) -> int:
        return len(self._samples)

    def _load_epoch(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        self._samples = PackedSamples(self.shards, self.seq_len, seed=seed)
        self._perm = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self._samples))
        self._epoch = epoch

    def sample(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Global sample ``g``: (T + 1,) tokens and flags."""
        epoch, i = divmod(g, self.samples_per_epoch)
        self._load_epoch(epoch)
        return self._samples[int(self._perm[i])]

    def target_ids(self, g: int) -> np.ndarray:
        """(T,) the corpus index of each target of global sample ``g``."""
        epoch, i = divmod(g, self.samples_per_epoch)
        self._load_epoch(epoch)
        return self._samples.positions(int(self._perm[i]))[1:]

    def batch(self, step: int, micro: int) -> Batch:
        first = ((step * self.grad_accum + micro) * self.world + self.rank) * self.micro_batch
        rows = [self.sample(first + j) for j in range(self.micro_batch)]
        batch = make_batch(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), self.pin, self.targets)
        batch.target_ids = np.stack([self.target_ids(first + j) for j in range(self.micro_batch)])
        if self.ref_sidecar is not None:
            batch.ref_nll = torch.from_numpy(self.shards.gather(self.ref_sidecar, batch.target_ids).astype(np.float32))
        return batch

    def batches(self, start_step: int, state: dict | None = None) -> Iterator[Batch]:
        """Micro-batches from ``start_step`` on (``state`` is unused: the step is the position)."""
        step = start_step
        while True:
            for micro in range(self.grad_accum):
                yield self.batch(step, micro)
            step += 1


def batch_source(cfg: RunConfig, world: int, rank: int, pin: bool) -> BatchSource:
    """This rank's batches of ``cfg``: prepared shards, or text labeled online."""
    t = cfg.train
    common = dict(seq_len=t.seq_len, micro_batch=t.micro_batch_size, grad_accum=t.grad_accum, world=world,
                  rank=rank, seed=cfg.data.seed, pin=pin, ignore_index=cfg.objective.ignore_index)
    if cfg.data.source == "online":
        from lacy_fast.data.prefetch import OnlineBatches

        return OnlineBatches(cfg.data, **common)
    return ShardBatches(cfg.data.path, **common)


class Background:
    """Runs a batch iterator in a thread, ``depth`` batches ahead; ``next()`` records the
    time the caller waited, so the loop can report its data-wait share."""

    _DONE = object()

    def __init__(self, batches: Iterator[Batch], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self.waited = 0.0
        self._thread = threading.Thread(target=self._run, args=(batches,), daemon=True, name="lacy-batches")
        self._thread.start()

    def _run(self, batches: Iterator[Batch]) -> None:
        try:
            for batch in batches:
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as err:  # re-raised in the training thread
            self._error = err
        self._queue.put(self._DONE)

    def next(self) -> Batch:
        t0 = time.perf_counter()
        item = self._queue.get()
        self.waited += time.perf_counter() - t0
        if item is self._DONE:
            if self._error is not None:
                raise self._error
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
