"""Worker processes that never outlive the run that started them (``prepare``, its judge
step, and the online prefetcher of training).

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
import signal
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

    def __init__(self, task: int, worker: int):
        self.task, self.worker = task, worker


_events: Any = None  # the progress queue of this worker process
_worker = -1  # this worker's number in its pool
_doing: Any = None  # shared bytes: what this worker is doing, read by the pool when it dies
_DOING = 512  # bytes of that string


def _start_worker(initializer: Callable[..., None], initargs: tuple, events: Any, parent: int, count: Any,
                  pids: Any, doing: list) -> None:
    global _events, _worker, _doing
    _events = events  # the same queue object the initializer keeps: one feeder thread, one order
    with count.get_lock():  # a number for this worker, in the order the workers start
        _worker, count.value = count.value, count.value + 1
    pids[_worker], _doing = os.getpid(), doing[_worker]
    initializer(*initargs, events, parent)


def _run_task(task: int, label: str | None, fn: Callable[..., Any], *args: Any) -> Any:
    if label is not None:
        _doing.value = label.encode()[: _DOING - 1]
    result = fn(*args)
    _events.put(_Finished(task, _worker))
    return result


def drain_progress(events: Any, bar: Any, timeout: float = 0.0) -> dict[int, int]:
    """Apply every (documents, tokens) event the workers have queued so far to ``bar``
    (waiting up to ``timeout`` seconds for the first); return the tasks finished meanwhile,
    each with the worker that ran it."""
    finished: dict[int, int] = {}
    while True:
        try:
            event = events.get(timeout=timeout) if timeout else events.get_nowait()
        except queue.Empty:
            return finished
        timeout = 0.0
        if isinstance(event, _Finished):
            finished[event.task] = event.worker
        else:
            docs, tokens = event
            bar.update(docs, tokens=tokens)


class ShardPool:
    """Spawned worker processes that each handle whole tasks: the shards of ``prepare`` and
    its judge step, the chunks of the online prefetcher. ``initializer(*initargs, events,
    parent)`` runs in every worker (it calls ``die_with_parent(parent)`` and keeps ``events``,
    the queue its progress goes to); ``submit`` queues a task by its index; ``wait`` returns
    the (index, result) pairs of the tasks that finished, showing progress meanwhile, and
    ``result`` one index's result, for a caller that takes them in its own order. A task
    counts as finished once its result and the worker's end-of-task event (sent on the
    progress queue after the task's last progress event) have both arrived, so every
    progress event of the tasks returned has been applied. A worker that dies breaks the
    pool: ``wait``, ``result`` and ``submit`` raise BrokenProcessPool, and ``dead_worker``
    names it. Used as a context manager, the pool turns that into one sentence naming the
    shard, and always shuts down.
    """

    def __init__(self, workers: int, initializer: Callable[..., None], initargs: tuple, bar: Any, doing: str,
                 kept: str):
        ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no forked spaCy or thread state
        self.events = ctx.Queue()
        self.bar = bar
        self.doing, self.kept = doing, kept  # "labeling", "finished": for the message of a dead worker
        self.pending: dict[cf.Future, int] = {}
        self.worker: int | None = None  # the worker that ran the task ``result`` returned last
        self._task: dict[cf.Future, int] = {}  # future -> task number (a shard may be submitted twice)
        self._tasks = itertools.count()
        self._ended: dict[int, int] = {}  # task -> its worker, for tasks whose end-of-task event has arrived
        self.pids = ctx.Array("i", workers)  # by worker number; 0 until that worker has started
        self._doing = [ctx.Array("c", _DOING) for _ in range(workers)]
        self._processes: dict[int, Any] = {}  # pid -> process, to read the exit code of one that died
        self._pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker,
                                            initargs=(initializer, initargs, self.events, os.getpid(),
                                                      ctx.Value("i", 0), self.pids, self._doing))

    def submit(self, index: int, fn: Callable[..., Any], *args: Any, label: str | None = None) -> None:
        """Queue ``fn(*args)`` as task ``index``; ``label`` says what it does, should its worker die."""
        task = next(self._tasks)
        fut = self._pool.submit(_run_task, task, label, fn, *args)
        self._task[fut], self.pending[fut] = task, index
        self._processes.update(self._pool._processes or {})  # workers start as tasks are submitted

    def _ready(self, fut: cf.Future) -> bool:
        """Finished with its progress applied, or failed (a worker's exception, a dead worker)."""
        return fut.done() and (self._task[fut] in self._ended or fut.exception() is not None)

    def _poll(self, futures: list[cf.Future]) -> None:
        """Wait a moment for ``futures``: for the results of those whose end-of-task event has
        come, else for events. A dead worker raises BrokenProcessPool here, even where the
        result of its last task came and its end-of-task event never will."""
        if self._died():
            raise cf.process.BrokenProcessPool(f"a worker process died while {self.doing}")
        ended = [fut for fut in futures if self._task[fut] in self._ended]
        if ended:  # its result is on its way (or its worker died): wait for that, not for events
            cf.wait(ended, timeout=0.2, return_when=cf.FIRST_COMPLETED)
        self._ended.update(drain_progress(self.events, self.bar, timeout=0 if ended else 0.2))

    def _take(self, finished: list[cf.Future]) -> list[tuple[int, Any]]:
        # Results first: a shard whose worker died stays pending, so the message names it.
        results = [(self.pending[fut], fut.result()) for fut in finished]
        for fut in finished:
            del self.pending[fut]
            self.worker = self._ended.pop(self._task.pop(fut))
        return results

    def wait(self) -> list[tuple[int, Any]]:
        """Block (showing progress) until at least one shard finishes; a worker's exception is
        re-raised here."""
        while True:
            finished = [fut for fut in self.pending if self._ready(fut)]
            if finished:
                return self._take(finished)
            self._poll(list(self.pending))

    def result(self, index: int) -> Any:
        """Block until task ``index`` finishes; its result (a worker's exception is re-raised here)."""
        fut = next(f for f, i in self.pending.items() if i == index)
        while not self._ready(fut):
            self._poll([fut])
        return self._take([fut])[0][1]

    def _died(self) -> bool:
        return any(p.exitcode is not None for p in self._processes.values())

    def dead_worker(self) -> tuple[int | None, int, str] | None:
        """(number, exit code, what it was doing) of the worker whose death broke the pool (call
        it once BrokenProcessPool was raised), None where none died. The pool terminates the
        others once it sees the death: this waits for that (every exit code is then known) and
        names the one it did not terminate, where it can tell."""
        manager = getattr(self._pool, "_executor_manager_thread", None)
        if manager is not None:
            manager.join()
        dead = [(pid, p.exitcode) for pid, p in self._processes.items() if p.exitcode is not None]
        if not dead:
            return None
        pid, code = min(dead, key=lambda d: d[1] == -signal.SIGTERM)
        number = list(self.pids).index(pid) if pid in list(self.pids) else None
        return number, code, self._doing[number].value.decode(errors="replace") if number is not None else ""

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
