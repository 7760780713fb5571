"""Big models the SLM calls: the ``BigModel`` protocol and its three implementations.

    big = load_big("runs/big/export")          # LacyBig: same tokenizer, next token
    big = load_big("hf/gpt2-like")             # HFBig: any tokenizer, next word as text
    big = load_big("oracle:synth/facts.jsonl") # OracleBig: the fact table, an upper bound

A big model serves one batch of rows at a time. ``begin`` opens a batch (the SLM's
tokenizer and the rows' contexts: SLM token ids, EOS first, see ``slm.context_ids``).
``propose(calling, contexts)`` receives the contexts of *every* row of the batch, in batch
order, and the indices of the rows that call; it returns, per calling row, the SLM tokens
to append (one or more) or None when it declines (the SLM then emits its own token).
``keep(index)`` drops rows that finished, as the cascade drops them from its own cache.

Caches persist across calls: a big model reads each context token once. At a call it
first catches up, in one batched forward, with the tokens every row gained since the last
call (all rows, not only the calling ones: one cache for the batch keeps a single length,
and calls are frequent enough at realistic budgets that rows would need reading soon
anyway), left-padded as a block whose padding the attention masks out. Rows that ran past
a big model's context are declined from then on. The methods run under
``torch.inference_mode`` themselves, so the state they keep is never part of a graph.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Protocol

import torch

from lacy_fast.cascade.slm import (ExportedModel, context_text, encode_continuation, left_pad,
                                   load_model, resolve_export, unfinished_bytes)
from lacy_fast.data.facts import FactTable, Person
from lacy_fast.data.synth import CUES
from lacy_fast.data.tokenizer import Tokenizer
from lacy_fast.errors import UserError
from lacy_fast.hf_lm import context_limit, load_causal_lm, pad_id
from lacy_fast.model.io import export_meta


class BigModel(Protocol):
    name: str
    handoff: str  # what one answered call supplies: "token", "word" or "value"

    def begin(self, tokenizer: Tokenizer, prompts: list[str], contexts: list[list[int]]) -> None:
        """Open a batch: the SLM's tokenizer, the prompts and their contexts (EOS first)."""
        ...

    def propose(self, calling: list[int], contexts: list[list[int]]) -> list[list[int] | None]:
        """SLM tokens to append for each calling row (None: declined). ``contexts``: all rows."""
        ...

    def keep(self, index: list[int]) -> None:
        """Keep only rows ``index`` of the batch, in that order."""
        ...


class LacyBig:
    """Another lacy-fast model on the same tokenizer: it supplies the next token.

    Greedy over its vocabulary with <CALL> excluded (a big model has nobody to call).
    """

    def __init__(self, big: ExportedModel):
        self.big = big
        self.name = str(big.path)
        self.handoff = "token"

    @torch.inference_mode()
    def begin(self, tokenizer: Tokenizer, prompts: list[str], contexts: list[list[int]]) -> None:
        if tokenizer.sha256 != self.big.tokenizer.sha256:
            raise UserError(f"big model {self.big.path} was trained with another tokenizer than the SLM; a lacy-fast "
                            "big model must share the SLM's tokenizer (train both on one `prepare` output), or pass "
                            "a Hugging Face model directory for a text-level handoff")
        model = self.big.model
        batch = len(contexts)
        self.cache = model.new_cache(batch, max(len(c) for c in contexts) + 32)
        self.seen = [0] * batch  # context tokens each row has fed
        self.hidden = torch.zeros(batch, model.cfg.d_model, device=model.wte.weight.device,
                                  dtype=model.wte.weight.dtype)  # (B, D) after each row's last fed token

    @torch.inference_mode()
    def propose(self, calling: list[int], contexts: list[list[int]]) -> list[list[int] | None]:
        model = self.big.model
        limit = model.cfg.max_seq_len
        new = [c[s:] if len(c) <= limit else [] for c, s in zip(contexts, self.seen)]
        if any(new):
            ids, valid = left_pad(new, self.big.tokenizer.eos_id, self.hidden.device)  # (B, K)
            self.cache.reserve(ids.shape[1])
            hidden = model(ids, cache=self.cache, valid=valid)[:, -1]  # (B, D)
            fed = valid[:, -1]  # (B,) left padding: a row with new tokens has its last one in the last slot
            self.hidden[fed] = hidden[fed]
            self.seen = [s + len(n) for s, n in zip(self.seen, new)]
        rows = torch.tensor(calling, device=self.hidden.device)
        logits = model.logits(self.hidden[rows]).float()  # (C, V)
        logits[:, self.big.tokenizer.call_id] = float("-inf")
        tokens = logits.argmax(-1).tolist()
        return [[t] if self.seen[r] == len(contexts[r]) else None for r, t in zip(calling, tokens)]

    @torch.inference_mode()
    def keep(self, index: list[int]) -> None:
        self.cache.reorder(torch.tensor(index, device=self.hidden.device))
        self.hidden = self.hidden[index]
        self.seen = [self.seen[i] for i in index]


_WORD_END = re.compile(r"\S\s")
_NEXT_WORD = re.compile(r"\s*\S*")  # leading spaces, then the word (a non-empty text always matches it)


class HFBig:
    """A Hugging Face causal LM with its own tokenizer: text-level handoff of the next word.

    At a call the big model reads, as text, what each row gained since it last read it
    (re-tokenized with its tokenizer; a row's first chunk with the tokenizer's special
    tokens, e.g. BOS, later chunks without), then continues greedily, one token at a time,
    up to the end of the next word: the continuation stops before the first whitespace that
    follows a non-space character (so a word keeps its leading space and trailing
    punctuation, "born in| Tolmere.| She"), at EOS, or after ``max_word_tokens`` tokens.
    The word is re-tokenized for the SLM (``encode_continuation``).

    ``past_key_values`` and a (B, S) attention mask persist across calls; a token is fed to
    the cache only if its whole text belongs to the word, so the token that runs past the
    word's end (usually the next word's " He") is never cached, and a word's tail that a
    token spans only in part is read back at the next call like any SLM text. Positions are
    counted per row from the mask, so padding takes no position. The text a row's cached
    tokens spell is kept to find what is new; chunk seams can tokenize differently from the
    whole text (the big model sees a valid, not always canonical, tokenization). A row
    whose text ends in a character the SLM has spelled only in part (byte pieces,
    ``slm.unfinished_bytes``) is declined: the word would land inside the character; the
    big model reads the character once it is complete.
    """

    def __init__(self, model: Any, tokenizer: Any, path: Path, max_word_tokens: int = 8):
        self.model = model
        self.tok = tokenizer
        self.name = str(path)
        self.handoff = "word"
        self.max_word_tokens = max_word_tokens
        self.max_positions = context_limit(model.config)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = pad_id(tokenizer)
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", max_word_tokens: int = 8) -> "HFBig":
        model, tokenizer = load_causal_lm(path, device, flag=f"--big {path}")
        return cls(model, tokenizer, Path(path), max_word_tokens)

    @torch.inference_mode()
    def begin(self, tokenizer: Tokenizer, prompts: list[str], contexts: list[list[int]]) -> None:
        batch = len(contexts)
        self.slm_tok = tokenizer
        self.past: Any = None
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=self.device)  # (B, S) 1 = cached token
        self.n_pos = torch.zeros(batch, dtype=torch.long, device=self.device)  # (B,) real tokens cached
        self.logits: torch.Tensor | None = None  # (B, V) next-token logits after each row's last cached token
        self.read = [""] * batch  # the text each row's cached tokens spell
        self.started = [False] * batch
        self.stopped = [False] * batch  # out of positions (or out of step with the SLM's text): declines

    @torch.inference_mode()
    def keep(self, index: list[int]) -> None:
        idx = torch.tensor(index, device=self.device)
        if self.past is not None:
            self.past.batch_select_indices(idx)
        self.mask, self.n_pos = self.mask[idx], self.n_pos[idx]
        if self.logits is not None:
            self.logits = self.logits[idx]
        self.read = [self.read[i] for i in index]
        self.started = [self.started[i] for i in index]
        self.stopped = [self.stopped[i] for i in index]

    @torch.inference_mode()
    def propose(self, calling: list[int], contexts: list[list[int]]) -> list[list[int] | None]:
        unfinished = self._catch_up(contexts)
        words = self._next_words([r for r in calling if not (self.stopped[r] or unfinished[r]) and self.started[r]])
        out: list[list[int] | None] = []
        for r in calling:
            word, ended = words.get(r, ("", False))
            if word == "" and ended:  # the big model ends the text here
                out.append([self.slm_tok.eos_id])
            else:
                out.append(encode_continuation(self.slm_tok, word) or None)
        return out

    # -- internals --------------------------------------------------------------------------
    def _catch_up(self, contexts: list[list[int]]) -> list[bool]:
        """Read what each row gained; returns, per row, whether it ends in an unfinished character."""
        chunks: list[list[int]] = []
        unfinished = []
        for r, ids in enumerate(contexts):
            n = unfinished_bytes(self.slm_tok, ids)
            unfinished.append(n > 0)
            text = context_text(self.slm_tok, ids[:len(ids) - n])
            chunk: list[int] = []
            if not text.startswith(self.read[r]):
                self.stopped[r] = True
            elif not self.stopped[r] and (len(text) > len(self.read[r]) or not self.started[r]):
                new = text[len(self.read[r]):]
                chunk = self.tok(new, add_special_tokens=not self.started[r])["input_ids"]
                if int(self.n_pos[r]) + len(chunk) > self.max_positions:
                    self.stopped[r], chunk = True, []
                elif chunk:
                    self.read[r], self.started[r] = text, True
            chunks.append(chunk)
        self._feed(chunks)
        return unfinished

    def _next_words(self, rows: list[int]) -> dict[int, tuple[str, bool]]:
        """Greedy continuation of ``rows`` up to the end of the next word: row -> (word, ended by EOS)."""
        words: dict[int, tuple[str, bool]] = {}
        generated: dict[int, list[int]] = {r: [] for r in rows}
        active = list(rows)
        for _ in range(self.max_word_tokens):
            if not active:
                break
            assert self.logits is not None  # rows that started have been read: their logits are there
            tokens = self.logits[active].argmax(-1).tolist()
            feed: list[list[int]] = [[] for _ in range(len(self.read))]
            still = []
            for r, t in zip(active, tokens):
                before = self._decode(generated[r])
                if t == self.eos_id:
                    words[r] = (before, True)
                    continue
                text = self._decode(generated[r] + [t])
                end = _WORD_END.search(text)
                if end is not None:  # t runs past the word: keep its part up to the end, don't cache t
                    words[r] = (text[:end.start() + 1], False)
                    continue
                if int(self.n_pos[r]) + 1 > self.max_positions:
                    words[r] = (text, False)
                    continue
                generated[r].append(t)
                self.read[r] += text[len(before):]
                feed[r] = [t]
                still.append(r)
            self._feed(feed)
            active = still
        for r in active:  # max_word_tokens reached
            words[r] = (self._decode(generated[r]), False)
        return words

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True) if ids else ""

    def _feed(self, chunks: list[list[int]]) -> None:
        """One forward of each row's new tokens (left-padded block); updates cache, mask and logits."""
        if not any(chunks):
            return
        ids, valid = left_pad(chunks, self.pad_id, self.device)  # (B, K)
        block = valid.long()  # (B, K)
        positions = (self.n_pos[:, None] + block.cumsum(1) - 1).clamp(min=0)  # (B, K)
        mask = torch.cat([self.mask, block], 1)  # (B, S + K)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.past,
                         use_cache=True)
        self.past, self.mask = out.past_key_values, mask
        self.n_pos += block.sum(1)
        last = out.logits[:, -1].float()  # (B, V)
        if self.logits is None:
            self.logits = torch.zeros_like(last)
        fed = valid[:, -1]  # (B,) left padding: a row with new tokens has its last one in the last slot
        self.logits[fed] = last[fed]


class OracleBig:
    """The fact table answers (``oracle:FACTS``, one word per call; ``oracle-value:FACTS``, the
    whole rest of the value: the upper bound).

    The person is the one whose full name the prompt holds (``FactTable.person_in``). At a
    call, the attribute is named by the last cue in the row's text (``synth.CUES``: "was
    born in" -> birth_place), and the oracle answers provided the text after the cue is a
    (possibly empty) beginning of " " + value. Otherwise (no person, no cue, a cue whose
    value is complete or contradicted, an attribute the person lacks) it declines and the
    SLM continues without calling.

    Granularity (``handoff``):
    - ``word`` (the default, the paper's handoff): the next word of the value, as the
      paper's big model, on another tokenizer, answers one word per call: a word keeps its
      leading space, and a word the SLM has begun is completed. For the value
      " 12 March 1950": " 12" after the cue, " March" after " 12", "2" after " 1". A
      multi-word value needs one call per word, so the SLM's calling decides every word.
    - ``value``: the whole rest of the value at one call (" 12 March 1950" after the cue).
      One answered call states one whole fact: an upper bound on what a call can bring,
      not the paper's partner.
    """

    HANDOFFS = ("word", "value")

    def __init__(self, table: FactTable, handoff: str = "word"):
        if handoff not in self.HANDOFFS:
            raise UserError(f"oracle handoff {handoff!r} is not one of {', '.join(self.HANDOFFS)}")
        self.table = table
        self.handoff = handoff
        self.name = f"{'oracle' if handoff == 'word' else 'oracle-value'}:{table.path}"
        cues = sorted(CUES, key=len, reverse=True)
        self.cue_re = re.compile(r"(?<![^\W_])(?:" + "|".join(map(re.escape, cues)) + r")(?![^\W_])")

    def begin(self, tokenizer: Tokenizer, prompts: list[str], contexts: list[list[int]]) -> None:
        self.tok = tokenizer
        self.people = [self.table.person_in(p) for p in prompts]

    def keep(self, index: list[int]) -> None:
        self.people = [self.people[i] for i in index]

    def propose(self, calling: list[int], contexts: list[list[int]]) -> list[list[int] | None]:
        out = []
        for r in calling:
            rest = self.answer(self.people[r], context_text(self.tok, contexts[r]))
            out.append(encode_continuation(self.tok, rest) if rest else None)
        return out

    def answer(self, person: Person | None, text: str) -> str | None:
        """The text the oracle supplies after ``text`` (None: it declines)."""
        if person is None:
            return None
        last = None
        for last in self.cue_re.finditer(text):
            pass
        if last is None or (value := person.facts.get(CUES[last.group()])) is None:
            return None
        target, tail = " " + value, text[last.end():]
        if len(tail) >= len(target) or not target.startswith(tail):
            return None
        rest = target[len(tail):]
        return rest if self.handoff == "value" else _NEXT_WORD.match(rest).group()


def load_big(spec: str | None, device: torch.device | str = "cpu", max_word_tokens: int = 8) -> BigModel | None:
    """``--big``: none, oracle:FACTS (one word per call), oracle-value:FACTS (the whole value,
    the upper bound), a lacy-fast export (or run out_dir), or a local HF model directory."""
    if spec is None or spec in ("", "none"):
        return None
    for prefix, handoff in (("oracle:", "word"), ("oracle-word:", "word"), ("oracle-value:", "value")):
        if spec.startswith(prefix):
            return OracleBig(FactTable.read(spec[len(prefix):]), handoff)
    hint = ("pass a lacy-fast export (OUT/export), a local Hugging Face model directory, oracle:FACTS, "
            "oracle-value:FACTS or none")
    path = Path(spec)
    if not path.is_dir():
        raise UserError(f"--big {spec} is not a directory; {hint}")
    export = resolve_export(path)
    config = export / "config.json"
    try:
        meta = json.loads(config.read_text()) if config.is_file() else {}
    except json.JSONDecodeError:
        raise UserError(f"--big {spec}: {config} is not valid JSON; {hint}")
    if export_meta(meta) is not None:  # a lacy-fast export is a Hugging Face directory too: same tokenizer first
        return LacyBig(load_model(export, device))
    if "model_type" in meta or "architectures" in meta:
        return HFBig.load(path, device, max_word_tokens)
    raise UserError(f"--big {spec} is neither a lacy-fast export nor a Hugging Face model (no config.json with a "
                    f"model_type); {hint}")
