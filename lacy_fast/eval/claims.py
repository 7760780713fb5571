"""Atomic facts of a generation, and whether an article states them: the model-free verifier.

    nlp = load_spacy(full=True)
    claims = extract_claims(nlp(generation), subject="Ada Lovelace")
    evidence = Evidence([nlp(p.text) for p in passages], subject="Ada Lovelace")
    evidence.supports(claims[0])   # True / False

An atomic fact is a *checkable claim*: a date (``find_dates``), a number (``find_numbers``,
number entities and NUM tokens; "one" left out) or a name (``NAME_LABELS`` entities and
capitalised PROPN runs) that a sentence states, outside the subject's own name (any words
of the title). Each claim carries its *relation*: the lemma of the first content verb above
it in the dependency tree (``LIGHT_VERBS`` do not count), plus for a number the noun it
counts. A repeated claim (kind, value, relation) is stated once.

Both sides are normalised (accents, case, punctuation, "the", possessive "'s", initials);
dates and numbers compare as values. A claim is supported when a sentence of the evidence
states its value (a name as contiguous words; a date agreeing on every part the claim
gives; a number of equal value) under a compatible relation (either empty, or a shared
lemma), or the value is stated and no passage gives the claim's relation another value of
its kind: so "born in Gravholm" is refused by "born in Tolmere ... lives in Gravholm", and
a paraphrase under another verb is accepted. README ("FactScore on real text") lists what
these rules cannot judge.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable

NAME_LABELS = frozenset({"PERSON", "NORP", "FAC", "ORG", "GPE", "LOC", "PRODUCT", "EVENT", "WORK_OF_ART", "LAW",
                         "LANGUAGE"})
NUMBER_LABELS = frozenset({"CARDINAL", "ORDINAL", "QUANTITY", "MONEY", "PERCENT"})
LIGHT_VERBS = frozenset({"be", "have", "become", "do", "get"})

_MONTHS = {m: i + 1 for i, m in enumerate(("january", "february", "march", "april", "may", "june", "july", "august",
                                           "september", "october", "november", "december"))}
_MONTHS.update({m[:3]: i for m, i in list(_MONTHS.items())})
_MONTHS["sept"] = 9
_MONTH = r"(?P<{}>" + "|".join(sorted(_MONTHS, key=len, reverse=True)) + r")\.?"
_DAY = r"(?P<{}>[0-3]?\d)(?:st|nd|rd|th)?"
_YEAR = r"(?P<{}>1\d{{3}}|20\d{{2}})"
# Most specific first; a later pattern only matches text no earlier one took.
_DATE_PATTERNS = [re.compile(p, re.IGNORECASE) for p in (
    rf"\b{_DAY.format('d')}\s+(?:of\s+)?{_MONTH.format('m')},?\s+{_YEAR.format('y')}\b",
    rf"\b{_MONTH.format('m')}\s+{_DAY.format('d')},?\s+{_YEAR.format('y')}\b",
    r"\b(?P<y>1\d{3}|20\d{2})-(?P<mm>[01]\d)-(?P<d>[0-3]\d)\b",
    rf"\b{_MONTH.format('m')},?\s+{_YEAR.format('y')}\b",
    rf"\b{_DAY.format('d')}\s+(?:of\s+)?{_MONTH.format('m')}\b",
    rf"\b{_MONTH.format('m')}\s+{_DAY.format('d')}\b",
    r"\b(?P<dec>1\d{2}|20\d)0s\b",
    rf"\b{_YEAR.format('y')}\b",
)]

_UNITS = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                                      "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                                      "seventeen", "eighteen", "nineteen"))}
_TENS = {w: 10 * (i + 2) for i, w in enumerate(("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty",
                                                "ninety"))}
_ORDINALS = {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8,
             "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12, "twentieth": 20}
_SCALES = {"hundred": 1e2, "thousand": 1e3, "million": 1e6, "billion": 1e9, "trillion": 1e12}
_WORD_NUMBER = (r"(?:(?:" + "|".join(_TENS) + r")(?:[- ](?:" + "|".join(list(_UNITS)[1:10]) + r"))?|"
                + "|".join(sorted(list(_UNITS) + list(_ORDINALS), key=len, reverse=True)) + ")")
_NUMBER = re.compile(r"(?<![\w.])(?P<n>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(?:st|nd|rd|th)?(?!\w)"
                     r"|\b(?P<w>" + _WORD_NUMBER + r")\b", re.IGNORECASE)
_SCALE_AFTER = re.compile(r"\s*(?P<s>" + "|".join(_SCALES) + r")\b", re.IGNORECASE)


def norm_word(text: str) -> str:
    """Case-folded letters and digits of ``text``, accents dropped."""
    text = unicodedata.normalize("NFKD", text)
    return "".join(c for c in text if c.isalnum() and not unicodedata.combining(c)).casefold()


def name_words(tokens: Iterable[Any]) -> list[tuple[str, int]]:
    """(normalised word, token index) of the words of a name: punctuation, "the", "'s" left out."""
    out = []
    for t in tokens:
        if t.is_punct or t.is_space or t.lower_ in ("the", "'s", "\u2019s"):
            continue
        w = norm_word(t.text)
        if w:
            out.append((w, t.i))
    return out


def _drop_initials(words: list[str]) -> list[str]:
    kept = [w for w in words if len(w) > 1]
    return kept or words


def subject_words(title: str) -> frozenset[str]:
    """The words of the subject's name: the title without a parenthesised part."""
    name = re.sub(r"\([^)]*\)", " ", title)
    return frozenset(_drop_initials([w for w in (norm_word(x) for x in name.split()) if w]))


@dataclass(frozen=True)
class Date:
    year: int | None = None
    month: int | None = None
    day: int | None = None
    decade: int | None = None

    def within(self, other: "Date") -> bool:
        """Every part this date gives, ``other`` gives too, and the same."""
        if self.decade is not None:
            year = other.year if other.year is not None else other.decade
            return year is not None and year // 10 * 10 == self.decade
        return all(mine is None or mine == theirs for mine, theirs in
                   ((self.year, other.year), (self.month, other.month), (self.day, other.day)))


def find_dates(text: str) -> list[tuple[int, int, Date]]:
    """(start, end, date) of every date in ``text`` (see the module docstring), in order."""
    taken = [False] * len(text)
    found = []
    for pattern in _DATE_PATTERNS:
        for m in pattern.finditer(text):
            if any(taken[m.start():m.end()]):
                continue
            g = m.groupdict()
            month = int(g["mm"]) if g.get("mm") else _MONTHS[g["m"].lower()] if g.get("m") else None
            day = int(g["d"]) if g.get("d") else None
            if (day is not None and not 1 <= day <= 31) or (month is not None and not 1 <= month <= 12):
                continue
            date = Date(int(g["y"]) if g.get("y") else None, month, day,
                        int(g["dec"]) * 10 if g.get("dec") else None)
            taken[m.start():m.end()] = [True] * (m.end() - m.start())
            found.append((m.start(), m.end(), date))
    return sorted(found, key=lambda f: f[0])


def find_numbers(text: str) -> list[tuple[int, int, float]]:
    """(start, end, value) of every number in ``text``, digits or words, with a scale word
    after it ("5 million"); "one" is left out."""
    out = []
    for m in _NUMBER.finditer(text):
        if m.group("n") is not None:
            value = float(m.group("n").replace(",", ""))
        else:
            word = m.group("w").lower()
            if word == "one":
                continue
            parts = re.split(r"[- ]", word)
            value = float(_ORDINALS.get(word, 0) or sum(_TENS.get(p, _UNITS.get(p, 0)) for p in parts))
        end = m.end()
        scale = _SCALE_AFTER.match(text, end)
        if scale is not None:
            value *= _SCALES[scale.group("s").lower()]
            end = scale.end()
        out.append((m.start(), end, value))
    return out


def relation(span: Any) -> frozenset[str]:
    """Lemma of the first content verb above ``span`` (and, for a number, the noun it counts)."""
    out = set()
    root = span.root
    if root.dep_ == "nummod" and root.head.pos_ in ("NOUN", "PROPN"):
        out.add(root.head.lemma_.lower())
    tok = root
    while tok.head.i != tok.i:
        tok = tok.head
        if span.start <= tok.i < span.end:
            continue
        if tok.pos_ == "VERB" and tok.lemma_.lower() not in LIGHT_VERBS:
            out.add(tok.lemma_.lower())
            break
    return frozenset(out)


def compatible(a: frozenset[str], b: frozenset[str]) -> bool:
    return not a or not b or bool(a & b)


@dataclass(frozen=True)
class Claim:
    """One checkable claim of a generation."""

    text: str  # as written
    kind: str  # "name", "date" or "number"
    value: Any  # tuple of normalised words, a Date, or a float
    relation: frozenset[str]
    sentence: str  # the sentence that states it
    start: int  # character span in the generation
    end: int

    @property
    def key(self) -> tuple:
        return self.kind, self.value, self.relation

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "kind": self.kind, "relation": sorted(self.relation), "sentence": self.sentence}


def _span(doc: Any, start: int, end: int) -> Any:
    return doc.char_span(start, end, alignment_mode="expand")


def extract_claims(doc: Any, subject: str) -> list[Claim]:
    """The distinct checkable claims of a parsed generation about ``subject`` (a title)."""
    me = subject_words(subject)
    claims: dict[tuple, Claim] = {}

    def add(kind: str, value: Any, span: Any, sent: Any) -> None:
        claim = Claim(span.text, kind, value, relation(span), sent.text.strip(), span.start_char, span.end_char)
        claims.setdefault(claim.key, claim)

    for sent in doc.sents:
        base = sent.start_char
        covered = set()  # token indices already part of a claim (or of the subject's name)
        for start, end, date in find_dates(sent.text):
            span = _span(doc, base + start, base + end)
            if span is not None:
                add("date", date, span, sent)
                covered.update(range(span.start, span.end))
        for ent in sent.ents:
            if any(t.i in covered for t in ent):
                continue
            if ent.label_ in NAME_LABELS:
                words = _drop_initials([w for w, _ in name_words(ent)])
                if words and not set(words) <= me:
                    add("name", tuple(words), ent, sent)
                covered.update(range(ent.start, ent.end))
            elif ent.label_ in NUMBER_LABELS:
                for start, end, value in find_numbers(ent.text):
                    span = _span(doc, ent.start_char + start, ent.start_char + end)
                    if span is not None:
                        add("number", value, span, sent)
                covered.update(range(ent.start, ent.end))
        run: list[Any] = []
        for tok in list(sent) + [None]:  # proper nouns and numbers the recogniser left out
            if tok is not None and tok.i not in covered and tok.pos_ == "PROPN":
                run.append(tok)
                continue
            if run:
                words = _drop_initials([w for w, _ in name_words(run)])
                if words and not set(words) <= me and any(t.text[:1].isupper() for t in run):
                    add("name", tuple(words), doc[run[0].i:run[-1].i + 1], sent)
                run = []
            if tok is not None and tok.i not in covered and tok.pos_ == "NUM":
                for start, end, value in find_numbers(tok.text):
                    add("number", value, doc[tok.i:tok.i + 1], sent)
    return sorted(claims.values(), key=lambda c: c.start)


@dataclass
class _Sentence:
    words: list[str]  # normalised name words, initials dropped
    word_tokens: list[int]  # token index of each word
    dates: list[tuple[Date, frozenset[str]]]
    numbers: list[tuple[float, frozenset[str]]]
    doc: Any = field(repr=False)


class Evidence:
    """Parsed passages of the subject's article, indexed for ``supports``."""

    def __init__(self, docs: Iterable[Any], subject: str):
        self.sentences: list[_Sentence] = []
        self.claims: list[Claim] = []  # what the passages themselves claim, for conflicts
        for doc in docs:
            self.claims += extract_claims(doc, subject)
            for sent in doc.sents:
                base = sent.start_char
                pairs = [(w, i) for w, i in name_words(sent) if len(w) > 1]
                dates = []
                for start, end, date in find_dates(sent.text):
                    span = _span(doc, base + start, base + end)
                    if span is not None:
                        dates.append((date, relation(span)))
                numbers = []
                for start, end, value in find_numbers(sent.text):
                    span = _span(doc, base + start, base + end)
                    if span is not None:
                        numbers.append((value, relation(span)))
                self.sentences.append(_Sentence([w for w, _ in pairs], [i for _, i in pairs], dates, numbers, doc))

    def mentions(self, claim: Claim) -> tuple[bool, bool]:
        """(a sentence states the claim's value under a compatible relation, one states the value at all)."""
        found = False
        for s in self.sentences:
            if claim.kind == "date":
                relations = [r for d, r in s.dates if claim.value.within(d)]
            elif claim.kind == "number":
                relations = [r for v, r in s.numbers if same_number(v, claim.value)]
            else:
                n = len(claim.value)
                relations = [relation(s.doc[s.word_tokens[i]:s.word_tokens[i + n - 1] + 1])
                             for i in range(len(s.words) - n + 1) if tuple(s.words[i:i + n]) == claim.value]
            if any(compatible(claim.relation, r) for r in relations):
                return True, True
            found = found or bool(relations)
        return False, found

    def conflicts(self, claim: Claim) -> bool:
        """The passages give the claim's relation another value of its kind ("born in Tolmere"
        against a claimed "born in Gravholm")."""
        return any(c.kind == claim.kind and c.relation & claim.relation and not same_value(c, claim)
                   for c in self.claims)

    def supports(self, claim: Claim) -> bool:
        return judge_claim(claim, [self])


def same_number(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a))


def same_value(a: Claim, b: Claim) -> bool:
    """Values that one of the two states in full or in part (a year of a date, a surname of a name)."""
    if a.kind == "date":
        return a.value.within(b.value) or b.value.within(a.value)
    if a.kind == "number":
        return same_number(a.value, b.value)
    short, long = sorted((a.value, b.value), key=len)
    return any(long[i:i + len(short)] == short for i in range(len(long) - len(short) + 1))


def judge_claim(claim: Claim, evidence: list[Evidence]) -> bool:
    """Supported: a passage states the value under a compatible relation, or states the value
    and no passage gives the claim's relation another value."""
    stated = False
    for e in evidence:
        compatible_here, here = e.mentions(claim)
        if compatible_here:
            return True
        stated = stated or here
    return stated and not any(e.conflicts(claim) for e in evidence)
