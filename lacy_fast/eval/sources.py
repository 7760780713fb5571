"""FactScore: the sources generations are scored against, behind one protocol, and one summary.

    source = open_source("synth/facts.jsonl")                 # SyntheticSource: exact, with held-out text
    source = open_source("wiki_bios.jsonl", judge="rules")    # KnowledgeSource: articles and a verifier
    items = source.score([("Ada Lovelace", generation), ...])
    summary = summarize(items)    # {"factscore", "micro", "facts", "supported", ...}

A source knows its titles, the prompt a biography of a title is generated from
(``prompt``), how to split a generation into atomic facts and judge each (``score``), and
its held-out text (``heldout``: None when it has none, and then leakage, perplexity and
held-out calls are not defined: a knowledge source has one article per entity, usually
training text).

- ``SyntheticSource``: the fact table of ``lacy-fast synth``. The atomic facts of a
  generation are the known values it states (``FactTable.extract``: whole words, longest
  first; value sets are disjoint across attributes, so a value names its attribute), each
  distinct (attribute, value) once, supported iff it is the person's value (another
  person's value is a wrong fact). Prompt: the person's full name, which states no fact.
  Held-out texts: ``heldout.jsonl`` beside the table unless given.
- ``KnowledgeSource``: articles (``knowledge.py``); the atomic facts are the checkable
  claims spaCy finds (``claims.py``), each verified against the passages of the title's
  article retrieved for it (BM25, query: the title and the claim's sentence, ``k``
  passages) by a verifier (``verify.py``). Prompt: the title without a parenthesised part.

``summarize``: ``factscore`` is FActScore's number (Min et al. 2023): the mean, over the
generations that state at least one fact, of supported / facts (None when none states
one); ``micro`` pools all facts; ``facts``, ``supported``, ``generations``,
``facts_per_generation``, ``supported_per_generation``, ``share_with_facts``; given the
attributes, ``by_attribute`` (facts, supported, precision of each).
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from lacy_fast.data.facts import FactTable, HeldOut, Person, read_heldout
from lacy_fast.errors import UserError
from lacy_fast.eval.claims import Claim, extract_claims
from lacy_fast.eval.knowledge import KB_HINT, KnowledgeBase
from lacy_fast.progress import Progress

CHUNK_CHARS = 100_000  # characters of a generation spaCy parses at once (its limit is 1,000,000)


@dataclass
class Item:
    title: str
    generation: str
    facts: list[dict[str, Any]]  # each with "text", "kind" and "supported"
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
    attributes: tuple[str, ...]  # the kinds ``summarize`` counts apart (none for a knowledge source)

    @property
    def titles(self) -> list[str]: ...

    def prompt(self, title: str) -> str: ...

    def scored_text(self, prompt: str, continuation: str) -> str:
        """What of a generation from ``prompt`` is scored."""
        ...

    def score(self, pairs: list[tuple[str, str]], where: list[str] | None = None,
              progress: Progress | None = None) -> list[Item]:
        """Items for (title, generation) pairs; ``where[i]`` names pair i in errors."""
        ...

    def heldout(self, n: int) -> list[HeldOut] | None:
        """The first ``n`` held-out texts (their people are the titles evaluated); None: none."""
        ...

    def bucket(self, title: str) -> str | None:
        """The popularity bucket of ``title`` (None: not bucketed)."""
        ...

    def sample(self, item: Item, marked: str) -> dict[str, Any]:
        """A sample of an evaluation: the marked generation and its judged facts."""
        ...


def _timed(title: str, text: str, facts: Callable[[], list[dict[str, Any]]], progress: Progress | None) -> Item:
    t0 = time.perf_counter()
    found = facts()
    if progress is not None:
        progress.update(1, facts=len(found))
    return Item(title, text, found, time.perf_counter() - t0)


def summarize(items: list[Item], attributes: tuple[str, ...] = ()) -> dict[str, Any]:
    """FactScore over items (the module docstring says which mean); ``by_attribute`` with ``attributes``."""
    with_facts = [i for i in items if i.facts]
    facts = sum(len(i.facts) for i in items)
    supported = sum(i.supported for i in items)
    n = len(items)
    out = {
        "factscore": sum(i.score for i in with_facts) / len(with_facts) if with_facts else None,
        "micro": supported / facts if facts else None,
        "facts": facts,
        "supported": supported,
        "generations": n,
        "facts_per_generation": facts / n if n else 0.0,
        "supported_per_generation": supported / n if n else 0.0,
        "share_with_facts": len(with_facts) / n if n else 0.0,
    }
    if attributes:
        out["by_attribute"] = {}
        for attr in attributes:
            ok = [f["supported"] for i in items for f in i.facts if f["kind"] == attr]
            out["by_attribute"][attr] = {"facts": len(ok), "supported": sum(ok),
                                         "precision": sum(ok) / len(ok) if ok else None}
    return out


class SyntheticSource:
    kind = "synthetic"
    judge_name = "exact (fact table)"

    def __init__(self, table: FactTable, heldout: str | Path | None = None):
        self.table = table
        self.name = str(table.path)
        self.attributes = table.attributes
        if heldout is None and table.path is not None:
            heldout = Path(table.path).with_name("heldout.jsonl")
        self.heldout_path = None if heldout is None else Path(heldout)

    @property
    def titles(self) -> list[str]:
        return [p.name for p in self.table.people]

    def person(self, title: str, where: str = "") -> Person:
        person = self.table.by_name.get(title)
        if person is None:
            at = f" ({where})" if where else ""
            raise UserError(f"title {title!r}{at} is not a person of the fact table {self.table.path}; pass generations "
                            "about people of this table")
        return person

    def prompt(self, title: str) -> str:
        return self.person(title).name

    def scored_text(self, prompt: str, continuation: str) -> str:
        return continuation  # the name states no fact

    def facts(self, person: Person, text: str) -> list[dict[str, Any]]:
        """The distinct facts ``text`` states about ``person``, in order of first mention, each judged."""
        seen: dict[tuple[str, str], dict[str, Any]] = {}
        for f in self.table.extract(text):
            seen.setdefault((f.attribute, f.value), {"text": f.value, "kind": f.attribute,
                                                     "supported": person.facts.get(f.attribute) == f.value})
        return list(seen.values())

    def score(self, pairs: list[tuple[str, str]], where: list[str] | None = None,
              progress: Progress | None = None) -> list[Item]:
        people = [self.person(t, where[i] if where else "") for i, (t, _) in enumerate(pairs)]
        return [_timed(title, text, lambda: self.facts(person, text), progress)
                for person, (title, text) in zip(people, pairs)]

    def heldout(self, n: int) -> list[HeldOut] | None:
        if self.heldout_path is None:
            return None
        texts = read_heldout(self.heldout_path, self.table)[:n]
        if not texts:
            raise UserError(f"held-out file {self.heldout_path} holds no text; write one with "
                            "`lacy-fast synth --heldout 0.1`")
        return texts

    def bucket(self, title: str) -> str | None:
        return self.person(title).bucket

    def sample(self, item: Item, marked: str) -> dict[str, Any]:
        return {"person": item.title, "marked": marked,
                "facts": [{"attribute": f["kind"], "value": f["text"], "supported": f["supported"]} for f in item.facts]}


class KnowledgeSource:
    kind = "knowledge"
    attributes: tuple[str, ...] = ()

    def __init__(self, kb: KnowledgeBase, verifier: Any, nlp: Any, k: int = 5):
        self.kb, self.verifier, self.nlp, self.k = kb, verifier, nlp, k
        self.name = str(kb.path)
        self.judge_name = verifier.name

    @property
    def titles(self) -> list[str]:
        return list(self.kb.articles)

    def prompt(self, title: str) -> str:
        return re.sub(r"\s*\([^)]*\)", "", self.kb.resolve(title)).strip() or title

    def scored_text(self, prompt: str, continuation: str) -> str:
        return prompt + continuation  # so that the first sentence parses with its subject

    def score(self, pairs: list[tuple[str, str]], where: list[str] | None = None,
              progress: Progress | None = None) -> list[Item]:
        titles = [self.kb.resolve(t, where[i] if where else "") for i, (t, _) in enumerate(pairs)]
        return [_timed(title, text, lambda: self._verify(title, claims), progress)
                for title, (_, text), claims in zip(titles, pairs, self._claims([g for _, g in pairs], titles))]

    def _verify(self, title: str, claims: list[Claim]) -> list[dict[str, Any]]:
        passages = [self.kb.retrieve(title, f"{title} {c.sentence}", self.k) for c in claims]
        verdicts = self.verifier.verify(title, claims, passages)
        return [{**c.to_dict(), "supported": bool(v), "passages": [p.index for p in ps]}
                for c, v, ps in zip(claims, verdicts, passages)]

    def heldout(self, n: int) -> None:
        return None

    def bucket(self, title: str) -> None:
        return None

    def sample(self, item: Item, marked: str) -> dict[str, Any]:
        return {"title": item.title, "marked": marked, "facts": item.facts}

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


def open_source(path: str | Path, judge: str = "rules", *, k: int = 5, device: str = "cpu",
                heldout: str | Path | None = None) -> FactSource:
    """A knowledge source JSONL ({"title", "text"} rows) or a synthetic facts.jsonl (with its
    held-out texts: ``heldout``, else heldout.jsonl beside it), told apart by the first row."""
    path = Path(path)
    row = _first_row(path)
    if "facts" in row and "name" in row:
        if judge != "rules":
            raise UserError(f"{path} is the synthetic fact table, which is scored exactly; --judge applies to "
                            "knowledge sources of articles")
        return SyntheticSource(FactTable.read(path), heldout)
    from lacy_fast.data.labeling import load_spacy
    from lacy_fast.eval.verify import RuleVerifier, make_verifier

    kb = KnowledgeBase.read(path)
    model_verifier = make_verifier(judge, device) if judge != "rules" else None
    nlp = load_spacy(full=True)
    return KnowledgeSource(kb, model_verifier or RuleVerifier(nlp), nlp, k)
