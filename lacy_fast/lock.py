"""An exclusive lock on a run's directory, so two runs never write into one.

    with DirLock(out_dir, "training run"):
        ...  # nobody else holds out_dir

The lock is ``flock(2)`` on ``DIR/.lock``, a file that is never deleted. The kernel drops a
flock when its holder dies in any way (exit, crash, kill -9, OOM), so a lock left by a dead
run never blocks a rerun: there is no stale lock to detect or clean up. The file records
who holds it (pid, host, start time), for the refusal's message only.

Held per open file, not per process, so a second run inside the same process (the demo
trains several) is refused too; a registry of the directories this process holds makes
that true on filesystems whose flock is emulated with per-process POSIX locks (NFS).

Where the filesystem does not support flock at all, the file's record is the lock: it is
taken over when its holder is a process of this host that no longer runs, and otherwise
refused with the record's pid and host and what to do if that run is gone.
"""
from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

from lacy_fast.errors import UserError

LOCK_NAME = ".lock"
_HELD: set[str] = set()  # directories this process holds
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class DirLock:
    """Exclusive lock on ``directory`` (created if missing) from ``acquire`` to ``release``."""

    def __init__(self, directory: str | os.PathLike, what: str = "run"):
        self.dir = Path(directory)
        self.path = self.dir / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> "DirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        key = str(self.dir.resolve())
        if key in _HELD:
            raise self._refusal(f"by this process (pid {os.getpid()})")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # no fcntl (Windows): the record is the lock
                self._take_record(fd)
            except BlockingIOError:
                raise self._refusal(_describe(_read(fd)))
            except OSError as err:
                if err.errno not in _NO_FLOCK:
                    raise
                self._take_record(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, _record().encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _HELD.add(key)

    def release(self) -> None:
        if self._fd is None:
            return
        _HELD.discard(str(self.dir.resolve()))
        os.close(self._fd)  # drops the flock; the file stays for the next holder
        self._fd = None

    def _take_record(self, fd: int) -> None:
        """The fallback without flock: take the lock unless its record names a live holder."""
        holder = _read(fd)
        fields = _fields(holder)
        pid, host = fields.get("pid", ""), fields.get("host", "")
        if not pid.isdigit():
            return
        if host == socket.gethostname() and (int(pid) == os.getpid() or not _alive(int(pid))):
            return  # its holder is gone (this process holds nothing here: see _HELD)
        raise self._refusal(f"{_describe(holder)}; if that run no longer runs, delete {self.path}")

    def _refusal(self, holder: str) -> UserError:
        return UserError(f"{self.dir} is in use by another {self.what} (held {holder}); wait for it to finish or "
                         "stop it, or use another directory")


def _record() -> str:
    return f"pid={os.getpid()} host={socket.gethostname()} since={time.strftime('%Y-%m-%dT%H:%M:%S')}\n"


def _fields(record: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in record.split() if "=" in part)


def _describe(record: str) -> str:
    f = _fields(record)
    if "pid" not in f:
        return "by another process"
    return f"by pid {f['pid']} on host {f.get('host', '?')} since {f.get('since', '?')}"


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
