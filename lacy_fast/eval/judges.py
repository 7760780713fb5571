"""Judges of atomic facts against retrieved passages: ``--judge rules`` (default) or ``hf:DIR``.

    judge = make_judge("rules")                # no model: claims.Evidence decides
    judge = make_judge("hf:models/judge-lm")   # any local Hugging Face causal LM
    verdicts = judge.judge(title, claims, passages)   # passages[i]: those retrieved for claims[i]

``rules``: the claim is supported when one of its retrieved passages states it
(``claims.py`` says what "states" means). Passages are parsed once and kept per title.

``hf:DIR``: as in FActScore (Min et al. 2023), a language model reads the retrieved passages
and answers whether the fact is true, with FActScore's prompt::

    Answer the question about {title} based on the given context.

    Title: {title}
    Text: {passage 1}
    ...
    Input: {the sentence stating the claim} [claim: {claim}] True or False?
    Output:

The answer is read from one forward pass, deterministically: the prompt followed by
" True" and by " False" is tokenized, and the logits at the first token where the two
differ decide (True wins ties only if its logit is strictly higher: a tie is False). That
works whether the tokenizer has a word token " True" (GPT-2) or spells a leading space as a
marker (SentencePiece). Passages are dropped from the last one until the prompt fits the
model's context; if the claim alone does not fit, the prompt is cut from the left.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Protocol

import torch

from lacy_fast.errors import UserError
from lacy_fast.eval.claims import Claim, Evidence, judge_claim
from lacy_fast.eval.knowledge import Passage


class Judge(Protocol):
    name: str

    def judge(self, title: str, claims: list[Claim], passages: list[list[Passage]]) -> list[bool]:
        """One verdict per claim; ``passages[i]``: the passages retrieved for ``claims[i]``."""
        ...


class RuleJudge:
    name = "rules"

    def __init__(self, nlp: Any):
        self.nlp = nlp
        self.evidence: dict[tuple[str, int], Evidence] = {}  # (title, passage index) -> its parsed sentences

    def _evidence(self, passages: list[Passage]) -> list[Evidence]:
        new = [p for p in dict.fromkeys(passages) if (p.title, p.index) not in self.evidence]
        for p, doc in zip(new, self.nlp.pipe([p.text for p in new])):
            self.evidence[(p.title, p.index)] = Evidence([doc], p.title)
        return [self.evidence[(p.title, p.index)] for p in passages]

    def judge(self, title: str, claims: list[Claim], passages: list[list[Passage]]) -> list[bool]:
        return [judge_claim(c, self._evidence(ps)) for c, ps in zip(claims, passages)]


class HFJudge:
    def __init__(self, path: str | Path, device: torch.device | str = "cpu"):
        try:
            import transformers
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as err:
            raise UserError(f"--judge hf:{path} needs transformers ({err}); pip install 'transformers>=5.23'")
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        if not Path(path).is_dir():
            raise UserError(f"--judge hf:{path} is not a directory; pass a local Hugging Face causal LM directory")
        try:
            self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).to(device).eval()
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"--judge hf:{path} cannot be loaded ({first}); pass a directory with a causal LM and "
                            "its tokenizer (save_pretrained of both)")
        self.name = f"hf:{path}"
        self.device = next(self.model.parameters()).device
        config = self.model.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.max_len = int(limit) if limit else sys.maxsize

    @staticmethod
    def prompt(title: str, claim: Claim, passages: list[Passage]) -> str:
        text = "".join(f"Title: {title}\nText: {p.text}\n\n" for p in passages)
        return (f"Answer the question about {title} based on the given context.\n\n{text}"
                f"Input: {claim.sentence} [claim: {claim.text}] True or False?\nOutput:")

    def answer_ids(self, prompt: str) -> tuple[list[int], int, int]:
        """(tokens up to the answer, token id of True, of False) for ``prompt``."""
        yes = self.tok(prompt + " True")["input_ids"]
        no = self.tok(prompt + " False")["input_ids"]
        n = 0
        while n < min(len(yes), len(no)) and yes[n] == no[n]:
            n += 1
        if n == len(yes) or n == len(no):
            raise UserError(f"the judge's tokenizer ({self.name}) spells ' True' and ' False' alike; use another judge")
        return yes[:n], yes[n], no[n]

    @torch.inference_mode()
    def judge(self, title: str, claims: list[Claim], passages: list[list[Passage]]) -> list[bool]:
        out = []
        for claim, ps in zip(claims, passages):
            ps = list(ps)
            ids, yes, no = self.answer_ids(self.prompt(title, claim, ps))
            while len(ids) > self.max_len and ps:
                ps.pop()
                ids, yes, no = self.answer_ids(self.prompt(title, claim, ps))
            ids = ids[-self.max_len:]
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0, -1].float()
            out.append(bool(logits[yes] > logits[no]))
        return out


def make_judge(spec: str, device: torch.device | str = "cpu") -> Judge:
    """``rules`` or ``hf:DIR``."""
    if spec == "rules":
        from lacy_fast.data.labeling import load_spacy

        return RuleJudge(load_spacy(full=True))
    if spec.startswith("hf:") and len(spec) > 3:
        return HFJudge(spec[3:], device)
    raise UserError(f"--judge {spec} is not a judge; use rules (no model) or hf:DIR (a local Hugging Face causal LM)")
