"""Writes that never leave a half-written file behind.

Everything a run writes that another run or a person reads (shards, stats, checkpoints,
reports) goes to a temporary name in the same directory first and is renamed into place:
a crash or a kill leaves either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import codecs
import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from lacy_fast.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it replaces ``path``.

    With ``is_dir`` the temporary is a directory; an existing directory at ``path`` is
    replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if not is_dir:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        if is_dir and path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append one JSON line; a line is written with a single write() so readers never see half a row."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def jsonl_string_pairs(path: Path, keys: tuple[str, str], what: str, row: str, hint: str
                       ) -> Iterator[tuple[int, str, str]]:
    """(line number, row[keys[0]], row[keys[1]]) of each non-blank line of a JSONL file whose
    two fields are strings. A missing file, a line that is not such a row, or a file without
    any is one sentence (``what``: the file's role, ``row``: a row's name, ``hint``: what to pass)."""
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; pass {hint}")
    problem = utf8_problem(path, what)  # a UTF-16 file would read as one row of garbage
    if problem is not None:
        raise UserError(problem)
    found = False
    with open(path, encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                a, b = data[keys[0]], data[keys[1]]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{n} is not a {row} row; pass {hint}")
            if not isinstance(a, str) or not isinstance(b, str):
                raise UserError(f"{path}:{n} needs a string {keys[0]} and a string {keys[1]}; pass {hint}")
            found = True
            yield n, a, b
    if not found:
        raise UserError(f"{what} {path} is empty; pass {hint}")


# ----------------------------------------------------------------------------------------
# Checksums: a manifest of every file a directory holds, written last
# ----------------------------------------------------------------------------------------

MANIFEST = "manifest.json"
_CHUNK = 8 << 20


def sha256_of(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in chunks (checkpoints are larger than memory would like)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Record the size and sha256 of every file under ``directory`` (hidden files and the
    manifest itself aside) in ``directory/manifest.json``, atomically; call it last, once
    everything else is written, so that its presence means the directory is complete."""
    directory = Path(directory)
    paths = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST
             and not any(part.startswith(".") for part in p.relative_to(directory).parts)]
    digests = _hash_all(paths)
    files = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": digest}
             for p, digest in zip(paths, digests)}
    manifest = {"format": "lacy-fast-manifest", "files": files}
    write_json(directory / MANIFEST, manifest)
    return manifest


def manifest_problem(directory: str | os.PathLike) -> str | None:
    """None when every file ``directory/manifest.json`` records is there with its size and
    sha256; else what is wrong, naming the first damaged file (a phrase to build a sentence on)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        return f"{path} is missing"
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        entries = [(name, int(e["bytes"]), str(e["sha256"])) for name, e in files.items()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return f"{path} is damaged (not a manifest of checksums)"
    for name, size, _ in entries:  # the cheap checks first
        file = directory / name
        if not file.is_file():
            return f"{file} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{file} is truncated or grown ({actual} bytes, {size} recorded)"
    actual = _hash_all([directory / name for name, _, _ in entries])
    for (name, _, digest), got in zip(entries, actual):
        if got != digest:
            return f"{directory / name} is damaged (its sha256 differs from the one recorded)"
    return None


def _hash_all(paths: list[Path]) -> list[str]:
    """sha256 of each file, several at once (hashlib releases the GIL on large reads)."""
    if len(paths) < 2:
        return [sha256_of(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(sha256_of, paths))


# ----------------------------------------------------------------------------------------
# Errors of the file system a user can fix
# ----------------------------------------------------------------------------------------

_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def disk_full_is_user_error(folder: str | os.PathLike) -> Iterator[None]:
    """Turn "no space left on device" while writing ``folder`` into one sentence naming it.
    Every write is atomic, so what was written before stays valid and a rerun after freeing
    space continues where this one stopped."""
    try:
        yield
    except OSError as err:
        if err.errno not in _FULL:
            raise
        raise UserError(f"the disk holding {folder} is full ({err.filename or 'while writing'}: {err.strerror}); free "
                        "space there and rerun the same command, which continues from what was saved") from err
    except RuntimeError as err:  # torch.save reports a full disk as a RuntimeError of its own
        if "No space left on device" not in str(err) and "file write failed" not in str(err):
            raise
        raise UserError(f"the disk holding {folder} is full (a checkpoint write failed); free space there and "
                        "rerun the same command, which continues from what was saved") from err


def check_writable(path: str | os.PathLike, option: str) -> None:
    """Refuse, before any work, an output path that cannot be written: one under a file,
    or in a directory this user may not write."""
    path = Path(path)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{option} {path} lies under {parent}, which is a file, not a directory; pass a path in a "
                        "directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path} cannot be written ({parent} is not writable); pass a path in a "
                        "directory you can write")


def utf8_problem(path: str | os.PathLike, what: str) -> str | None:
    """One sentence when ``path`` is not UTF-8 text (UTF-16 named as such), else None."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
        if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return f"{what} {path} is UTF-16 text; save it as UTF-8"
        fh.seek(0)
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        while chunk := fh.read(_CHUNK):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                return f"{what} {path} is not UTF-8 text (an invalid byte at offset {offset + err.start}); save it " \
                       "as UTF-8"
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return f"{what} {path} is not UTF-8 text (it ends inside a character); save it as UTF-8"
    return None
