"""Worker processes that never outlive the run that started them (``prepare`` and its judge step).

On Linux the kernel kills a worker when its parent dies (``PR_SET_PDEATHSIG``, set as the
worker starts); every worker also checks that its parent still lives before it writes
(the portable half, and the cover for a parent that died before the signal was set). So
after a kill -9 of the parent nothing keeps writing into the output directory, and a rerun
never races a leftover.
"""
from __future__ import annotations

import concurrent.futures as cf
import itertools
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


class _Finished:
    """The event a worker sends after a task's last progress event: on the one queue that
    carries that progress, so when it arrives every progress event of the task has."""

    def __init__(self, task: int):
        self.task = task


_events: Any = None  # the progress queue of this worker process


def _start_worker(initializer: Callable[..., None], initargs: tuple, events: Any, parent: int) -> None:
    global _events
    _events = events  # the same queue object the initializer keeps: one feeder thread, one order
    initializer(*initargs, events, parent)


def _run_task(task: int, fn: Callable[..., Any], *args: Any) -> Any:
    result = fn(*args)
    _events.put(_Finished(task))
    return result


def drain_progress(events: Any, bar: Any, timeout: float = 0.0) -> set[int]:
    """Apply every (documents, tokens) event the workers have queued so far to ``bar``
    (waiting up to ``timeout`` seconds for the first); return the tasks finished meanwhile."""
    finished: set[int] = set()
    while True:
        try:
            event = events.get(timeout=timeout) if timeout else events.get_nowait()
        except queue.Empty:
            return finished
        timeout = 0.0
        if isinstance(event, _Finished):
            finished.add(event.task)
        else:
            docs, tokens = event
            bar.update(docs, tokens=tokens)


class ShardPool:
    """Spawned worker processes that each handle whole shards, for ``prepare`` and its judge
    step: ``initializer(*initargs, events, parent)`` runs in every worker (it calls
    ``die_with_parent(parent)`` and keeps ``events``, the queue its progress goes to);
    ``submit`` queues a shard by its index; ``wait`` returns the (index, result) pairs of
    the shards that finished, showing progress meanwhile. A shard counts as finished once
    its result and the worker's end-of-task event (sent on the progress queue after the
    task's last progress event) have both arrived, so every progress event of the shards
    returned has been applied. Used as a context manager: it turns a worker that died into
    one sentence naming the shard, and always shuts the pool down.
    """

    def __init__(self, workers: int, initializer: Callable[..., None], initargs: tuple, bar: Any, doing: str,
                 kept: str):
        ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no forked spaCy or thread state
        self.events = ctx.Queue()
        self.bar = bar
        self.doing, self.kept = doing, kept  # "labeling", "finished": for the message of a dead worker
        self.pending: dict[cf.Future, int] = {}
        self._task: dict[cf.Future, int] = {}  # future -> task number (a shard may be submitted twice)
        self._tasks = itertools.count()
        self._ended: set[int] = set()  # tasks whose end-of-task event has arrived
        self._pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker,
                                            initargs=(initializer, initargs, self.events, os.getpid()))

    def submit(self, index: int, fn: Callable[..., Any], *args: Any) -> None:
        task = next(self._tasks)
        fut = self._pool.submit(_run_task, task, fn, *args)
        self._task[fut], self.pending[fut] = task, index

    def _ready(self, fut: cf.Future) -> bool:
        """Finished with its progress applied, or failed (a worker's exception, a dead worker)."""
        return fut.done() and (self._task[fut] in self._ended or fut.exception() is not None)

    def wait(self) -> list[tuple[int, Any]]:
        """Block (showing progress) until at least one shard finishes; a worker's exception is
        re-raised here."""
        while True:
            ended = [fut for fut in self.pending if self._task[fut] in self._ended]
            if ended:  # its result is on its way (or its worker died): wait for that, not for events
                cf.wait(ended, timeout=0.2, return_when=cf.FIRST_COMPLETED)
            self._ended |= drain_progress(self.events, self.bar, timeout=0 if ended else 0.2)
            finished = [fut for fut in self.pending if self._ready(fut)]
            if finished:
                # Results first: a shard whose worker died stays pending, so the message names it.
                results = [(self.pending[fut], fut.result()) for fut in finished]
                for fut in finished:
                    del self.pending[fut]
                    self._ended.discard(self._task.pop(fut))
                return results

    def __enter__(self) -> ShardPool:
        return self

    def __exit__(self, kind, err, tb) -> bool:
        try:
            if kind is None:
                drain_progress(self.events, self.bar)  # any events sent outside a task
            elif issubclass(kind, cf.process.BrokenProcessPool):
                lost = sorted(self.pending.values())
                raise UserError(f"a worker process died while {self.doing} shard {lost[0] if lost else '?'} (killed or "
                                f"out of memory); rerun the same command to resume from the {self.kept} shards, with "
                                "fewer --workers if memory is short")
        finally:
            self._pool.shutdown(wait=not self.pending, cancel_futures=True)
        return False
