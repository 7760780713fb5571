"""Writes that never leave a half-written file behind.

Everything a run writes that another run or a person reads (shards, stats, checkpoints,
reports) goes to a temporary name in the same directory first and is renamed into place:
a crash or a kill leaves either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import contextlib
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
    found = False
    with open(path, encoding="utf-8") as fh:
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
