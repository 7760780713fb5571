"""Verifiers of atomic facts against retrieved passages: ``--judge rules`` (default) or ``hf:DIR``.

    verifier = make_verifier("rules")                # no model: claims.Evidence decides
    verifier = make_verifier("hf:models/judge-lm")   # any local Hugging Face causal LM
    verdicts = verifier.verify(title, claims, passages)   # passages[i]: those retrieved for claims[i]

``rules``: the claim is supported when one of its retrieved passages states it
(``claims.py`` says what "states" means). Passages are parsed once and kept per title.

``hf:DIR``: as in FActScore (Min et al. 2023), a language model reads the retrieved passages
and answers whether the fact is true, with FActScore's prompt (``LMVerifier.prompt``). The
answer is read from one forward pass (``hf_lm.YesNo`` on the prompt followed by " True" and
by " False": True only if its logit is strictly higher). Passages are dropped from the last
one until the prompt fits the model's context; if the claim alone does not fit, the prompt
is cut from the left.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from lacy_fast.errors import UserError
from lacy_fast.eval.claims import Claim, Evidence, judge_claim
from lacy_fast.eval.knowledge import Passage
from lacy_fast.hf_lm import YesNo, context_limit, load_causal_lm


class Verifier(Protocol):
    name: str

    def verify(self, title: str, claims: list[Claim], passages: list[list[Passage]]) -> list[bool]:
        """One verdict per claim; ``passages[i]``: the passages retrieved for ``claims[i]``."""
        ...


class RuleVerifier:
    name = "rules"

    def __init__(self, nlp: Any):
        self.nlp = nlp
        self.evidence: dict[tuple[str, int], Evidence] = {}  # (title, passage index) -> its parsed sentences

    def _evidence(self, passages: list[Passage]) -> list[Evidence]:
        new = [p for p in dict.fromkeys(passages) if (p.title, p.index) not in self.evidence]
        for p, doc in zip(new, self.nlp.pipe([p.text for p in new])):
            self.evidence[(p.title, p.index)] = Evidence([doc], p.title)
        return [self.evidence[(p.title, p.index)] for p in passages]

    def verify(self, title: str, claims: list[Claim], passages: list[list[Passage]]) -> list[bool]:
        return [judge_claim(c, self._evidence(ps)) for c, ps in zip(claims, passages)]


class LMVerifier:
    """A local Hugging Face causal LM answers True or False per claim."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu"):
        self.model, self.tok = load_causal_lm(path, device, flag=f"--judge hf:{path}")
        self.name = f"hf:{path}"
        self.device = next(self.model.parameters()).device
        self.max_len = context_limit(self.model.config)

    @staticmethod
    def prompt(title: str, claim: Claim, passages: list[Passage]) -> str:
        text = "".join(f"Title: {title}\nText: {p.text}\n\n" for p in passages)
        return (f"Answer the question about {title} based on the given context.\n\n{text}"
                f"Input: {claim.sentence} [claim: {claim.text}] True or False?\nOutput:")

    def answer(self, prompt: str) -> YesNo:
        """The tokens up to the answer, and those of True and False, for ``prompt``."""
        return YesNo.of(self.tok(prompt + " True")["input_ids"], self.tok(prompt + " False")["input_ids"],
                        f"the judge {self.name}")

    @torch.inference_mode()
    def verify(self, title: str, claims: list[Claim], passages: list[list[Passage]]) -> list[bool]:
        out = []
        for claim, ps in zip(claims, passages):
            ps = list(ps)
            answer = self.answer(self.prompt(title, claim, ps))
            while len(answer.prefix) > self.max_len and ps:
                ps.pop()
                answer = self.answer(self.prompt(title, claim, ps))
            ids = answer.prefix[-self.max_len:]
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0, -1]
            out.append(bool(answer.margin(logits) > 0))
        return out


def make_verifier(spec: str, device: torch.device | str = "cpu") -> Verifier:
    """``rules`` or ``hf:DIR``."""
    if spec == "rules":
        from lacy_fast.data.labeling import load_spacy

        return RuleVerifier(load_spacy(full=True))
    if spec.startswith("hf:") and len(spec) > 3:
        return LMVerifier(spec[3:], device)
    raise UserError(f"--judge {spec} is not a judge; use rules (no model) or hf:DIR (a local Hugging Face causal LM)")
