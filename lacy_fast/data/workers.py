"""Worker processes that never outlive the run that started them (``prepare`` and its judge step).

On Linux the kernel kills a worker when its parent dies (``PR_SET_PDEATHSIG``, set as the
worker starts); every worker also checks that its parent still lives before it writes
(the portable half, and the cover for a parent that died before the signal was set). So
after a kill -9 of the parent nothing keeps writing into the output directory, and a rerun
never races a leftover.
"""
from __future__ import annotations

import os
import queue
import sys
from typing import Any

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
