"""Memory-mapped token shards: one binary file per shard, versioned, tied to a tokenizer.

    write_shard("out/shard_00000.bin", docs, tokenizer)   # docs: [(ids, flags), ...]
    shard = Shard("out/shard_00000.bin", expect_sha256=tokenizer.sha256)
    shard.tokens, shard.flags, shard.doc_offsets            # memmaps
    shards = ShardSet("out")                                # a `lacy-fast prepare` output

A shard is a 128-byte header, the tokens, their flags (bit 0 fact, bit 1 judge) and the
document offsets; every document ends with EOS. Opening checks the header and the offsets;
token ids are checked lazily, one ``CHECK_BLOCK`` at a time. Corruption is one sentence
naming the file. docs/data.md has the byte layout, the checks and a prepared directory's
files. ``python -m lacy_fast.data.shards DIR [--docs N]`` prints decoded documents with
fact tokens as ``[[Warsaw]]`` and judge tokens as ``{{Warsaw}}``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lacy_fast.errors import UserError
from lacy_fast.fileio import atomic_path

MAGIC = b"LACYSHRD"
VERSION = 1
HEADER = struct.Struct("<8sIIQQII32s56x")
assert HEADER.size == 128
SHARD_RE = re.compile(r"^shard_(\d{5,})\.bin$")
CHECK_BLOCK = 1 << 20  # tokens per lazily range-checked block


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (halves the bytes read per step), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class Header:
    version: int
    itemsize: int
    n_tokens: int
    n_docs: int
    vocab_size: int
    tokenizer_sha256: str  # hex

    @property
    def flags_offset(self) -> int:
        return HEADER.size + self.n_tokens * self.itemsize

    @property
    def offsets_offset(self) -> int:
        return -(-(self.flags_offset + self.n_tokens) // 8) * 8

    @property
    def file_size(self) -> int:
        return self.offsets_offset + 8 * (self.n_docs + 1)


def write_shard(path: str | os.PathLike, docs: Sequence[tuple[np.ndarray, np.ndarray]], tokenizer_sha256: str,
                vocab_size: int) -> Header:
    """Write documents (ids, flags) as one shard, atomically (temporary name, then rename)."""
    dtype = token_dtype(vocab_size)
    lengths = np.fromiter((len(ids) for ids, _ in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)  # (D + 1,)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate([ids for ids, _ in docs]) if docs else np.zeros(0, dtype=np.uint32)
    flags = np.concatenate([f for _, f in docs]) if docs else np.zeros(0, dtype=np.uint8)
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise ValueError(f"token id {int(tokens.max())} >= vocab_size {vocab_size}")
    header = Header(VERSION, dtype.itemsize, len(tokens), len(docs), vocab_size, tokenizer_sha256)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(HEADER.pack(MAGIC, VERSION, dtype.itemsize, len(tokens), len(docs), vocab_size, 0,
                             bytes.fromhex(tokenizer_sha256)))
        fh.write(tokens.astype(dtype, copy=False).tobytes())
        fh.write(flags.astype(np.uint8, copy=False).tobytes())
        fh.write(b"\0" * (header.offsets_offset - header.flags_offset - len(tokens)))
        fh.write(offsets.tobytes())
    return header


def read_header(path: str | os.PathLike) -> Header:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(HEADER.size)
    except FileNotFoundError:
        raise UserError(f"shard {path} does not exist; run `lacy-fast prepare` to write it")
    if len(raw) < HEADER.size or raw[:8] != MAGIC:
        raise UserError(f"{path} is not a lacy-fast shard (bad magic); point at a `lacy-fast prepare` output")
    magic, version, itemsize, n_tokens, n_docs, vocab_size, _, sha = HEADER.unpack(raw)
    if version != VERSION:
        raise UserError(f"shard {path} has format version {version} but this lacy-fast reads version {VERSION}; "
                        "re-run `lacy-fast prepare` with this version into a new directory")
    header = Header(version, itemsize, n_tokens, n_docs, vocab_size, sha.hex())
    if (itemsize not in (2, 4) or vocab_size < 1 or itemsize != token_dtype(vocab_size).itemsize
            or path.stat().st_size != header.file_size):
        raise UserError(f"shard {path} is truncated or corrupt ({path.stat().st_size} bytes, header says "
                        f"{header.file_size}); delete it and rerun `lacy-fast prepare` to rewrite it")
    return header


class Shard:
    """One shard, read by memmap: ``tokens`` (N,), ``flags`` (N,) uint8, ``doc_offsets`` (D + 1,) int64."""

    def __init__(self, path: str | os.PathLike, expect_sha256: str | None = None):
        self.path = Path(path)
        self.header = h = read_header(self.path)
        if expect_sha256 is not None and h.tokenizer_sha256 != expect_sha256:
            raise UserError(
                f"shard {self.path} was written with another tokenizer (sha256 {h.tokenizer_sha256[:12]}..., "
                f"expected {expect_sha256[:12]}...); use the tokenizer.model that came with it, or re-run "
                "`lacy-fast prepare` into a new directory"
            )
        dtype = np.dtype(np.uint16) if h.itemsize == 2 else np.dtype(np.uint32)
        self.tokens = self._map(dtype, HEADER.size, h.n_tokens)
        self.flags = self._map(np.dtype(np.uint8), h.flags_offset, h.n_tokens)
        self.doc_offsets = self._map(np.dtype(np.int64), h.offsets_offset, h.n_docs + 1)
        offsets = np.asarray(self.doc_offsets)  # (D + 1,)
        negative = np.flatnonzero(np.diff(offsets) < 0)
        if offsets[0] != 0 or offsets[-1] != h.n_tokens or len(negative):
            where = (f"document {int(negative[0])} has a negative length" if len(negative) else
                     f"its document offsets run from {int(offsets[0])} to {int(offsets[-1])}, not 0 to {h.n_tokens}")
            raise UserError(f"shard {self.path} is corrupt ({where}); delete it and rerun `lacy-fast prepare` to "
                            "rewrite it")
        self._checked = np.zeros(-(-h.n_tokens // CHECK_BLOCK), dtype=bool)  # blocks of tokens range-checked

    def _map(self, dtype: np.dtype, offset: int, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=(count,))

    @property
    def n_docs(self) -> int:
        return self.header.n_docs

    @property
    def n_tokens(self) -> int:
        return self.header.n_tokens

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.doc_offsets)  # (D,) int64, EOS included

    def document(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = int(self.doc_offsets[d]), int(self.doc_offsets[d + 1])
        if hi > lo:
            self.check_tokens(lo, hi)
        return self.tokens[lo:hi], self.flags[lo:hi]

    def check_tokens(self, lo: int, hi: int) -> None:
        """Range-check the token ids of the blocks that [lo, hi) touches, once per block."""
        for block in range(lo // CHECK_BLOCK, (hi - 1) // CHECK_BLOCK + 1):
            if self._checked[block]:
                continue
            start = block * CHECK_BLOCK
            ids = self.tokens[start:start + CHECK_BLOCK]
            if int(ids.max()) >= self.header.vocab_size:
                at = start + int(np.argmax(ids >= self.header.vocab_size))
                raise UserError(f"shard {self.path} is corrupt (token {at} has id {int(self.tokens[at])}, past its "
                                f"vocabulary of {self.header.vocab_size}); delete it and rerun `lacy-fast prepare` "
                                "to rewrite it")
            self._checked[block] = True

    def sidecar_path(self, name: str) -> Path:
        return self.path.with_name(f"{self.path.stem}.{name}.npy")

    def sidecar(self, name: str) -> np.ndarray:
        """A per-token array ``shard_NNNNN.<name>.npy`` beside the shard, memory-mapped, (N,)."""
        path = self.sidecar_path(name)
        if not path.exists():
            raise UserError(f"shard {self.path} has no '{name}' sidecar ({path.name}); write it first")
        arr = np.load(path, mmap_mode="r")
        if arr.shape[:1] != (self.n_tokens,):
            raise UserError(f"sidecar {path} has {arr.shape[0] if arr.ndim else 0} rows but the shard has "
                            f"{self.n_tokens} tokens; rewrite the sidecar for this shard")
        return arr


def write_sidecar(shard: Shard, name: str, values: np.ndarray) -> Path:
    """Write a per-token array beside ``shard`` atomically; ``values`` is (n_tokens, ...)."""
    if values.shape[:1] != (shard.n_tokens,):
        raise ValueError(f"sidecar has {len(values)} rows, shard has {shard.n_tokens} tokens")
    path = shard.sidecar_path(name)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, values)
    return path


def shard_paths(directory: str | os.PathLike) -> list[Path]:
    directory = Path(directory)
    return sorted(p for p in directory.iterdir() if SHARD_RE.match(p.name))


class ShardSet:
    """Every shard of a ``lacy-fast prepare`` output, checked against its ``tokenizer.model``.

    ``n_docs``, ``total_tokens``, ``doc_lengths`` ((D,) int64 over all shards, EOS included),
    ``document(i)`` -> (tokens, flags) of global document ``i``; ``complete`` is False while a
    ``prepare`` into this directory has not finished (no stats.json yet).
    """

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise UserError(f"shard directory {self.dir} does not exist; run `lacy-fast prepare --out {self.dir}` first")
        tok = self.dir / "tokenizer.model"
        if not tok.exists():
            raise UserError(f"{self.dir} has no tokenizer.model; point at a `lacy-fast prepare` output directory")
        self.tokenizer_path = tok
        self.tokenizer_sha256 = file_sha256(tok)
        self.shards = [Shard(p, self.tokenizer_sha256) for p in shard_paths(self.dir)]
        if not self.shards:
            raise UserError(f"{self.dir} holds no shards; run `lacy-fast prepare --out {self.dir}` first")
        self.complete = (self.dir / "stats.json").exists()
        self.doc_lengths = np.concatenate([s.doc_lengths for s in self.shards])  # (D,)
        self.doc_starts = np.concatenate([[0], np.cumsum(self.doc_lengths)])  # (D + 1,) first token of each
        self.token_starts = np.cumsum([0] + [s.n_tokens for s in self.shards])  # (S + 1,) first token of each shard
        self._sidecars: dict[tuple[str, int], np.ndarray] = {}
        self._doc_start = np.cumsum([0] + [s.n_docs for s in self.shards])  # (S + 1,)
        self.n_docs = int(self._doc_start[-1])
        self.total_tokens = sum(s.n_tokens for s in self.shards)

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s = int(np.searchsorted(self._doc_start, i, side="right")) - 1
        return self.shards[s].document(i - int(self._doc_start[s]))

    def gather(self, name: str, ids: np.ndarray) -> np.ndarray:
        """The ``name`` sidecar's values at corpus token indices ``ids`` (any shape), from
        each shard's memory-mapped sidecar."""
        which = np.searchsorted(self.token_starts, ids, side="right") - 1  # the shard of each id
        out = None
        for s in np.unique(which):
            key = (name, int(s))
            if key not in self._sidecars:
                self._sidecars[key] = self.shards[s].sidecar(name)
            values = self._sidecars[key]
            out = np.empty(ids.shape, dtype=values.dtype) if out is None else out
            at = which == s
            out[at] = values[ids[at] - self.token_starts[s]]
        return out if out is not None else np.empty(ids.shape, dtype=np.float32)


MARKS = ((1, "[[", "]]"), (2, "{{", "}}"))  # (flag bit, open, close): spaCy facts, judge labels


def render(tokenizer, tokens: np.ndarray, flags: np.ndarray, bit: int = 1,
           marks: Sequence[tuple[int, str, str]] | None = None) -> str:
    """Decoded text with runs of flagged tokens wrapped in [[...]] (leading whitespace outside).

    ``marks``: (bit, open, close) per labeling, e.g. ``MARKS`` (facts [[...]], judge {{...}});
    default: ``bit`` alone as [[...]]. Runs of several labelings nest: where one ends inside
    another, the inner one is closed and reopened, so the brackets always pair up.
    """
    marks = list(marks) if marks is not None else [(bit, "[[", "]]")]
    pieces = tokenizer.decode_pieces(tokens)
    out: list[str] = []
    stack: list[int] = []  # indices into marks, outermost first
    for piece, flag in zip(pieces, flags):
        if not piece:  # a byte piece inside a character: the labels of its first piece hold
            continue
        want = [m for m, (b, _, _) in enumerate(marks) if flag & b]
        keep = 0
        while keep < len(stack) and stack[keep] in want:
            keep += 1
        for m in reversed(stack[keep:]):
            out.append(marks[m][2])
        del stack[keep:]
        opening = [m for m in want if m not in stack]
        if opening:
            stripped = piece.lstrip()
            out.append(piece[: len(piece) - len(stripped)] + "".join(marks[m][1] for m in opening))
            piece = stripped
            stack += opening
        out.append(piece)
    out += [marks[m][2] for m in reversed(stack)]
    return "".join(out)


def show(directory: str | os.PathLike, docs: int = 3, shard: int = 0, stream=None) -> None:
    """Print a shard set's summary and its first ``docs`` documents of shard ``shard``: fact
    tokens marked [[...]], judge tokens {{...}}."""
    from lacy_fast.data.tokenizer import Tokenizer

    stream = stream or sys.stdout
    shards = ShardSet(directory)
    tok = Tokenizer.load(shards.tokenizer_path)
    if not 0 <= shard < len(shards.shards):
        raise UserError(f"there is no shard {shard} in {directory}; it holds shards 0..{len(shards.shards) - 1}")
    facts = sum(int(np.count_nonzero(s.flags & 1)) for s in shards.shards)
    judged = sum(int(np.count_nonzero(s.flags & 2)) for s in shards.shards)
    total = max(shards.total_tokens, 1)
    print(f"{directory}: {len(shards.shards)} shards, {shards.n_docs} documents, {shards.total_tokens} tokens, "
          f"{facts / total:.1%} fact tokens [[...]], {judged / total:.1%} judge tokens {{{{...}}}}, vocabulary "
          f"{tok.vocab_size} (<CALL> = {tok.call_id}, EOS = {tok.eos_id})"
          f"{'' if shards.complete else ', prepare NOT finished'}", file=stream)
    s = shards.shards[shard]
    for d in range(min(docs, s.n_docs)):
        tokens, flags = s.document(d)
        print(f"\n--- {s.path.name} document {d} ({len(tokens)} tokens, {int(np.count_nonzero(flags & 1))} facts, "
              f"{int(np.count_nonzero(flags & 2))} judge)", file=stream)
        print(render(tok, tokens[:-1], flags[:-1], marks=MARKS), file=stream)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lacy_fast.data.shards",
                                     description="print documents of a prepare output with fact tokens marked [[...]], "
                                     "judge tokens {{...}}")
    parser.add_argument("dir", help="a `lacy-fast prepare` output directory")
    parser.add_argument("--docs", type=int, default=3, help="documents to print")
    parser.add_argument("--shard", type=int, default=0, help="which shard to print them from")
    args = parser.parse_args(argv)
    try:
        show(args.dir, args.docs, args.shard)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
