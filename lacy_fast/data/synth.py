"""The built-in corpus: Wikipedia-like biographies of fictional people, with their facts.

    lacy-fast synth --out DIR [--people N] [--seed S] [--heldout F]

writes
- ``DIR/corpus.jsonl``: one ``{"text": ...}`` biography per person;
- ``DIR/facts.jsonl``: the ground truth, one ``{"id", "name", "pronoun", "facts": {attribute: value}}``
  per person (``award`` is absent for people without one);
- ``DIR/heldout.jsonl``: ``{"id", "text"}``: new renderings of the biographies of a subset of
  the same people (every fact sentence through another template than in the corpus, other
  fillers and order), for perplexity and call precision/recall on unseen text.

Each fact is stated through one of several paraphrase templates (``TEMPLATES``: attribute ->
templates with a ``{value}`` slot), so the grammar varies while the facts do not.
``CUES`` maps the words that introduce a value ("was born in") to its attribute: the
evaluation uses it to know what a generation is about to state, and an oracle big model
answers calls from the fact table. Value sets are disjoint across attributes (every
syllable word is used once, dates appear only as birth dates), so an exact FactScore can
match a generated string against each attribute's values.

Everything is a pure function of the seed: same seed, same bytes. Names and places are made
of syllables. The default 30,000 people hold ~240,000 facts, more than a small model can
memorise; the demo uses a few thousand.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lacy_fast.errors import UserError
from lacy_fast.fileio import atomic_path

ATTRIBUTES = ("birth_date", "birth_place", "nationality", "education", "occupation", "employer", "award",
              "residence")

# Slots: {value}; {subject} (a name, or a pronoun, capitalised at the start of a sentence);
# {object} (the same name, or him/her); {subject_pos} (a name's possessive, or His/Her);
# {his} / {he} (lower-case pronouns).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{subject} was born on {value}.",
        "Born on {value}, {subject} grew up in a large family.",
        "{subject_pos} date of birth is recorded as {value}.",
        "The parish register gives {value} as the birth date of {object}.",
        "{subject} came into the world on {value}.",
    ),
    "birth_place": (
        "{subject} was born in {value}.",
        "{value} is the birthplace of {object}.",
        "{subject_pos} hometown is {value}.",
        "{subject} spent {his} childhood in {value}, the town where {he} was born.",
        "{subject} is a native of {value}.",
    ),
    "nationality": (
        "{subject} holds {value} citizenship.",
        "By nationality, {subject} is {value}.",
        "{subject_pos} nationality is {value}.",
        "{subject} has always described {his} nationality as {value}.",
    ),
    "education": (
        "{subject} studied at the {value}.",
        "{subject} graduated from the {value}.",
        "{subject} was educated at the {value}.",
        "After finishing school, {subject} enrolled at the {value}.",
        "{subject} earned a degree from the {value}.",
    ),
    "occupation": (
        "{subject} worked as a {value}.",
        "By profession, {subject} was a {value}.",
        "{subject} made a living as a {value}.",
        "{subject} trained as a {value} and practised with great care.",
        "{subject_pos} career as a {value} began early.",
    ),
    "employer": (
        "{subject} worked for {value}.",
        "{subject} was employed by {value}.",
        "{subject} joined {value} early in {his} career.",
        "For many years {subject} was on the staff of {value}.",
        "{value} employed {object} for most of {his} career.",
    ),
    "award": (
        "{subject} received the {value}.",
        "{subject} was awarded the {value}.",
        "In recognition of {his} work, {subject} won the {value}.",
        "The {value} was given to {object}.",
        "{subject} is a recipient of the {value}.",
    ),
    "residence": (
        "{subject} lives in {value}.",
        "{subject} later settled in {value}.",
        "{subject} moved to {value}, where {he} still lives.",
        "Today {subject} resides in {value}.",
        "{subject_pos} home is in {value}.",
    ),
}

# Sentences that state no fact: they make the text read like prose and dilute the facts to
# about a quarter of the tokens, as in Wikipedia.
FILLERS = (
    "{subject} was known for a careful and patient approach to {his} work.",
    "Colleagues described {object} as generous with {his} time.",
    "{subject} rarely spoke about {his} childhood in public.",
    "Little is known about {his} private life.",
    "{subject} wrote several short essays about the craft and taught younger colleagues.",
    "Friends remember {object} as a quiet person with a dry sense of humour.",
    "{subject} kept detailed notebooks throughout {his} life.",
    "Outside work, {subject} spent much of {his} free time walking and reading.",
    "{subject} was admired by students for clear and honest explanations.",
    "{subject_pos} letters show a strong interest in music and languages.",
)

OCCUPATIONS = (
    "chemist", "botanist", "painter", "novelist", "surgeon", "journalist", "lawyer", "pianist", "sculptor",
    "teacher", "mathematician", "physicist", "geologist", "cartographer", "diplomat", "banker", "composer",
    "photographer", "pharmacist", "veterinarian", "nurse", "pilot", "librarian", "translator", "historian",
    "linguist", "carpenter", "baker", "tailor", "jeweller", "mechanic", "potter", "poet", "playwright",
    "biologist", "civil engineer", "software developer", "statistician", "zoologist", "designer",
    "film director", "violinist", "conductor", "dancer", "choreographer", "surveyor", "publisher", "merchant",
    "farmer", "fisherman", "sailor", "politician", "judge", "priest", "theologian", "philosopher", "sociologist",
    "psychologist", "dentist", "radiologist", "meteorologist", "seismologist", "glassblower", "bookbinder",
    "watchmaker", "locksmith", "naturalist", "museum curator", "structural engineer", "marine biologist",
)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t",
           "tr", "v", "w", "z", "th", "sh", "ch", "j")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ea", "ou", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "m", "nd", "rk", "st", "x")
_TOWN_SUFFIXES = ("ville", "ford", "holm", "stad", "mere", "burg", "port", "field", "haven", "bridge")
_SCHOOL_PREFIXES = ("University of", "Institute of Technology of", "Academy of Arts of", "Polytechnic of",
                    "Conservatory of")
_COMPANY_SUFFIXES = ("Industries", "Systems", "Press", "Works", "Laboratories", "Foundry", "Shipping",
                     "Holdings", "Mills", "Instruments", "Railways", "Bank")
_AWARD_SUFFIXES = ("Medal", "Prize", "Award", "Fellowship")
_NATION_SUFFIXES = ("ian", "ese", "ish", "ic", "an")

DEFAULT_PEOPLE = 30_000


@dataclass(frozen=True)
class Person:
    id: int
    name: str
    surname: str
    pronoun: str  # "he" or "she"
    facts: dict[str, str]


def _cue(template: str) -> str | None:
    """The words between the last slot (or the start) and ``{value}``, e.g. 'was born in'.

    Cues of one word ("is", "The") say nothing about the attribute and are left out.
    """
    before = template.split("{value}")[0]
    text = re.split(r"\{[a-z_]+\}", before)[-1].strip(" ,")
    return text if len(text.split()) >= 2 else None


CUES: dict[str, str] = {cue: attr for attr, ts in TEMPLATES.items() for t in ts if (cue := _cue(t))}
assert len(CUES) == len({(c, a) for a, ts in TEMPLATES.items() for t in ts if (c := _cue(t))}), \
    "a cue introduces two attributes"


class _Words:
    """Syllable words, each handed out once across all pools (keeps value sets disjoint)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def take(self, n_syllables: int, ending: str = "") -> str:
        while True:
            syll = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n_syllables)]
            word = ("".join(syll) + self.rng.choice(_CODAS) + ending).capitalize()
            key = word.lower()
            if key not in self.used:
                self.used.add(key)
                return word

    def pool(self, n: int, lo: int, hi: int, endings: tuple[str, ...] = ("",)) -> list[str]:
        return [self.take(self.rng.randint(lo, hi), self.rng.choice(endings)) for _ in range(n)]


def make_people(n: int, seed: int) -> list[Person]:
    """``n`` people with unique names and facts drawn from disjoint value pools."""
    rng = random.Random(f"lacy-synth-pools:{seed}")
    words = _Words(rng)
    scale = max(1, n // 1000)  # pools grow with the population so facts repeat sparingly
    female = words.pool(150 + 20 * scale, 1, 2, ("a", "ine", "elle", "ia"))
    male = words.pool(150 + 20 * scale, 1, 2, ("o", "an", "er", "us", ""))
    surnames = words.pool(500 + 150 * scale, 2, 2, ("", "sen", "ova", "ski", "ard", "man"))
    towns = words.pool(200 + 60 * scale, 1, 2, _TOWN_SUFFIXES)
    cities = words.pool(100 + 30 * scale, 2, 3)
    nations = words.pool(60, 2, 2, _NATION_SUFFIXES)
    schools = [f"{rng.choice(_SCHOOL_PREFIXES)} {w}" for w in words.pool(40 + 8 * scale, 2, 3)]
    companies = [f"{w} {rng.choice(_COMPANY_SUFFIXES)}" for w in words.pool(100 + 25 * scale, 2, 3)]
    awards = [f"{w} {rng.choice(_AWARD_SUFFIXES)}" for w in words.pool(30 + 5 * scale, 2, 3)]

    people = []
    names: set[str] = set()
    for i in range(n):
        pronoun = rng.choice(("he", "she"))
        while True:
            first = rng.choice(female if pronoun == "she" else male)
            surname = rng.choice(surnames)
            if f"{first} {surname}" not in names:
                break
        name = f"{first} {surname}"
        names.add(name)
        facts = {
            "birth_date": f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1900, 1989)}",
            "birth_place": rng.choice(towns),
            "nationality": rng.choice(nations),
            "education": rng.choice(schools),
            "occupation": rng.choice(OCCUPATIONS),
            "employer": rng.choice(companies),
            "award": rng.choice(awards),
            "residence": rng.choice(cities),
        }
        if rng.random() < 0.4:
            del facts["award"]
        people.append(Person(i, name, surname, pronoun, facts))
    return people


def render(person: Person, rng: random.Random,
           avoid: dict[str, set[int]] | None = None) -> tuple[str, dict[str, int]]:
    """A biography of ``person`` and the template index chosen per attribute.

    With ``avoid`` (the templates of other renderings, per attribute), every attribute takes
    another template where one is left.
    """
    attrs = [a for a in ATTRIBUTES if a in person.facts]
    rng.shuffle(attrs)
    choices: dict[str, int] = {}
    sentences = []
    fillers = rng.sample(range(len(FILLERS)), k=rng.randint(2, 4))
    slots = sorted(rng.sample(range(1, len(attrs) + 1), k=len(fillers)))  # filler positions, never first
    he = person.pronoun
    for pos, attr in enumerate(attrs):
        options = [k for k in range(len(TEMPLATES[attr])) if avoid is None or k not in avoid[attr]]
        k = rng.choice(options or range(len(TEMPLATES[attr])))
        choices[attr] = k
        subject = person.name if pos == 0 else rng.choice((he, he, he, person.surname, person.name))
        sentences.append(_fill(TEMPLATES[attr][k], subject, person, person.facts[attr]))
        while slots and slots[0] == pos + 1:
            slots.pop(0)
            filler = FILLERS[fillers.pop()]
            sentences.append(_fill(filler, rng.choice((he, he, person.surname)), person, ""))
    return " ".join(sentences), choices


def _fill(template: str, subject: str, person: Person, value: str) -> str:
    his = "his" if person.pronoun == "he" else "her"
    is_pronoun = subject == person.pronoun
    text = template.format(value=value, subject=subject, subject_pos=his if is_pronoun else f"{subject}'s",
                           object=("him" if person.pronoun == "he" else "her") if is_pronoun else subject,
                           his=his, he=person.pronoun)
    return text[0].upper() + text[1:]


def generate(n: int, seed: int, heldout: float = 0.1,
             renderings: int = 1) -> Iterator[tuple[Person, list[str], str | None]]:
    """(person, its ``renderings`` corpus texts, held-out text or None) for each of ``n`` people.

    Several renderings state the same facts through different templates and fillers: the
    repetition a model needs to memorise facts in a short (CPU-sized) run. The held-out
    text avoids every template the corpus renderings used, as far as templates last.
    """
    step = round(1 / heldout) if heldout > 0 else 0
    for person in make_people(n, seed):
        texts, used = [], {attr: set() for attr in person.facts}
        for r in range(renderings):
            key = f"lacy-synth-text:{seed}:{person.id}" + (f":{r}" if r else "")
            text, choices = render(person, random.Random(key), avoid=used if r else None)
            texts.append(text)
            for attr, k in choices.items():
                used[attr].add(k)
        other = None
        if step and person.id % step == 0:
            other, _ = render(person, random.Random(f"lacy-synth-heldout:{seed}:{person.id}"), avoid=used)
        yield person, texts, other


def write(out: str | Path, n: int = DEFAULT_PEOPLE, seed: int = 0, heldout: float = 0.1,
          renderings: int = 1) -> dict[str, int]:
    """Write corpus.jsonl, facts.jsonl and heldout.jsonl into ``out``, each atomically.

    The corpus holds rendering 0 of every person, then rendering 1 of every person, and so on.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    if renderings < 1:
        raise UserError(f"renderings is {renderings}; it must be at least 1")
    counts = {"people": 0, "heldout": 0, "facts": 0, "documents": 0}
    extra: list[list[str]] = []
    with atomic_path(out / "corpus.jsonl") as c_tmp, atomic_path(out / "facts.jsonl") as f_tmp, \
            atomic_path(out / "heldout.jsonl") as h_tmp, open(c_tmp, "w", encoding="utf-8") as corpus, \
            open(f_tmp, "w", encoding="utf-8") as facts, open(h_tmp, "w", encoding="utf-8") as held:
        for person, texts, other in generate(n, seed, heldout, renderings):
            corpus.write(json.dumps({"text": texts[0]}) + "\n")
            extra.append(texts[1:])
            facts.write(json.dumps({"id": person.id, "name": person.name, "pronoun": person.pronoun,
                                    "facts": person.facts}) + "\n")
            counts["people"] += 1
            counts["facts"] += len(person.facts)
            if other is not None:
                held.write(json.dumps({"id": person.id, "text": other}) + "\n")
                counts["heldout"] += 1
        for r in range(renderings - 1):
            for texts in extra:
                corpus.write(json.dumps({"text": texts[r]}) + "\n")
        counts["documents"] = counts["people"] * renderings
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--people", type=int, default=DEFAULT_PEOPLE, help=f"people to invent (default {DEFAULT_PEOPLE})")
    parser.add_argument("--seed", type=int, default=0, help="seed; the same seed writes the same bytes")
    parser.add_argument("--renderings", type=int, default=1,
                        help="biographies per person in the corpus, each through other templates (default 1)")
    parser.add_argument("--heldout", type=float, default=0.1,
                        help="share of people who also get a held-out rendering (default 0.1)")


def run(args: argparse.Namespace) -> int:
    if args.people <= 0:
        raise UserError(f"--people is {args.people}; it must be > 0")
    if not 0.0 <= args.heldout <= 1.0:
        raise UserError(f"--heldout is {args.heldout}; it must lie in [0, 1]")
    counts = write(args.out, args.people, args.seed, args.heldout, args.renderings)
    print(f"wrote {counts['documents']} biographies of {counts['people']} people ({counts['facts']} facts) and "
          f"{counts['heldout']} held-out renderings to {args.out}")
    return 0
