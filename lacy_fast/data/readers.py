"""Corpus readers: .txt, .jsonl and .parquet files (each optionally .gz), directories, globs.

    skips = SkipReport(log_path=None)
    for doc in read_documents(["data/*.jsonl.gz", "more/"], ReaderConfig(), skips):
        doc.text, doc.source, doc.line

Formats:
- ``.txt``: documents separated by blank lines (a line holding only whitespace counts as blank).
- ``.jsonl``: one JSON object per line, the text in ``cfg.text_field``.
- ``.parquet``: the column ``cfg.text_field``, read one row group batch at a time.
A directory is read recursively (files with the suffixes above, in sorted order); a glob
expands in sorted order. Everything streams: memory does not grow with the corpus.

Bad input never crashes a run and is never dropped silently: each skipped document is
counted under its reason (``SKIP_REASONS``) and, when a log path is set, written to it as
``path:line: reason``. A path that does not exist, or names no readable file, is a
``UserError`` (one sentence, exit code 2).
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator

from lacy_fast.config import ReaderConfig
from lacy_fast.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".parquet")
SKIP_REASONS = ("malformed_json", "missing_field", "invalid_utf8", "empty", "too_large")


@dataclass
class Document:
    text: str
    source: str  # file path
    line: int  # 1-based first line (.txt, .jsonl) or row (.parquet)


class SkipReport:
    """Counts skipped documents by reason; optionally logs each as ``path:line: reason``."""

    def __init__(self, log_path: str | os.PathLike | None = None):
        self.counts: Counter[str] = Counter({r: 0 for r in SKIP_REASONS})
        self._log: IO[str] | None = open(log_path, "w", encoding="utf-8") if log_path else None

    def skip(self, source: str, line: int, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if self._log is not None:
            self._log.write(f"{source}:{line}: {reason}{': ' + detail if detail else ''}\n")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def resolve_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files named by paths, directories (recursive) and globs, in a stable order."""
    files: list[Path] = []
    for item in inputs:
        if glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise UserError(f"input pattern {item} matches nothing; check the path or quote the pattern")
            paths = [Path(m) for m in matches]
        else:
            path = Path(item)
            if not path.exists():
                raise UserError(f"input {item} does not exist; pass an existing file, directory or glob")
            paths = [path]
        for path in paths:
            if path.is_dir():
                files += sorted(p for p in path.rglob("*") if p.is_file() and _format(p))
            elif _format(path):
                files.append(path)
            elif not glob.has_magic(item):
                raise UserError(f"input {item} is not a .txt, .jsonl or .parquet file (optionally .gz); "
                                "rename it or convert it")
    if not files:
        raise UserError(f"no .txt, .jsonl or .parquet files found in {', '.join(inputs)}; check the paths")
    return files


def read_documents(inputs: Iterable[str], cfg: ReaderConfig, skips: SkipReport) -> Iterator[Document]:
    """Every good document of every input file, in order; bad ones go to ``skips``."""
    for path in resolve_inputs(inputs):
        fmt = _format(path)
        if fmt == ".parquet":
            raw = _parquet_texts(path, cfg.text_field)
        elif fmt == ".jsonl":
            raw = _jsonl_texts(path, cfg.text_field, skips)
        else:
            raw = _txt_texts(path, skips)
        for text, line in raw:
            if not text.strip():
                skips.skip(str(path), line, "empty")
            elif len(text) > cfg.max_doc_chars:
                skips.skip(str(path), line, "too_large", f"{len(text)} characters > reader.max_doc_chars")
            else:
                yield Document(text, str(path), line)


def _format(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def _open_binary(path: Path) -> IO[bytes]:
    fh = open(path, "rb")
    return gzip.GzipFile(fileobj=fh) if path.name.lower().endswith(".gz") else fh


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based number, raw bytes without the newline) of every line; a bad .gz is a UserError."""
    with _open_binary(path) as fh:
        try:
            for n, line in enumerate(fh, 1):
                yield n, line.rstrip(b"\r\n")
        except (gzip.BadGzipFile, EOFError, OSError) as err:
            raise UserError(f"input {path} is not a readable gzip file ({err}); re-compress or remove it")


def _txt_texts(path: Path, skips: SkipReport) -> Iterator[tuple[str, int]]:
    """Paragraph documents: lines up to a blank line. A block with invalid UTF-8 is skipped whole."""
    block: list[bytes] = []
    first = 0
    for n, line in _lines(path):
        if line.strip():
            if not block:
                first = n
            block.append(line)
            continue
        if block:
            yield from _decode_block(path, block, first, skips)
            block = []
    if block:
        yield from _decode_block(path, block, first, skips)


def _decode_block(path: Path, block: list[bytes], first: int, skips: SkipReport) -> Iterator[tuple[str, int]]:
    try:
        yield b"\n".join(block).decode("utf-8"), first
    except UnicodeDecodeError as err:
        skips.skip(str(path), first, "invalid_utf8", str(err))


def _jsonl_texts(path: Path, field: str, skips: SkipReport) -> Iterator[tuple[str, int]]:
    for n, line in _lines(path):
        if not line.strip():
            continue  # blank lines separate nothing in JSON Lines; not a document
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            skips.skip(str(path), n, "invalid_utf8", str(err))
            continue
        except json.JSONDecodeError as err:
            skips.skip(str(path), n, "malformed_json", str(err))
            continue
        text = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            skips.skip(str(path), n, "missing_field", f"no string field '{field}'")
            continue
        yield text, n


def _parquet_texts(path: Path, column: str) -> Iterator[tuple[str, int]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(_open_binary(path) if path.name.lower().endswith(".gz") else path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...
        raise UserError(f"input {path} is not a readable parquet file ({err}); rewrite or remove it")
    if column not in pf.schema_arrow.names:
        raise UserError(f"parquet file {path} has no column '{column}' (it has {', '.join(pf.schema_arrow.names)}); "
                        "set reader.text_field to the text column")
    row = 0
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            yield (text if isinstance(text, str) else ""), row
