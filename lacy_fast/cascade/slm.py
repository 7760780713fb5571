"""A loaded lacy-fast export (model + its tokenizer), and token helpers the cascade shares.

``load_model`` accepts an export directory (``OUT/export`` of a training run) or the run's
``out_dir`` itself (it then looks for ``out_dir/export``), and checks that the tokenizer
inside the export is the one the weights were trained with.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lacy_fast.data.tokenizer import Tokenizer
from lacy_fast.errors import UserError
from lacy_fast.model.gpt import GPT
from lacy_fast.model.io import load_export


@dataclass
class ExportedModel:
    """A lacy-fast model ready for inference (eval mode) with its tokenizer."""

    model: GPT
    tokenizer: Tokenizer
    meta: dict[str, Any]
    path: Path

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def label(self) -> str:
        """A short name: the run's directory for ``RUN/export``, else the export's own."""
        return self.path.parent.name if self.path.name == "export" else self.path.name


def resolve_export(path: str | Path) -> Path:
    """``path/export`` when ``path`` is a training run's out_dir (which has a config.json of
    its own, the run's), else ``path`` itself."""
    path = Path(path)
    if (path / "export" / "config.json").is_file():
        return path / "export"
    return path


def load_model(path: str | Path, device: torch.device | str = "cpu") -> ExportedModel:
    path = resolve_export(path)
    model, meta = load_export(path, device)
    tok_path = path / "tokenizer.model"
    if not tok_path.is_file():
        raise UserError(f"export {path} has no tokenizer.model; export the model again with its tokenizer")
    tok = Tokenizer.load(tok_path)
    if meta.get("tokenizer_sha256") not in (None, tok.sha256):
        raise UserError(f"{tok_path} is not the tokenizer export {path} was trained with (sha256 differs); "
                        "export the model again")
    if model.vocab_size != tok.vocab_size or meta.get("call_id") not in (None, tok.call_id):
        raise UserError(f"export {path} has a vocabulary of {model.vocab_size} with <CALL> id {meta.get('call_id')}, "
                        f"its tokenizer {tok.vocab_size} with id {tok.call_id}; export the model again")
    return ExportedModel(model, tok, meta, path)


def context_ids(tok: Tokenizer, text: str) -> list[int]:
    """The tokens a text is decoded from: EOS, then the text.

    Training packs documents back to back, each ended by EOS, so every document but the
    first of a sequence follows an EOS: starting from EOS puts a prompt where a document
    starts. The cascade's big models receive these contexts too (EOS first).
    """
    return [tok.eos_id] + tok.encode(text)


def context_text(tok: Tokenizer, ids: list[int]) -> str:
    """The text of a context (``context_ids`` plus what was generated), EOS left out."""
    return tok.decode(ids[1:])


def unfinished_bytes(tok: Tokenizer, ids: list[int]) -> int:
    """How many trailing byte pieces of ``ids`` spell a character not finished yet (0 to 3).

    An SLM spells a character it has no piece for in byte pieces; until the last byte is
    there, the decoded text ends in a replacement character that will still turn into
    another one. Trailing byte pieces are unfinished when they are a lead byte followed by
    fewer continuation bytes than it announces; anything else (a stray continuation byte)
    stays a replacement character for good. ``ids[:len(ids) - n]`` decodes to a text that
    only ever grows at its end as ``ids`` grows.
    """
    for n in (1, 2, 3):
        tail = ids[-n:]
        if len(ids) - n < 1 or not all(tok.sp.is_byte(i) for i in tail):
            break
        b = [int(tok.piece(i)[3:5], 16) for i in tail]  # "<0xC3>" -> 0xC3
        need = 2 if 0xC2 <= b[0] <= 0xDF else 3 if 0xE0 <= b[0] <= 0xEF else 4 if 0xF0 <= b[0] <= 0xF4 else 0
        if n < need and all(0x80 <= x <= 0xBF for x in b[1:]):
            return n
    return 0


def encode_continuation(tok: Tokenizer, text: str) -> list[int]:
    """Tokens that, appended to any tokens, add exactly ``text`` to their decoded text.

    SentencePiece prepends a space to what it encodes (the dummy prefix, which ``decode``
    drops again only at the start of a text). So ``encode(" Paris")`` spells "  Paris"
    mid-text, and ``encode("is")`` spells " is" where the text needs "is" glued to the
    word before. A leading space is therefore taken from the dummy prefix, and text that
    starts without one is encoded after a newline, which SentencePiece segments on its own
    (a byte piece here), and the pieces of " \\n" are dropped. Should a tokenizer merge the
    newline into what follows, the text is spelled in byte pieces, which every lacy-fast
    tokenizer has (byte fallback).
    """
    if not text:
        return []
    if text[0] == " ":
        return tok.encode(text[1:])
    head = tok.encode("\n")
    ids = tok.encode("\n" + text)
    if ids[:len(head)] == head and tok.decode(ids[len(head):]) == text:
        return ids[len(head):]
    return [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in text.encode("utf-8")]


def left_pad(rows: list[list[int]], pad: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of tokens as a left-padded block: ids (B, K) and valid (B, K); K = longest row (at least 1)."""
    k = max(1, max((len(r) for r in rows), default=0))
    ids = torch.full((len(rows), k), pad, dtype=torch.long)
    valid = torch.zeros((len(rows), k), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, k - len(r):] = torch.tensor(r, dtype=torch.long)
            valid[i, k - len(r):] = True
    return ids.to(device), valid.to(device)


def resolve_device(name: str) -> torch.device:
    """``--device``: cpu, cuda, cuda:N (refused, in one sentence, where there is no such device)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} but no CUDA device is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name} is not supported; use cpu or cuda")
    return device
