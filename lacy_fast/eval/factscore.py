"""Exact FactScore on the built-in biographies: no judge model, the fact table decides.

Prompt: the person's full name ("Thynoxine Nahoxski"). It is how most corpus biographies
open (the first sentence's subject is the full name in ~3/4 of them; the rest open with a
cue such as "Born on" or with the value itself), it states no fact, and it identifies the
person for the model and for the oracle.

Stated facts: ``FactTable.extract`` finds every known value in the generated continuation
(whole words, longest first; the value sets are disjoint across attributes, so a value
names its attribute). A stated fact is a distinct (attribute, value) pair: a generation
that repeats itself states a fact once; one that gives two birth places states two facts.
A fact is supported iff the value is the person's value for that attribute. Values of other
people count (as unsupported): stating someone else's employer is a wrong fact.

Scores over a set of generations:
- ``macro`` (the reported ``factscore``): the mean over generations that state at least
  one fact of supported / stated, as FActScore (Min et al. 2023) averages per generation
  and leaves out generations that state nothing; None when no generation states a fact.
- ``micro``: supported / stated over all facts of all generations (None when none).
- ``facts_per_generation`` and ``supported_per_generation``: means over all generations.
- ``share_with_facts``: share of generations that state at least one fact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lacy_fast.data.facts import FactTable, Person


@dataclass(frozen=True)
class ScoredFact:
    attribute: str
    value: str
    supported: bool


def prompt_for(person: Person) -> str:
    return person.name


def score_generation(table: FactTable, person: Person, text: str) -> list[ScoredFact]:
    """The distinct facts ``text`` states about ``person``, in order of first mention, each judged."""
    seen: dict[tuple[str, str], ScoredFact] = {}
    for f in table.extract(text):
        if (f.attribute, f.value) not in seen:
            seen[(f.attribute, f.value)] = ScoredFact(f.attribute, f.value, person.facts.get(f.attribute) == f.value)
    return list(seen.values())


def factscore(table: FactTable, people: list[Person], texts: list[str]) -> dict[str, Any]:
    """FactScore of ``texts[i]`` as biographies of ``people[i]`` (see the module docstring)."""
    scored = [score_generation(table, p, t) for p, t in zip(people, texts, strict=True)]
    stated = sum(len(s) for s in scored)
    supported = sum(f.supported for s in scored for f in s)
    with_facts = [s for s in scored if s]
    by_attribute = {}
    for attr in table.attributes:
        facts = [f for s in scored for f in s if f.attribute == attr]
        ok = sum(f.supported for f in facts)
        by_attribute[attr] = {"stated": len(facts), "supported": ok, "precision": ok / len(facts) if facts else None}
    n = len(scored)
    return {
        "macro": sum(sum(f.supported for f in s) / len(s) for s in with_facts) / len(with_facts) if with_facts else None,
        "micro": supported / stated if stated else None,
        "stated": stated,
        "supported": supported,
        "generations": n,
        "facts_per_generation": stated / n if n else 0.0,
        "supported_per_generation": supported / n if n else 0.0,
        "share_with_facts": len(with_facts) / n if n else 0.0,
        "by_attribute": by_attribute,
    }
