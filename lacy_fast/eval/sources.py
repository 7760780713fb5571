"""Fact sources FactScore scores generations against, behind one interface.

    source = open_source("wiki_bios.jsonl", judge="rules")    # KnowledgeSource
    source = open_source("synth/facts.jsonl")                 # SyntheticSource (exact)
    items = source.score([("Ada Lovelace", generation), ...])
    summary = summarize(items)    # {"factscore", "micro", "facts", "supported", ...}

A source knows which titles it has, the prompt a biography of a title is generated from
(``prompt``), and how to split a generation into atomic facts and judge each (``score``).

- ``KnowledgeSource``: a knowledge source of articles (``knowledge.py``); atomic facts are
  the checkable claims spaCy finds (``claims.py``), each judged against the passages of the
  title's article retrieved for it (BM25, query: the title and the sentence stating the
  claim, ``k`` passages) by the ``rules`` judge or an ``hf:DIR`` language model
  (``judges.py``). Prompt: the title without a parenthesised part ("Anna Tolk (biologist)"
  -> "Anna Tolk").
- ``SyntheticSource``: the fact table of ``lacy-fast synth``; atomic facts and verdicts are
  exactly those of ``factscore.score_generation`` (every known value, supported iff it is
  the person's), so the synthetic FactScore is unchanged. Titles are the people's names.

An item's ``score`` is supported / facts, None when it states no fact; ``summarize`` gives
FActScore's number, the mean of the scores over the items that state at least one fact
(``factscore``), beside the micro average and counts.

Fact leakage (the paper's other number, ``leakage.py``) needs gold facts located in text the
model has not seen, held-out renderings of the same facts; a knowledge source has one
article per entity, usually part of the training text, so leakage is not defined on it and
is not reported for real text.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

from lacy_fast.data.facts import FactTable
from lacy_fast.errors import UserError
from lacy_fast.eval.claims import Claim, extract_claims
from lacy_fast.eval.factscore import prompt_for, score_generation
from lacy_fast.eval.knowledge import KB_HINT, KnowledgeBase
from lacy_fast.progress import Progress

CHUNK_CHARS = 100_000  # characters of a generation spaCy parses at once (its limit is 1,000,000)


@dataclass
class Item:
    title: str
    generation: str
    facts: list[dict[str, Any]]  # each with "supported"
    seconds: float = 0.0

    @property
    def supported(self) -> int:
        return sum(f["supported"] for f in self.facts)

    @property
    def score(self) -> float | None:
        return self.supported / len(self.facts) if self.facts else None

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "facts": len(self.facts), "supported": self.supported, "score": self.score,
                "claims": self.facts, "generation": self.generation}


class FactSource(Protocol):
    kind: str
    name: str
    judge_name: str

    @property
    def titles(self) -> list[str]: ...

    def prompt(self, title: str) -> str: ...

    def score(self, pairs: list[tuple[str, str]], where: list[str] | None = None,
              progress: Progress | None = None) -> list[Item]:
        """Items for (title, generation) pairs; ``where[i]`` names pair i in errors."""
        ...


class KnowledgeSource:
    kind = "knowledge"

    def __init__(self, kb: KnowledgeBase, judge: Any, nlp: Any, k: int = 5):
        self.kb, self.judge, self.nlp, self.k = kb, judge, nlp, k
        self.name = str(kb.path)
        self.judge_name = judge.name

    @property
    def titles(self) -> list[str]:
        return list(self.kb.articles)

    def prompt(self, title: str) -> str:
        return re.sub(r"\s*\([^)]*\)", "", self.kb.resolve(title)).strip() or title

    def score(self, pairs: list[tuple[str, str]], where: list[str] | None = None,
              progress: Progress | None = None) -> list[Item]:
        titles = [self.kb.resolve(t, where[i] if where else "") for i, (t, _) in enumerate(pairs)]
        items = []
        for title, (_, text), claims in zip(titles, pairs, self._claims([g for _, g in pairs], titles)):
            t0 = time.perf_counter()
            passages = [self.kb.retrieve(title, f"{title} {c.sentence}", self.k) for c in claims]
            verdicts = self.judge.judge(title, claims, passages)
            facts = [{**c.to_dict(), "supported": bool(v), "passages": [p.index for p in ps]}
                     for c, v, ps in zip(claims, verdicts, passages)]
            items.append(Item(title, text, facts, time.perf_counter() - t0))
            if progress is not None:
                progress.update(1, facts=len(facts))
        return items


    def _claims(self, texts: list[str], titles: list[str]) -> Iterator[list[Claim]]:
        """The claims of each text, parsed in pieces of at most CHUNK_CHARS characters: spaCy
        refuses longer texts (E088) because its parser needs about 1 GB per 100,000."""
        pieces = [(i, offset, piece) for i, text in enumerate(texts) for offset, piece in text_pieces(text)]
        docs = self.nlp.pipe(piece for _, _, piece in pieces)
        current, claims = 0, {}
        for (i, offset, _), doc in zip(pieces, docs):
            while current < i:
                yield list(claims.values())
                current, claims = current + 1, {}
            for c in extract_claims(doc, titles[i]):
                claims.setdefault(c.key, dataclasses.replace(c, start=c.start + offset, end=c.end + offset))
        yield list(claims.values())


def text_pieces(text: str, size: int = 0) -> list[tuple[int, str]]:
    """(offset, piece) of ``text`` cut after a line or sentence end, no piece longer than ``size``."""
    size = size or CHUNK_CHARS
    pieces, start = [], 0
    while len(text) - start > size:
        window = text[start:start + size]
        cut = max(window.rfind("\n"), window.rfind(". ") + 1)
        cut = start + (cut if cut > 0 else size)
        pieces.append((start, text[start:cut]))
        start = cut
    pieces.append((start, text[start:]))
    return pieces


class SyntheticSource:
    kind = "synthetic"
    judge_name = "exact (fact table)"

    def __init__(self, table: FactTable):
        self.table = table
        self.name = str(table.path)

    @property
    def titles(self) -> list[str]:
        return [p.name for p in self.table.people]

    def person(self, title: str, where: str = ""):
        person = self.table.by_name.get(title)
        if person is None:
            at = f" ({where})" if where else ""
            raise UserError(f"title {title!r}{at} is not a person of the fact table {self.table.path}; pass generations "
                            "about people of this table")
        return person

    def prompt(self, title: str) -> str:
        return prompt_for(self.person(title))

    def score(self, pairs: list[tuple[str, str]], where: list[str] | None = None,
              progress: Progress | None = None) -> list[Item]:
        people = [self.person(t, where[i] if where else "") for i, (t, _) in enumerate(pairs)]
        items = []
        for person, (title, text) in zip(people, pairs):
            t0 = time.perf_counter()
            facts = [{"text": f.value, "kind": f.attribute, "supported": f.supported}
                     for f in score_generation(self.table, person, text)]
            items.append(Item(title, text, facts, time.perf_counter() - t0))
            if progress is not None:
                progress.update(1, facts=len(facts))
        return items


def summarize(items: list[Item]) -> dict[str, Any]:
    """FactScore over items (the module docstring says which mean)."""
    with_facts = [i for i in items if i.facts]
    facts = sum(len(i.facts) for i in items)
    supported = sum(i.supported for i in items)
    n = len(items)
    return {
        "factscore": sum(i.score for i in with_facts) / len(with_facts) if with_facts else None,
        "micro": supported / facts if facts else None,
        "facts": facts,
        "supported": supported,
        "generations": n,
        "facts_per_generation": facts / n if n else 0.0,
        "supported_per_generation": supported / n if n else 0.0,
        "share_with_facts": len(with_facts) / n if n else 0.0,
    }


def _first_row(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"knowledge source {path} does not exist; pass {KB_HINT} or facts.jsonl of `lacy-fast synth`")
    with open(path, encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{n} is not a JSON object; pass {KB_HINT}")
                return row
    raise UserError(f"knowledge source {path} is empty; pass {KB_HINT}")


def open_source(path: str | Path, judge: str = "rules", *, k: int = 5, device: str = "cpu") -> FactSource:
    """A knowledge source JSONL ({"title", "text"} rows) or a synthetic facts.jsonl, by its first row."""
    path = Path(path)
    row = _first_row(path)
    if "facts" in row and "name" in row:
        if judge != "rules":
            raise UserError(f"{path} is the synthetic fact table, which is scored exactly; --judge applies to "
                            "knowledge sources of articles")
        return SyntheticSource(FactTable.read(path))
    from lacy_fast.data.labeling import load_spacy
    from lacy_fast.eval.judges import RuleJudge, make_judge

    kb = KnowledgeBase.read(path)
    model_judge = make_judge(judge, device) if judge != "rules" else None
    nlp = load_spacy(full=True)
    return KnowledgeSource(kb, model_judge or RuleJudge(nlp), nlp, k)
