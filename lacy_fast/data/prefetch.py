"""Online data: raw text -> tokens + fact labels -> packed batches, labeled by worker processes.

    lacy-fast train --config tiny data.source=online data.inputs=[corpus.jsonl] \
        data.tokenizer=tok.model data.workers=4 data.path=cache/    # data.path: optional cache

Each rank reads the documents ``i`` with ``i mod world == rank`` and cuts them into chunks
of ``label.batch_size`` documents, which ``data.workers`` processes (a ``workers.ShardPool``)
label with the same ``FactLabeler`` as ``lacy-fast prepare``, so online labels equal offline
shards for the same text. The rank takes the chunks back in chunk order, whatever the
workers' speeds, with at most ``data.workers x data.queue_depth`` of them in flight.
Documents are packed as in ``PackedSamples``: a stream of ``seq_len + 1``-token samples
overlapping by one token.

Position and resume: after each batch, the stream position is (epoch, next chunk, the
tokens and flags packed but not yet batched). The loop checkpoints the position of the last
batch it consumed (per rank); a resumed run restarts the workers at that chunk and refills
the carry buffer, so it sees exactly the samples an uninterrupted run would have seen.

Cache: with ``data.path`` set, the first epoch also writes every labeled document of this
rank as shards in ``data.path/rank{r}-of-{W}/`` (the ``prepare`` format); later epochs read
them instead of labeling again. Only a first epoch labeled from its start writes the cache
(a run resumed in the middle of epoch 0 does not).

Failures: a worker that raises (a spaCy crash) reports the documents it was labeling and
the run stops with that sentence; a worker that dies (killed, out of memory) breaks the
pool, and the run stops naming it, its exit code and the documents it had reached.
"""
from __future__ import annotations

import json
from collections import deque
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lacy_fast.config import DataConfig, LabelConfig, to_dict
from lacy_fast.data import shards as shard_io
from lacy_fast.data.loader import Batch, make_batch
from lacy_fast.data.readers import SkipReport, read_documents, resolve_inputs
from lacy_fast.data.tokenizer import Tokenizer
from lacy_fast.data.workers import ShardPool, die_with_parent
from lacy_fast.errors import UserError
from lacy_fast.fileio import write_json
from lacy_fast.method import Targets

CACHE_SHARD_DOCS = 20_000  # documents per cache shard


_labeler_job: tuple | None = None  # (label config, tokenizer path) of this worker process
_labeler: Any = None  # this worker's FactLabeler, made at its first chunk


def _start_labeler(label_cfg: LabelConfig, tokenizer_path: str, events: Any, parent: int) -> None:
    global _labeler_job
    die_with_parent(parent)
    from lacy_fast.data.labeling import single_threaded

    single_threaded()  # before spaCy brings in numpy's thread pools
    _labeler_job = (label_cfg, tokenizer_path)


def _label_chunk(texts: list[str]) -> tuple:
    """("docs", the chunk's labeled documents), or ("error", where, what) when labeling
    raised (where: "start-up" when the labeler could not be made, else None: the chunk)."""
    global _labeler
    where = None
    try:
        if _labeler is None:
            where = "start-up"
            from lacy_fast.data.labeling import FactLabeler

            _labeler = FactLabeler(_labeler_job[0], Tokenizer.load(_labeler_job[1]))
            where = None
        return ("docs", _labeler.label_batch(texts))
    except Exception as err:  # reported by the rank with the location
        return ("error", where, f"{type(err).__name__}: {err}".splitlines()[0])


class OnlineBatches:
    """Micro-batches of one rank, labeled online (see the module doc)."""

    def __init__(self, data: DataConfig, *, seq_len: int, micro_batch: int, grad_accum: int, world: int, rank: int,
                 seed: int, pin: bool = False, ignore_index: int = -100):
        if not data.inputs:
            raise UserError("data.source=online needs raw text: set data.inputs=[FILE, ...]")
        if not data.tokenizer:
            raise UserError("data.source=online needs a tokenizer: set data.tokenizer=FILE.model "
                            "(e.g. the tokenizer.model of a `lacy-fast prepare` output)")
        self.inputs = [str(p) for p in resolve_inputs(data.inputs)]  # fails fast on a bad path
        self.tokenizer_path = Path(data.tokenizer)
        if not self.tokenizer_path.is_file():
            raise UserError(f"data.tokenizer {data.tokenizer} does not exist; pass a SentencePiece .model file")
        self.tokenizer = Tokenizer.load(self.tokenizer_path)
        self.targets = Targets(self.tokenizer.vocab_size, self.tokenizer.call_id, ignore_index)
        self.data, self.seq_len, self.micro_batch = data, seq_len, micro_batch
        self.world, self.rank, self.pin = world, rank, pin
        self.cache_dir = Path(data.path) / f"rank{rank:03d}-of-{world:03d}" if data.path else None
        self.skipped: dict[str, int] = {}
        self.workers: ShardPool | None = None  # the labeling workers, while an epoch is labeled
        self.shards = None  # labeled as it trains: no prepared shards behind the batches
        self.ref_sidecar = None

    def batch(self, step: int, micro: int) -> None:
        """None: the stream's position is not a function of the step."""
        return None

    # -- labeled documents, chunk by chunk ------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        return {"inputs": [[p, Path(p).stat().st_size] for p in self.inputs], "tokenizer": self.tokenizer.sha256,
                "label": to_dict(self.data.label), "reader": to_dict(self.data.reader),
                "chunk_docs": self.data.label.batch_size}

    def _cache_ready(self) -> bool:
        if self.cache_dir is None or not (self.cache_dir / "stats.json").exists():
            return False
        saved = json.loads((self.cache_dir / "cache.json").read_text())
        if saved != json.loads(json.dumps(self._fingerprint())):
            raise UserError(f"online cache {self.cache_dir} was written from other inputs or labeling settings; "
                            "delete it or point data.path elsewhere")
        return True

    def _chunks(self, epoch: int, start: int) -> Iterator[tuple[int, int, list[tuple[np.ndarray, np.ndarray]]]]:
        """(epoch, chunk, labeled docs) forever, epoch after epoch."""
        while True:
            if epoch > 0 and self._cache_ready():
                yield from self._cached_chunks(epoch, start)
            else:
                yield from self._labeled_chunks(epoch, start, write_cache=epoch == 0 and start == 0)
            epoch, start = epoch + 1, 0

    def _labeled_chunks(self, epoch: int, start: int, write_cache: bool):
        cache = _CacheWriter(self.cache_dir, self.tokenizer, self._fingerprint()) if (
            write_cache and self.cache_dir is not None) else None
        n = max(1, self.data.workers)
        skips = SkipReport()
        texts = self._text_chunks(start, skips)
        queued: deque[tuple[int, str]] = deque()  # (chunk, its documents' lines), submitted in order
        with ShardPool(n, _start_labeler, (self.data.label, str(self.tokenizer_path)), None, doing="labeling",
                       kept="labeled") as pool:
            self.workers = pool
            try:
                while True:
                    while len(queued) < n * self.data.queue_depth and (item := next(texts, None)) is not None:
                        chunk, location, batch = item
                        pool.submit(chunk, _label_chunk, batch, label=location)
                        queued.append((chunk, location))
                    if not queued:
                        break
                    chunk, location = queued.popleft()
                    docs = self._labeled(pool, chunk, location)
                    if cache is not None:
                        cache.add(docs)
                    yield epoch, chunk, docs
            except BrokenProcessPool:
                raise self._died(pool) from None
            finally:
                self.workers = None
        self.skipped = dict(skips.counts)
        if cache is not None:
            cache.finish()

    def _text_chunks(self, start: int, skips: SkipReport) -> Iterator[tuple[int, str, list[str]]]:
        """(chunk, where its documents lie, their texts) of this rank's documents from ``start`` on."""
        chunk, docs = 0, []
        for i, doc in enumerate(read_documents(self.inputs, self.data.reader, skips)):
            if i % self.world != self.rank:
                continue
            docs.append(doc)
            if len(docs) == self.data.label.batch_size:
                if chunk >= start:
                    yield chunk, f"{docs[0].source}:{docs[0].line}-{docs[-1].line}", [d.text for d in docs]
                chunk, docs = chunk + 1, []
        if docs and chunk >= start:
            yield chunk, f"{docs[0].source}:{docs[0].line}-{docs[-1].line}", [d.text for d in docs]

    @staticmethod
    def _labeled(pool: ShardPool, chunk: int, location: str) -> list[tuple[np.ndarray, np.ndarray]]:
        kind, *rest = pool.result(chunk)
        if kind == "error":
            where, what = rest
            raise UserError(f"prefetch worker failed while labeling {where or location} ({what}); fix or remove "
                            "that input and rerun")
        return rest[0]

    @staticmethod
    def _died(pool: ShardPool) -> UserError:
        worker, code, where = pool.dead_worker() or (None, None, "")
        doing = f"labeling {where}" if where else "starting up"
        return UserError(f"prefetch worker {'?' if worker is None else worker} died (exit code {code}) while {doing}; "
                         "check memory (and that input), then rerun to resume from the last checkpoint")

    def _cached_chunks(self, epoch: int, start: int):
        shards = shard_io.ShardSet(self.cache_dir)
        size = self.data.label.batch_size
        for chunk in range(start, -(-shards.n_docs // size)):
            docs = [shards.document(i) for i in range(chunk * size, min((chunk + 1) * size, shards.n_docs))]
            yield epoch, chunk, docs

    # -- packing into batches -------------------------------------------------------------

    def batches(self, start_step: int = 0, state: dict[str, Any] | None = None) -> Iterator[Batch]:
        """Micro-batches from ``state`` (a position from a checkpoint) or the start."""
        epoch, chunk = (state["epoch"], state["chunk"]) if state else (0, 0)
        carry_t = [np.asarray(state["carry_tokens"], dtype=np.int64)] if state else []
        carry_f = [np.asarray(state["carry_flags"], dtype=np.uint8)] if state else []
        L = self.seq_len
        for epoch, chunk, docs in self._chunks(epoch, chunk):
            tokens = np.concatenate(carry_t + [ids.astype(np.int64) for ids, _ in docs])  # (n,)
            flags = np.concatenate(carry_f + [f for _, f in docs])  # (n,)
            n_samples = (len(tokens) - 1) // L if len(tokens) > L else 0
            done = 0
            while n_samples - done >= self.micro_batch:
                rows = range(done * L, (done + self.micro_batch) * L, L)
                batch = make_batch(np.stack([tokens[r:r + L + 1] for r in rows]),
                                   np.stack([flags[r:r + L + 1] for r in rows]), self.pin, self.targets)
                done += self.micro_batch
                rest = slice(done * L, None)
                batch.position = {"epoch": epoch, "chunk": chunk + 1, "carry_tokens": tokens[rest].tolist(),
                                  "carry_flags": flags[rest].tolist()}
                yield batch
            carry_t, carry_f = [tokens[done * L:]], [flags[done * L:]]

    def documents(self, limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This rank's labeled documents of the first epoch, in stream order (for checks)."""
        n = 0
        for _, _, docs in self._labeled_chunks(0, 0, write_cache=False):
            for doc in docs:
                yield doc
                n += 1
                if limit is not None and n >= limit:
                    return


class _CacheWriter:
    """Writes one rank's first epoch as shards; ``stats.json`` last marks it complete."""

    def __init__(self, directory: Path, tokenizer: Tokenizer, fingerprint: dict[str, Any]):
        self.dir, self.tokenizer = directory, tokenizer
        directory.mkdir(parents=True, exist_ok=True)
        for stale in list(directory.glob("shard_*")) + list(directory.glob("stats.json")):
            stale.unlink()
        (directory / "tokenizer.model").write_bytes(tokenizer.path.read_bytes())
        write_json(directory / "cache.json", fingerprint)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.index = self.documents = self.tokens = 0

    def add(self, docs: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.pending += docs
        if len(self.pending) >= CACHE_SHARD_DOCS:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        shard_io.write_shard(self.dir / shard_io.shard_name(self.index), self.pending, self.tokenizer.sha256,
                             self.tokenizer.vocab_size)
        self.documents += len(self.pending)
        self.tokens += sum(len(ids) for ids, _ in self.pending)
        self.index, self.pending = self.index + 1, []

    def finish(self) -> None:
        self._flush()
        write_json(self.dir / "stats.json", {"documents": self.documents, "tokens": self.tokens})
