"""SentencePiece tokenizer with ``<CALL>`` reserved, and subword character offsets.

    tok = Tokenizer.train(texts, TokenizerConfig(vocab_size=32000), "out/tokenizer.model")
    tok = Tokenizer.load("out/tokenizer.model")
    ids, starts, ends = tok.encode_with_offsets("Born in Warsaw.")

Fixed ids of a tokenizer trained here (``Tokenizer.train``):

    0  <unk>   (never produced: byte fallback covers every character)
    1  </s>    EOS: ends every document in a shard
    2  <CALL>  a SentencePiece *control* symbol, so it never matches raw text: the string
               "<CALL>" in a document encodes as ordinary pieces ("<", "C", ...)
    3..258     the 256 byte-fallback pieces <0x00>..<0xFF>

There is no BOS (``bos_id == -1``) and no padding id: documents are separated by EOS only,
GPT-2 style. ``vocab_size`` counts every piece, ``<CALL>`` included.

Why identity normalisation and no whitespace collapsing: the fact labels are projected onto
subwords by character offsets in the *original* text, so the tokenizer must be lossless
(``decode(encode(t)) == t``). With NFKC and whitespace collapsing SentencePiece rewrites the
text first ("ﬁ" -> "fi", "a   b" -> "a b") and piece lengths no longer add up to the
original. A lossless model lets ``encode_with_offsets`` compute offsets from piece byte
lengths alone (vectorised, no protobuf), and lets a reader check labels by decoding. A
loaded model must be lossless too; one that is not is refused with a sentence saying why.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm

from lacy_fast.config import TokenizerConfig
from lacy_fast.errors import UserError
from lacy_fast.fileio import write_bytes

CALL = "<CALL>"
UNK_ID, EOS_ID, CALL_ID = 0, 1, 2  # ids of a tokenizer trained by Tokenizer.train
_SPACE = "\u2581"  # SentencePiece's whitespace marker

# Text a lossless tokenizer must round-trip: runs of whitespace, a leading space, a tab and
# a newline, NFKC-sensitive characters (ligature, full-width letter, superscript), emoji.
_PROBE = "  Zürich\t\n\n ﬁ Ａ x²  O'Neil-Smith 1,234.5 😀 <CALL>"


class Tokenizer:
    """A loaded SentencePiece model whose ``<CALL>`` id and EOS id are known.

    Attributes: ``path`` (the .model file), ``sha256`` (hex digest of its bytes: shards
    record it and refuse another tokenizer), ``vocab_size`` (<CALL> included), ``call_id``,
    ``eos_id``, ``bos_id`` (-1: unused), ``unk_id``.
    """

    def __init__(self, path: str | os.PathLike, model: bytes):
        self.path = Path(path)
        self.sha256 = hashlib.sha256(model).hexdigest()
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        self.vocab_size = self.sp.get_piece_size()
        self.call_id = self.sp.piece_to_id(CALL)
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id()
        self.unk_id = self.sp.unk_id()
        if self.call_id == self.unk_id or not self.sp.is_control(self.call_id):
            raise UserError(
                f"tokenizer {self.path} has no {CALL} control symbol; let `lacy-fast prepare` train one "
                f"(omit --tokenizer) or train yours with control_symbols=['{CALL}']"
            )
        if self.eos_id < 0:
            raise UserError(f"tokenizer {self.path} has no EOS id; train it with eos_id >= 0 (lacy-fast uses 1)")
        if self.sp.decode(self.sp.encode(_PROBE)) != _PROBE:
            raise UserError(
                f"tokenizer {self.path} does not reproduce its input text (it normalises Unicode or collapses "
                "whitespace), so fact labels cannot be mapped onto its subwords; train it with "
                "normalization_rule_name=identity, remove_extra_whitespaces=false and byte_fallback=true"
            )
        # Bytes of the original text each piece stands for: the marker is one space, a byte
        # piece one byte, control pieces nothing. (V,) int32.
        nbytes = np.zeros(self.vocab_size, dtype=np.int32)
        for i in range(self.vocab_size):
            if self.sp.is_byte(i):
                nbytes[i] = 1
            elif not (self.sp.is_control(i) or self.sp.is_unknown(i)):
                nbytes[i] = len(self.sp.id_to_piece(i).replace(_SPACE, " ").encode("utf-8"))
        self._nbytes = nbytes
        self._dummy_prefix = self.sp.encode("a", out_type=str)[0].startswith(_SPACE)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        try:
            model = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"tokenizer {path} does not exist; pass an existing SentencePiece .model file")
        except IsADirectoryError:
            raise UserError(f"tokenizer {path} is a directory; pass the .model file inside it")
        try:
            return cls(path, model)
        except RuntimeError as err:  # sentencepiece's parse error
            raise UserError(f"tokenizer {path} is not a SentencePiece model ({err}); pass a .model file")

    @classmethod
    def train(cls, texts: Iterable[str], cfg: TokenizerConfig, out_path: str | os.PathLike) -> "Tokenizer":
        """Train on ``texts`` (each split into lines) and write the model atomically to ``out_path``.

        Training sees lines, not whole documents: SentencePiece drops sentences longer than
        ``max_sentence_length`` bytes. Newlines themselves then encode as the byte piece
        <0x0A>: one token, like a learned newline piece would be.
        """
        lines = (line for text in texts for line in text.split("\n") if line.strip())
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines,
                model_writer=model,
                vocab_size=cfg.vocab_size,
                model_type=cfg.model_type,
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=True,
                unk_id=UNK_ID, eos_id=EOS_ID, bos_id=-1, pad_id=-1,
                control_symbols=[CALL],
                max_sentence_length=16384,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as err:
            raise UserError(
                f"SentencePiece could not train a tokenizer of {cfg.vocab_size} pieces on this corpus ({err}); "
                "lower --vocab-size or give more text"
            )
        write_bytes(out_path, model.getvalue())
        tok = cls(out_path, model.getvalue())
        assert tok.call_id == CALL_ID and tok.eos_id == EOS_ID, (tok.call_id, tok.eos_id)
        return tok

    # -- encoding -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ids and the character span ``[start, end)`` of each piece in ``text``.

        The span excludes leading whitespace (the marker "▁" and any run of spaces a piece
        carries), so "▁Warsaw" in "born in Warsaw" spans "Warsaw" only and a pure whitespace
        piece has an empty span. The pieces of one multi-byte character (byte fallback) all
        span that character. Returns three (T,) arrays: ids int32, starts int64, ends int64.
        """
        return self.offsets(text, self.sp.encode(text))

    def encode_batch_with_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return [self.offsets(t, ids) for t, ids in zip(texts, self.sp.encode(texts))]

    def offsets(self, text: str, ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``encode_with_offsets`` for ids already encoded from ``text``."""
        ids_a = np.asarray(ids, dtype=np.int32)  # (T,)
        raw = text.encode("utf-8")
        lengths = self._nbytes[ids_a].astype(np.int64)  # (T,) bytes of the original per piece
        prefix = 1 if self._dummy_prefix else 0
        if int(lengths.sum()) != len(raw) + prefix:
            # Only a literal "▁" in the text (3 bytes, but decoded as a space) gets here.
            lengths = self._lengths_by_walking(text, ids)
        byte_end = np.cumsum(lengths) - prefix  # (T,) in raw, the dummy space at -1
        byte_start = byte_end - lengths
        np.clip(byte_start, 0, None, out=byte_start)
        np.clip(byte_end, 0, None, out=byte_end)
        if len(raw) == len(text):  # ASCII: bytes are characters
            char_of_byte = None
            starts, ends = byte_start, byte_end
        else:
            b = np.frombuffer(raw, dtype=np.uint8)
            # Index of the character each byte belongs to; one extra slot for the end. (B+1,)
            char_of_byte = np.empty(len(raw) + 1, dtype=np.int64)
            char_of_byte[:-1] = np.cumsum((b & 0xC0) != 0x80) - 1
            char_of_byte[-1] = len(text)
            starts = char_of_byte[byte_start]
            # A piece ends after the character holding its last byte.
            ends = np.where(byte_end > byte_start, char_of_byte[np.maximum(byte_end - 1, 0)] + 1, starts)
        # Skip leading whitespace: move each start to the first non-space character >= it.
        if text:
            nonspace = np.flatnonzero(~_is_space(text))  # (N,) positions of non-space characters
            nonspace = np.append(nonspace, len(text))
            first = nonspace[np.searchsorted(nonspace, starts)]
            starts = np.minimum(first, ends)
        return ids_a, starts.astype(np.int64), ends.astype(np.int64)

    def _lengths_by_walking(self, text: str, ids: list[int]) -> np.ndarray:
        """Piece byte lengths when the text holds "▁" itself: each marker matches ' ' or '▁'."""
        raw = text.encode("utf-8")
        pos = -1 if self._dummy_prefix else 0
        out = np.zeros(len(ids), dtype=np.int64)
        for k, i in enumerate(ids):
            if self.sp.is_byte(i):
                n = 1
            elif self.sp.is_control(i) or self.sp.is_unknown(i):
                n = 0
            else:
                n = 0
                for ch in self.sp.id_to_piece(i):
                    if ch == _SPACE and pos + n >= 0 and raw.startswith(_SPACE.encode(), pos + n):
                        n += 3
                    else:
                        n += len((" " if ch == _SPACE else ch).encode("utf-8"))
            out[k] = n
            pos += n
        return out

    # -- decoding -------------------------------------------------------------------------
    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def piece(self, id: int) -> str:
        return self.sp.id_to_piece(int(id))

    def decode_pieces(self, ids: Iterable[int]) -> list[str]:
        """The text each id stands for, in order, so that ``"".join(...) == decode(ids)``.

        Byte pieces of one character are joined into the first of them (the others get "").
        Used by the shard inspector to mark fact tokens inside decoded text.
        """
        ids = [int(i) for i in ids]
        out: list[str] = []
        pending = bytearray()
        pending_at = -1
        for k, i in enumerate(ids):
            if self.sp.is_byte(i):
                if not pending:
                    pending_at = len(out)
                pending.append(int(self.sp.id_to_piece(i)[3:5], 16))
                out.append("")
                text = pending.decode("utf-8", errors="ignore")
                if text:  # a complete character
                    out[pending_at] = text
                    pending.clear()
                continue
            if pending:  # an incomplete byte sequence: shown as the replacement character
                out[pending_at] = pending.decode("utf-8", errors="replace")
                pending.clear()
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                out.append("" if i == self.eos_id else self.sp.id_to_piece(i))
            else:
                out.append(self.sp.id_to_piece(i).replace(_SPACE, " "))
        if pending:
            out[pending_at] = pending.decode("utf-8", errors="replace")
        if self._dummy_prefix:
            for k, piece in enumerate(out):
                if piece:
                    out[k] = piece[1:] if piece.startswith(" ") else piece
                    break
        return out


def _is_space(text: str) -> np.ndarray:
    """(len(text),) bool: character is whitespace (str.isspace)."""
    if text.isascii():
        b = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        return (b == 32) | ((b >= 9) & (b <= 13)) | ((b >= 28) & (b <= 31))
    return np.fromiter((c.isspace() for c in text), dtype=bool, count=len(text))
