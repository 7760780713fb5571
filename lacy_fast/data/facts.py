"""The ground truth of the built-in biographies, read back for evaluation and the oracle.

    table = FactTable.read("synth/facts.jsonl")
    heldout = read_heldout("synth/heldout.jsonl", table)
    table.extract("She was born in Tolmere and lives in Haisost.")
    # [StatedFact(attribute='birth_place', value='Tolmere', start=16, end=23), ...]

``facts.jsonl`` rows are ``{"id", "name", "pronoun", "facts": {attribute: value}}`` as
``lacy-fast synth`` writes them (other keys of a row are ignored). Value sets are disjoint
across attributes (docs/data.md says why), so a value found in a text names its attribute. The
attributes are the table's own (``FactTable.attributes``, in the order rows list them): the
table is read without the generator that wrote it, so evaluation and the oracle big model
(``cascade/big.py``) depend on this module and not on ``synth.py``.

Extraction (``FactTable.extract``) finds every known value of every attribute in a text:
the text is split into words (runs of letters and digits), and at each word the longest
value that starts there and matches whole words, separated by single spaces as in the
value, is taken; matching then resumes after it (leftmost-longest, non-overlapping), so
"marine biologist" is one occupation, not "biologist" too. Matching is case-sensitive:
values are proper nouns, dates and lower-case occupations, and the models reproduce case.
The scan costs O(words x longest value in words), whatever the number of people.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lacy_fast.errors import UserError

_FACTS = "the facts.jsonl written by `lacy-fast synth`"  # what to pass instead of a bad facts file
_WORD = re.compile(r"[^\W_]+")  # letters and digits; values hold nothing else between their spaces


@dataclass(frozen=True)
class Person:
    id: int
    name: str
    pronoun: str
    facts: dict[str, str]
    bucket: str | None = None  # popularity: "frequent" or "rare" (None in tables without it)


@dataclass(frozen=True)
class StatedFact:
    attribute: str
    value: str
    start: int  # character span of the value in the text
    end: int


@dataclass(frozen=True)
class HeldOut:
    person: Person
    text: str
    free: tuple[tuple[int, int], ...] = ()  # character spans of the text's free wording


class FactTable:
    """People by id and by name, and every attribute's value set, indexed for extraction."""

    def __init__(self, people: list[Person], path: Path | None = None):
        self.path = path
        self.people = people
        self.attributes = _attribute_order([list(p.facts) for p in people])
        self.by_id = {p.id: p for p in people}
        self.by_name = {p.name: p for p in people}
        # Values as word tuples -> attribute; max_words bounds the scan at each word.
        self.values: dict[tuple[str, ...], tuple[str, str]] = {}
        for p in people:
            for attr, value in p.facts.items():
                self.values[tuple(value.split(" "))] = (attr, value)
        self.max_words = max((len(k) for k in self.values), default=1)

    @classmethod
    def read(cls, path: str | Path) -> "FactTable":
        path = Path(path)
        people = [_person(line, path, n) for n, line in _lines(path, "facts file", _FACTS)]
        if not people:
            raise UserError(f"facts file {path} is empty; pass {_FACTS}")
        return cls(people, path)

    def extract(self, text: str) -> list[StatedFact]:
        """Every known value in ``text``, leftmost-longest, in order of appearance."""
        words = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]
        found = []
        i = 0
        while i < len(words):
            for n in range(min(self.max_words, len(words) - i), 0, -1):
                hit = self.values.get(tuple(w for w, _, _ in words[i:i + n]))
                start, end = words[i][1], words[i + n - 1][2]
                if hit is not None and text[start:end] == hit[1]:
                    found.append(StatedFact(hit[0], hit[1], start, end))
                    i += n
                    break
            else:
                i += 1
        return found

    def person_in(self, text: str) -> Person | None:
        """The person whose full name occurs first in ``text`` (names are two words)."""
        words = [m.group() for m in _WORD.finditer(text)]
        for a, b in zip(words, words[1:]):
            person = self.by_name.get(f"{a} {b}")
            if person is not None:
                return person
        return None


def read_heldout(path: str | Path, table: FactTable) -> list[HeldOut]:
    """The held-out renderings of ``heldout.jsonl``, each with its person from ``table``."""
    path = Path(path)
    out = []
    for n, line in _lines(path, "held-out file", "--heldout (heldout.jsonl of `lacy-fast synth`)"):
        try:
            row = json.loads(line)
            pid, text = row["id"], row["text"]
            free = tuple((int(a), int(b)) for a, b in row.get("free", ()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise UserError(f"{path}:{n} is not a held-out row {{\"id\", \"text\"}}; pass heldout.jsonl of "
                            "`lacy-fast synth`")
        if pid not in table.by_id:
            raise UserError(f"{path}:{n} is about person {pid}, who is not in {table.path}; pass the facts.jsonl "
                            "written together with this held-out file")
        out.append(HeldOut(table.by_id[pid], text, free))
    return out


def _lines(path: Path, what: str, fix: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of the non-blank lines of a JSONL file (``what``, ``fix``: for the error)."""
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; pass {fix}")
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                yield n, line


def value_spans(text: str, person: Person) -> dict[str, tuple[int, int]]:
    """Character span of each of ``person``'s values in ``text`` (its first whole-word occurrence)."""
    spans = {}
    for attr, value in person.facts.items():
        m = re.search(rf"(?<![^\W_]){re.escape(value)}(?![^\W_])", text)
        if m is not None:
            spans[attr] = (m.start(), m.end())
    return spans


def _attribute_order(rows: list[list[str]]) -> tuple[str, ...]:
    """Every attribute of ``rows``, each row's order kept: an attribute first seen in a later
    row goes right after the attribute before it in that row (rows that leave out an optional
    attribute do not push it to the end)."""
    order: list[str] = []
    for row in rows:
        for i, attr in enumerate(row):
            if attr not in order:
                order.insert(order.index(row[i - 1]) + 1 if i else 0, attr)
    return tuple(order)


def _person(line: str, path: Path, n: int) -> Person:
    hint = f"is not a row of the built-in fact table ({{\"id\", \"name\", \"pronoun\", \"facts\"}}); pass {_FACTS}"
    try:
        row = json.loads(line)
        bucket = row.get("bucket")
        person = Person(int(row["id"]), str(row["name"]), str(row.get("pronoun", "")), dict(row["facts"]),
                        None if bucket is None else str(bucket))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise UserError(f"{path}:{n} {hint}")
    if not all(isinstance(a, str) and a and isinstance(v, str) and v for a, v in person.facts.items()):
        raise UserError(f"{path}:{n} {hint}")
    return person
