"""The out_dir lock: one holder at a time, across processes and inside one; a dead holder's
lock is free again; the record fallback where flock is missing."""
import errno
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from lacy_fast import lock as L
from lacy_fast.errors import UserError

HOLD = ("import sys, time; from lacy_fast.lock import DirLock; DirLock(sys.argv[1], 'training run').acquire(); "
        "print('held', flush=True); time.sleep(600)")


def test_second_holder_in_the_same_process_is_refused_until_release(tmp_path):
    first = L.DirLock(tmp_path / "run", "training run")
    first.acquire()
    with pytest.raises(UserError, match=r"run is in use by another training run \(held by this process"):
        L.DirLock(tmp_path / "run", "training run").acquire()
    first.release()
    with L.DirLock(tmp_path / "run"):  # free again
        pass
    assert (tmp_path / "run" / L.LOCK_NAME).exists()  # the file stays; only the lock is dropped


def test_another_process_holds_it_until_it_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as info:
            L.DirLock(tmp_path).acquire()
        message = str(info.value)
        assert f"held by pid {holder.pid} on host {socket.gethostname()}" in message and "\n" not in message
        holder.send_signal(signal.SIGKILL)  # a crash: nobody cleans up
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    with L.DirLock(tmp_path):  # the kernel dropped the dead holder's lock: no stale lock
        pass


def _no_flock(monkeypatch):
    import fcntl

    def flock(fd, op):
        raise OSError(errno.ENOLCK, "no locks on this filesystem")

    monkeypatch.setattr(fcntl, "flock", flock)


def test_without_flock_a_dead_holders_record_is_taken_over(tmp_path, monkeypatch):
    _no_flock(monkeypatch)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / L.LOCK_NAME).write_text(f"pid={dead.pid} host={socket.gethostname()} since=then\n")
    with L.DirLock(tmp_path):
        assert f"pid={os.getpid()} " in (tmp_path / L.LOCK_NAME).read_text()


def test_without_flock_a_live_or_remote_holder_is_refused(tmp_path, monkeypatch):
    _no_flock(monkeypatch)
    (tmp_path / L.LOCK_NAME).write_text(f"pid={os.getppid()} host={socket.gethostname()} since=then\n")
    with pytest.raises(UserError, match="in use by another"):
        L.DirLock(tmp_path).acquire()
    (tmp_path / L.LOCK_NAME).write_text("pid=1 host=some-other-host since=then\n")
    with pytest.raises(UserError, match=r"on host some-other-host .*delete .*\.lock"):
        L.DirLock(tmp_path).acquire()


def test_lock_waits_for_nobody(tmp_path):
    """Acquiring never blocks: a held lock is refused at once."""
    first = L.DirLock(tmp_path)
    first.acquire()
    t0 = time.monotonic()
    with pytest.raises(UserError):
        L.DirLock(tmp_path).acquire()
    assert time.monotonic() - t0 < 1.0
    first.release()
