"""Worker processes that never outlive the run that started them (``prepare`` and its judge step).

On Linux the kernel kills a worker when its parent dies (``PR_SET_PDEATHSIG``, set as the
worker starts); every worker also checks that its parent still lives before it writes
(the portable half, and the cover for a parent that died before the signal was set). So
after a kill -9 of the parent nothing keeps writing into the output directory, and a rerun
never races a leftover.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import queue
import sys
from typing import Any, Callable

from lacy_fast.errors import UserError

_parent: int | None = None  # pid of the process that started this worker

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when ``parent`` dies (Linux), then make sure it
    has not died already (between this process's start and the prctl call)."""
    global _parent
    _parent = parent
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl in this libc: the parent check below still runs
            pass
    exit_if_orphaned()


def exit_if_orphaned() -> None:
    """Exit at once, writing nothing more, when the parent is gone."""
    if _parent is not None and os.getppid() != _parent:
        os._exit(1)


def drain_progress(events: Any, bar: Any) -> None:
    """Apply every (documents, tokens) event the workers have queued so far to ``bar``."""
    while True:
        try:
            docs, tokens = events.get_nowait()
        except queue.Empty:
            return
        bar.update(docs, tokens=tokens)


class ShardPool:
    """Spawned worker processes that each handle whole shards, for ``prepare`` and its judge
    step: ``initializer(*initargs, events, parent)`` runs in every worker (it calls
    ``die_with_parent(parent)`` and keeps ``events``, the queue its progress goes to);
    ``submit`` queues a shard by its index; ``wait`` returns the (index, result) pairs of
    the shards that finished, showing progress meanwhile. Used as a context manager: it
    applies the last progress events on a clean exit, turns a worker that died into one
    sentence naming the shard, and always shuts the pool down.
    """

    def __init__(self, workers: int, initializer: Callable[..., None], initargs: tuple, bar: Any, doing: str,
                 kept: str):
        ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no forked spaCy or thread state
        self.events = ctx.Queue()
        self.bar = bar
        self.doing, self.kept = doing, kept  # "labeling", "finished": for the message of a dead worker
        self.pending: dict[cf.Future, int] = {}
        self._pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer,
                                            initargs=(*initargs, self.events, os.getpid()))

    def submit(self, index: int, fn: Callable[..., Any], *args: Any) -> None:
        self.pending[self._pool.submit(fn, *args)] = index

    def wait(self) -> list[tuple[int, Any]]:
        """Block (showing progress) until at least one shard finishes; a worker's exception is
        re-raised here."""
        while True:
            finished, _ = cf.wait(self.pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
            drain_progress(self.events, self.bar)
            if finished:
                # Results first: a shard whose worker died stays pending, so the message names it.
                results = [(self.pending[fut], fut.result()) for fut in finished]
                for fut in finished:
                    del self.pending[fut]
                return results

    def __enter__(self) -> ShardPool:
        return self

    def __exit__(self, kind, err, tb) -> bool:
        try:
            if kind is None:
                drain_progress(self.events, self.bar)
            elif issubclass(kind, cf.process.BrokenProcessPool):
                lost = sorted(self.pending.values())
                raise UserError(f"a worker process died while {self.doing} shard {lost[0] if lost else '?'} (killed or "
                                f"out of memory); rerun the same command to resume from the {self.kept} shards, with "
                                "fewer --workers if memory is short")
        finally:
            self._pool.shutdown(wait=not self.pending, cancel_futures=True)
        return False
