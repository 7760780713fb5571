"""Cascade generation: the SLM decodes and, where its call rule says so, a big model speaks.

    cascade = Cascade(load_model("runs/lacy"), load_big("oracle:synth/facts.jsonl"), CascadeConfig())
    for g in cascade.generate(["Thynoxine Nahoxski"]):
        print(g.marked())   # "Thynoxine Nahoxski was born in[[ Tolmere]]. ..."

Per step, for every unfinished row at once: the SLM's logits and call score, the call rule,
then the row's own token or the big model's, fed back through the SLM's KV cache. Finished
rows leave the batch. Counts per generation: ``steps``, ``calls``, ``answered``;
``call_rate`` = calls / steps. docs/cascade.md walks through one step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lacy_fast.cascade.big import BigModel
from lacy_fast.cascade.calibration import Calibration
from lacy_fast.cascade.rules import NeverRule, call_scores, make_rule, ranked_score, resolve_score
from lacy_fast.cascade.slm import ExportedModel, context_ids, left_pad
from lacy_fast.config import CascadeConfig
from lacy_fast.errors import UserError
from lacy_fast.progress import Progress


@dataclass
class Generation:
    prompt: str
    text: str  # the continuation (prompt + text is the whole text)
    tokens: list[int]  # SLM ids of the continuation (EOS last if it ended there)
    from_big: list[bool]  # per token: supplied by the big model
    spans: list[tuple[int, int]]  # character spans of ``text`` the big model supplied
    steps: int
    calls: int
    answered: int
    finish: str  # "eos" or "length"

    @property
    def call_rate(self) -> float:
        return self.calls / self.steps if self.steps else 0.0

    def marked(self, left: str = "[[", right: str = "]]") -> str:
        """Prompt and continuation with the big model's spans between ``left`` and ``right``."""
        out, pos = [self.prompt], 0
        for start, end in self.spans:
            out += [self.text[pos:start], left, self.text[start:end], right]
            pos = end
        out.append(self.text[pos:])
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "text": self.text, "marked": self.marked(),
                "called_spans": [list(s) for s in self.spans], "tokens": len(self.tokens),
                "big_tokens": sum(self.from_big), "steps": self.steps, "calls": self.calls,
                "answered": self.answered, "call_rate": self.call_rate, "finish": self.finish}


@dataclass
class _Row:
    prompt: str
    ids: list[int]  # context: EOS, prompt, then everything generated
    prompt_len: int  # len(context) before generation
    limit: int  # tokens it may generate
    from_big: list[bool] = field(default_factory=list)
    steps: int = 0
    calls: int = 0
    answered: int = 0
    finish: str | None = None

    def append(self, new: list[int], big: bool, eos: int) -> list[int]:
        """Append ``new`` (cut at the length limit and after EOS); returns what was appended."""
        new = new[: self.limit - len(self.from_big)]
        if eos in new:
            new = new[: new.index(eos) + 1]
            self.finish = "eos"
        self.ids += new
        self.from_big += [big] * len(new)
        if self.finish is None and len(self.from_big) >= self.limit:
            self.finish = "length"
        return new


class Cascade:
    """The SLM with a big model to call (``big=None``: the SLM alone, nothing calls).

    The call rule lives as long as the cascade: the budget rule's running quantile
    calibrates over every batch it decodes. ``score`` is the call score it ranks, resolved
    from ``cfg.score`` and the SLM's training strategy (the budget rule ranks p(<CALL>) by
    its log-odds: ``rules.ranked_score``). ``score=combined`` needs ``calibration``
    (``calibration.calibrate``).
    """

    def __init__(self, slm: ExportedModel, big: BigModel | None, cfg: CascadeConfig,
                 device: torch.device | str = "cpu", calibration: Calibration | None = None):
        self.slm, self.big, self.cfg = slm, big, cfg
        self.device = torch.device(device)
        self.rule = make_rule(cfg) if big is not None else NeverRule()
        self.score = resolve_score(cfg.score, slm.meta.get("strategy"))
        self.ranked = ranked_score(self.score, cfg.rule)
        if self.score == "combined" and calibration is None:
            raise UserError("score combined ranks p(CALL) and the entropy against a calibration on training "
                            "documents; use `lacy-fast eval` (it calibrates on corpus.jsonl beside --facts) or "
                            "another --score")
        self.calibration = calibration
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)

    def call_score(self, logits: torch.Tensor) -> torch.Tensor:
        """(b, V) fp32 logits -> (b,) the score the rule ranks."""
        if self.ranked == "combined":
            assert self.calibration is not None
            return self.calibration.combined(logits, self.slm.tokenizer.call_id)
        return call_scores(logits, self.slm.tokenizer.call_id, (self.ranked,))[self.ranked]

    @torch.inference_mode()
    def generate(self, prompts: list[str], progress: Progress | None = None) -> list[Generation]:
        out: list[Generation] = []
        for start in range(0, len(prompts), self.cfg.batch_size):
            out += self._batch(prompts[start:start + self.cfg.batch_size], progress)
        return out

    def _batch(self, prompts: list[str], progress: Progress | None) -> list[Generation]:
        model, tok = self.slm.model, self.slm.tokenizer
        rows = []
        for p in prompts:
            ids = context_ids(tok, p)
            room = model.cfg.max_seq_len - len(ids)
            if room < 1:
                raise UserError(f"prompt {p[:40]!r} is {len(ids)} tokens, the SLM's context holds "
                                f"{model.cfg.max_seq_len}; shorten the prompt")
            rows.append(_Row(p, ids, len(ids), min(self.cfg.max_new_tokens, room)))
        ids, valid = left_pad([r.ids for r in rows], tok.eos_id, self.device)  # (B, P)
        cache = model.new_cache(len(rows), ids.shape[1] + self.cfg.max_new_tokens)
        hidden = model(ids, cache=cache, valid=valid)[:, -1]  # (B, D)
        if self.big is not None:
            self.big.begin(tok, prompts, [r.ids for r in rows])
        live = list(rows)
        while True:
            logits = model.logits(hidden).float()  # (b, V)
            score = self.call_score(logits)  # (b,)
            calls = self.rule.decide(score, logits.argmax(-1) == tok.call_id).tolist()
            own = self._own_tokens(logits).tolist()
            calling = [i for i, c in enumerate(calls) if c]
            answers = dict(zip(calling, self.big.propose(calling, [r.ids for r in live]))) if calling else {}
            feed = []
            for i, row in enumerate(live):
                row.steps += 1
                row.calls += calls[i]
                answer = answers.get(i) or None  # an empty answer is a decline too
                row.answered += answer is not None
                feed.append(row.append(answer if answer is not None else [own[i]], answer is not None, tok.eos_id))
            keep = [i for i, r in enumerate(live) if r.finish is None]
            if progress is not None and len(keep) < len(live):
                progress.update(len(live) - len(keep))
            if not keep:
                break
            if len(keep) < len(live):
                cache.reorder(torch.tensor(keep, device=self.device))
                if self.big is not None:
                    self.big.keep(keep)
                live, feed = [live[i] for i in keep], [feed[i] for i in keep]
            block, valid = left_pad(feed, tok.eos_id, self.device)  # (b, K)
            cache.reserve(block.shape[1])
            hidden = model(block, cache=cache, valid=valid)[:, -1]  # (b, D): every live row gained >= 1 token
        return [self._result(r) for r in rows]

    def _own_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """(b, V) logits -> (b,) the SLM's own tokens, <CALL> excluded."""
        logits = logits.clone()
        logits[:, self.slm.tokenizer.call_id] = float("-inf")
        if self.cfg.temperature == 0.0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / self.cfg.temperature, -1)  # (b, V)
        if self.cfg.top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)  # (b, V)
            # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass
            # before it already does.
            sorted_p[(sorted_p.cumsum(-1) - sorted_p) >= self.cfg.top_p] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)  # (b,)

    def _result(self, row: _Row) -> Generation:
        tok = self.slm.tokenizer
        pieces = tok.decode_pieces(row.ids[1:])  # EOS context token left out
        prompt_chars = sum(len(p) for p in pieces[: row.prompt_len - 1])
        text = "".join(pieces)[prompt_chars:]
        spans: list[tuple[int, int]] = []
        pos = 0
        for piece, big in zip(pieces[row.prompt_len - 1:], row.from_big):
            if big and piece:
                if spans and spans[-1][1] == pos:
                    spans[-1] = (spans[-1][0], pos + len(piece))
                else:
                    spans.append((pos, pos + len(piece)))
            pos += len(piece)
        return Generation(row.prompt, text, row.ids[row.prompt_len:], row.from_big, spans, row.steps, row.calls,
                          row.answered, row.finish or "length")


def summarize(generations: list[Generation]) -> dict[str, Any]:
    """Counts over generations: the call rate is calls / steps over all of them."""
    steps = sum(g.steps for g in generations)
    calls = sum(g.calls for g in generations)
    answered = sum(g.answered for g in generations)
    tokens = sum(len(g.tokens) for g in generations)
    return {
        "generations": len(generations),
        "steps": steps,
        "calls": calls,
        "answered": answered,
        "call_rate": calls / steps if steps else 0.0,
        "answered_rate": answered / steps if steps else 0.0,
        "big_token_share": sum(sum(g.from_big) for g in generations) / tokens if tokens else 0.0,
        "tokens_per_generation": tokens / len(generations) if generations else 0.0,
        "ended_by_eos": sum(g.finish == "eos" for g in generations) / len(generations) if generations else 0.0,
    }
