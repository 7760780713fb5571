"""The built-in corpus: Wikipedia-like biographies of fictional people, with their facts.

    lacy-fast synth --out DIR [--people N] [--seed S] [--renderings R] [--heldout F]
                    [--frequent-share F] [--frequent-docs K] [--free-wording W] [--mentions M] [key=value ...]

writes ``corpus.jsonl``, ``facts.jsonl`` (the ground truth), ``heldout.jsonl`` (new
renderings for perplexity and call statistics) and ``articles.jsonl`` (a knowledge source).
Facts are stated through paraphrase ``TEMPLATES``; ``CUES`` maps the words that introduce a
value to its attribute. ``PAPER`` is the paper's regime (frequent and rare people, free
wording), ``UNIFORM`` the fixed corpus of earlier versions. Everything is a pure function
of the seed and the settings. docs/data.md describes the files and the regime.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lacy_fast.config import Config, doc
from lacy_fast.errors import UserError
from lacy_fast.fileio import atomic_path
from lacy_fast.overrides import Shorthand, add_config_arguments, config_or_explain, shorthand_help

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
# about a quarter of the tokens, as in Wikipedia. Their slots hold *free wording* (below).
FILLERS = (
    "{subject} was known for a {adj=careful} and {adj=patient} approach to {his} work.",
    "Colleagues described {object} as {adj=generous} with {his} time.",
    "{subject} rarely spoke about {his} childhood in public.",
    "Little is known about {his} private life.",
    "{subject} wrote several short essays about the craft and taught younger colleagues.",
    "Friends remember {object} as a {adj=quiet} person with a dry sense of humour.",
    "{subject} kept detailed notebooks throughout {his} life.",
    "Outside work, {subject} spent much of {his} free time {pastime=walking and reading}.",
    "{subject} was admired by students for {adj=clear} and honest explanations.",
    "{subject_pos} letters show a strong interest in {topic=music and languages}.",
)

# Free wording: the slots ``{pool=fixed}`` of the fillers, whose words are a free choice.
# Any choice is truthful (it states nothing checkable about the person), so a model's loss
# on them stays high however well it knows the person, as on an unknown fact; but no model
# should call for them. Where the wording is not free (``Regime.free_wording``) a slot holds
# its fixed word. Every word is lower case, a common adjective, noun or verb phrase, so
# spaCy's fact rule (PROPN, NUM) leaves them alone (tests/test_data_synth.py measures it),
# and none is a value of the fact table.
FREE_WORDS: dict[str, tuple[str, ...]] = {
    "adj": ("careful", "patient", "generous", "quiet", "clear", "bold", "cheerful", "curious", "modest",
            "diligent", "thoughtful", "stubborn", "witty", "gentle", "shy", "calm", "humble", "meticulous",
            "playful", "reserved", "serious", "sincere", "warm", "frank", "tireless", "restless", "brilliant",
            "lively", "kind", "loyal", "cautious", "decisive", "friendly", "reliable", "sociable", "practical",
            "steady", "sharp", "talkative", "gracious", "spirited", "demanding", "forgiving", "nervous", "proud",
            "strict", "dreamy", "blunt", "candid", "cordial", "daring", "dutiful", "fearless", "fussy", "genial",
            "gloomy", "graceful", "hardy", "hasty", "jolly", "jovial", "keen", "lenient", "loving", "mellow",
            "merry", "methodical", "mild", "nimble", "peaceful", "pensive", "placid", "polite", "punctual",
            "quirky", "rational", "sensible", "serene", "shrewd", "sober", "solemn", "sporty", "stoic", "studious",
            "suave", "sunny", "tactful", "tender", "tidy", "tolerant", "tough", "trusting", "vivid", "wary",
            "wise", "zealous", "breezy", "bright", "brisk", "canny", "capable", "charming", "clever", "cool",
            "crafty", "dapper", "devoted"),
    "pastime": ("walking and reading", "gardening", "sailing", "playing chess", "cooking", "fishing", "cycling",
                "hiking", "swimming", "knitting", "baking bread", "singing in a choir", "climbing", "rowing",
                "carving wood", "watching birds", "reading poetry", "playing tennis", "dancing", "skating",
                "camping", "drawing", "solving puzzles", "travelling", "studying maps", "collecting stamps",
                "playing the piano", "painting landscapes", "writing letters", "walking the dog",
                "restoring furniture", "growing roses", "keeping bees", "mending clocks", "visiting museums",
                "learning languages", "riding horses", "playing cards", "repairing bicycles", "making pottery",
                "brewing beer", "making jam", "fencing", "playing golf", "running", "bowling", "gliding",
                "kayaking", "sketching birds", "pressing flowers", "building models", "binding books",
                "sewing quilts", "playing the cello", "playing the flute", "singing folk songs", "writing plays",
                "translating poems", "collecting shells", "collecting coins", "tending goats", "growing tomatoes",
                "watching films", "going to concerts", "visiting friends", "walking in the hills",
                "swimming in the sea", "playing billiards", "doing crosswords", "reading novels"),
    "topic": ("music and languages", "history", "poetry", "astronomy", "botany", "architecture", "theatre",
              "philosophy", "mathematics", "politics", "gardening", "sailing", "cooking", "travel", "religion",
              "economics", "folk songs", "old maps", "geology", "medicine", "education", "engineering", "printing",
              "weather", "farming", "trains", "birds", "chess", "sculpture", "opera", "film", "law", "ethics",
              "cartography", "navigation", "painting", "ceramics", "textiles", "forestry", "clocks", "bridges",
              "rivers", "mountains", "insects", "mushrooms", "fossils", "volcanoes", "tides", "lighthouses",
              "ships", "coins", "myths", "fairy tales", "grammar", "logic", "rhetoric", "dance", "jazz", "hymns",
              "gardens", "castles", "cathedrals", "windmills", "railways", "canals", "bees", "horses", "wine",
              "tea", "cheese"),
}

# Free wording between sentences: a connective before a sentence (never the first one), or
# none. Chosen, like the slots, only where the wording is free.
CONNECTIVES = ("Later", "Meanwhile", "Afterwards", "Eventually", "Notably", "In time", "Over the years", "By then",
               "Soon after", "In the end", "Back then", "Even so", "In particular", "At the time", "Before long",
               "In those years", "Interestingly", "Unusually", "Reportedly", "By all accounts", "Curiously",
               "Of course", "As it happened", "Around that time", "Still", "Besides", "Then", "Thereafter",
               "For a while", "Now and then", "To be sure", "Indeed", "Moreover", "Similarly", "Likewise",
               "Naturally", "Predictably", "Surprisingly", "Fittingly", "Happily")
CONNECTIVE_SHARE = 0.4  # of the sentences after the first, when the wording is free

# How a biography mentions a frequent person: popular people turn up in other people's
# biographies too. The relation states no fact of the fact table.
MENTIONS = ("{subject} studied under {famous}.", "{subject} once worked alongside {famous}.",
            "{subject} was a close friend of {famous}.", "{subject} corresponded for years with {famous}.",
            "{subject} was often compared to {famous}.", "{subject} admired the work of {famous}.")

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


@dataclass(frozen=True)
class Regime:
    """How the corpus treats its people and its wording: the knobs of the paper's regime.

    - ``frequent_share``: share of people who are *frequent*: written about in
      ``frequent_docs`` times as many documents as the others (the *rare*, who get the
      ``renderings`` documents every person gets). A small model can memorise the facts of
      the frequent people and not those of the rare ones, while they all stay in one
      corpus; 0 makes every person equally rare, as in the uniform corpus.
    - ``free_wording``: probability that a free-wording slot (``FREE_WORDS``) takes a
      random word of its pool instead of its fixed word, and (times ``CONNECTIVE_SHARE``)
      that a sentence opens with a random connective: the acceptable alternatives, whose
      loss stays high for every model although any choice is truthful. 0: fixed wording.
    - ``mentions``: probability that a biography also mentions one of the frequent people
      by name ("studied under ..."), as popular people turn up in other biographies.
    """

    frequent_share: float = 0.0
    frequent_docs: int = 1
    free_wording: float = 0.0
    mentions: float = 0.0

    def check(self) -> None:
        for name in ("frequent_share", "free_wording", "mentions"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"--{name.replace('_', '-')} is {getattr(self, name)}; it must lie in [0, 1]")
        if self.frequent_docs < 1:
            raise UserError(f"--frequent-docs is {self.frequent_docs}; it must be at least 1")


# The corpus of earlier versions: every person written about equally, fixed wording. The
# Python API keeps it as its default (same seed, same bytes as before).
UNIFORM = Regime()
# The paper's regime, the command's default: 10% of people in 16x the documents, free
# wording everywhere, a famous person mentioned in 30% of the biographies.
PAPER = Regime(frequent_share=0.1, frequent_docs=16, free_wording=1.0, mentions=0.3)


@dataclass(frozen=True)
class Rendering:
    """One biography: its text, the template chosen per attribute, and the character spans
    of its free wording (slot words and connectives)."""

    text: str
    choices: dict[str, int]
    free: tuple[tuple[int, int], ...] = ()


def render(person: Person, rng: random.Random, avoid: dict[str, set[int]] | None = None,
           regime: Regime = UNIFORM, famous: tuple[Person, ...] = ()) -> Rendering:
    """A biography of ``person``.

    With ``avoid`` (the templates of other renderings, per attribute), every attribute takes
    another template where one is left. ``famous``: the frequent people a mention may name.
    """
    attrs = [a for a in ATTRIBUTES if a in person.facts]
    rng.shuffle(attrs)
    choices: dict[str, int] = {}
    templates: list[tuple[str, str, str]] = []  # (template, subject, value) per sentence
    fillers = rng.sample(range(len(FILLERS)), k=rng.randint(2, 4))
    slots = sorted(rng.sample(range(1, len(attrs) + 1), k=len(fillers)))  # filler positions, never first
    he = person.pronoun
    for pos, attr in enumerate(attrs):
        options = [k for k in range(len(TEMPLATES[attr])) if avoid is None or k not in avoid[attr]]
        k = rng.choice(options or range(len(TEMPLATES[attr])))
        choices[attr] = k
        subject = person.name if pos == 0 else rng.choice((he, he, he, person.surname, person.name))
        templates.append((TEMPLATES[attr][k], subject, person.facts[attr]))
        while slots and slots[0] == pos + 1:
            slots.pop(0)
            templates.append((FILLERS[fillers.pop()], rng.choice((he, he, person.surname)), ""))
    others = [p for p in famous if p.id != person.id]
    if others and regime.mentions > 0 and rng.random() < regime.mentions:
        mention = rng.choice(MENTIONS).replace("{famous}", rng.choice(others).name)
        templates.insert(rng.randint(1, len(templates)), (mention, he, ""))

    text, free = "", []
    for n, (template, subject, value) in enumerate(templates):
        opener = ""
        if n and template.startswith("{subject") and _free(rng, regime.free_wording * CONNECTIVE_SHARE):
            opener = rng.choice(CONNECTIVES)
        sentence, spans = _fill(template, subject, person, value, rng, regime.free_wording, capital=not opener)
        start = len(text) + (1 if text else 0)
        if opener:
            free.append((start, start + len(opener)))
            start += len(opener) + 2
            sentence = f"{opener}, {sentence}"
        free += [(start + a, start + b) for a, b in spans]
        text += (" " if text else "") + sentence
    return Rendering(text, choices, tuple(free))


def _free(rng: random.Random, p: float) -> bool:
    """A free choice with probability ``p``; draws nothing when ``p`` is 0 (the uniform
    corpus stays byte for byte what it was)."""
    return p > 0 and (p >= 1 or rng.random() < p)


_SLOT = re.compile(r"\{([a-z_]+)(?:=([^}]*))?\}")


def _fill(template: str, subject: str, person: Person, value: str, rng: random.Random, free_wording: float,
          capital: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """The sentence and the character spans of the free words it chose.

    Slots: {value}; {subject} (a name, or a pronoun); {object} (the same name, or him/her);
    {subject_pos} (a name's possessive, or his/her); {his} / {he} (pronouns); {pool=word}
    (free wording: a random word of FREE_WORDS[pool] with probability ``free_wording``,
    else ``word``).
    """
    his = "his" if person.pronoun == "he" else "her"
    is_pronoun = subject == person.pronoun
    fields = {"value": value, "subject": subject, "subject_pos": his if is_pronoun else f"{subject}'s",
              "object": ("him" if person.pronoun == "he" else "her") if is_pronoun else subject,
              "his": his, "he": person.pronoun}
    out, spans, pos = [], [], 0
    for m in _SLOT.finditer(template):
        out.append(template[pos:m.start()])
        name, fixed = m.groups()
        if fixed is None:
            out.append(fields[name])
        else:
            word = rng.choice(FREE_WORDS[name]) if _free(rng, free_wording) else fixed
            if free_wording > 0:  # a free slot, whichever word it drew
                at = sum(len(s) for s in out)
                spans.append((at, at + len(word)))
            out.append(word)
        pos = m.end()
    out.append(template[pos:])
    text = "".join(out)
    return (text[0].upper() + text[1:] if capital else text), spans


@dataclass(frozen=True)
class Biographies:
    """A person's corpus documents and held-out rendering (None: not held out)."""

    person: Person
    frequent: bool
    documents: list[Rendering]
    heldout: Rendering | None


def biographies(n: int, seed: int, heldout: float = 0.1, renderings: int = 1,
                regime: Regime = UNIFORM) -> Iterator[Biographies]:
    """The documents of each of ``n`` people, in id order.

    A rare person gets ``renderings`` documents, a frequent one (the first
    ``regime.frequent_share`` of the ids) ``renderings * regime.frequent_docs``, each
    through other templates, fillers, wording and order: the repetition a model needs to
    memorise facts. Held out: every frequent person, and every ``1 / heldout``-th rare one
    (by id); the held-out text avoids every template the person's documents used, as far as
    templates last.
    """
    regime.check()
    step = round(1 / heldout) if heldout > 0 else 0
    people = make_people(n, seed)
    n_frequent = round(regime.frequent_share * n) if regime.frequent_docs > 1 else 0
    famous = tuple(people[:n_frequent])
    for person in people:
        frequent = person.id < n_frequent
        docs, used = [], {attr: set() for attr in person.facts}
        for r in range(renderings * (regime.frequent_docs if frequent else 1)):
            key = f"lacy-synth-text:{seed}:{person.id}" + (f":{r}" if r else "")
            doc = render(person, random.Random(key), used if r else None, regime, famous)
            docs.append(doc)
            for attr, k in doc.choices.items():
                used[attr].add(k)
        other = None
        if step and (frequent or person.id % step == 0):
            other = render(person, random.Random(f"lacy-synth-heldout:{seed}:{person.id}"), used, regime, famous)
        yield Biographies(person, frequent, docs, other)


def generate(n: int, seed: int, heldout: float = 0.1, renderings: int = 1,
             regime: Regime = UNIFORM) -> Iterator[tuple[Person, list[str], str | None]]:
    """(person, its corpus texts, held-out text or None) for each of ``n`` people (``biographies``)."""
    for b in biographies(n, seed, heldout, renderings, regime):
        yield b.person, [d.text for d in b.documents], None if b.heldout is None else b.heldout.text


def write(out: str | Path, n: int = DEFAULT_PEOPLE, seed: int = 0, heldout: float = 0.1,
          renderings: int = 1, regime: Regime = UNIFORM) -> dict[str, int]:
    """Write corpus.jsonl, facts.jsonl, heldout.jsonl and articles.jsonl into ``out``, each atomically.

    The corpus holds document 0 of every person, then document 1 of every person who has
    one, and so on. Held-out rows alternate between frequent and rare people (while both
    last), so the first rows of the file, which evaluation reads, hold both.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory")
    if renderings < 1:
        raise UserError(f"renderings is {renderings}; it must be at least 1")
    regime.check()
    out.mkdir(parents=True, exist_ok=True)
    counts = {"people": 0, "frequent": 0, "heldout": 0, "facts": 0, "documents": 0}
    docs: list[list[str]] = []
    held: dict[bool, list[str]] = {True: [], False: []}
    with atomic_path(out / "corpus.jsonl") as c_tmp, atomic_path(out / "facts.jsonl") as f_tmp, \
            atomic_path(out / "heldout.jsonl") as h_tmp, atomic_path(out / "articles.jsonl") as a_tmp, \
            open(f_tmp, "w", encoding="utf-8") as facts, open(a_tmp, "w", encoding="utf-8") as articles:
        for b in biographies(n, seed, heldout, renderings, regime):
            p = b.person
            docs.append([d.text for d in b.documents])
            articles.write(json.dumps({"title": p.name, "text": b.documents[0].text}) + "\n")
            facts.write(json.dumps({"id": p.id, "name": p.name, "pronoun": p.pronoun, "facts": p.facts,
                                    "bucket": "frequent" if b.frequent else "rare",
                                    "documents": len(b.documents)}) + "\n")
            counts["people"] += 1
            counts["frequent"] += b.frequent
            counts["facts"] += len(p.facts)
            counts["documents"] += len(b.documents)
            if b.heldout is not None:
                held[b.frequent].append(json.dumps({"id": p.id, "text": b.heldout.text,
                                                    "free": [list(s) for s in b.heldout.free]}))
        with open(c_tmp, "w", encoding="utf-8") as corpus:
            for r in range(max(map(len, docs), default=0)):
                for texts in docs:
                    if r < len(texts):
                        corpus.write(json.dumps({"text": texts[r]}) + "\n")
        with open(h_tmp, "w", encoding="utf-8") as h:
            for row in _alternate(held[True], held[False]):
                h.write(row + "\n")
        counts["heldout"] = len(held[True]) + len(held[False])
    return counts


def _alternate(a: list[str], b: list[str]) -> Iterator[str]:
    """a[0], b[0], a[1], b[1], ..., then the rest of the longer list."""
    for x, y in zip(a, b):
        yield x
        yield y
    longer = a if len(a) > len(b) else b
    yield from longer[min(len(a), len(b)):]


@dataclass
class SynthConfig(Config):
    """The settings of `lacy-fast synth` (its flags are shorthands for these keys)."""

    out: str = doc("", "output directory")
    people: int = doc(DEFAULT_PEOPLE, "people to invent")
    seed: int = doc(0, "seed; the same seed writes the same bytes")
    renderings: int = doc(1, "biographies of every person in the corpus, each through other templates")
    heldout: float = doc(0.1, "share of the rare people who also get a held-out rendering (every frequent person does)")
    frequent_share: float = doc(PAPER.frequent_share, "share of people written about often (0: everyone equally)")
    frequent_docs: int = doc(PAPER.frequent_docs, "a frequent person gets this many times the biographies")
    free_wording: float = doc(PAPER.free_wording, "probability that a free-wording slot or connective takes a "
                              "random word, an acceptable alternative (0: fixed wording)")
    mentions: float = doc(PAPER.mentions, "share of biographies that mention a frequent person")

    def check(self) -> None:
        self._positive("people", "renderings")
        self._fraction("heldout")


SHORTHANDS = [Shorthand(f"--{name.replace('_', '-')}", name) for name in
              ("out", "people", "seed", "renderings", "heldout", "frequent_share", "frequent_docs", "free_wording",
               "mentions")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    types = {"people": int, "seed": int, "renderings": int, "frequent_docs": int}
    for s in SHORTHANDS:
        parser.add_argument(s.flag, type=types.get(s.dest, float) if s.dest != "out" else str,
                            help=shorthand_help(_doc_of(s.dest), s.key))
    add_config_arguments(parser, SynthConfig)


def _doc_of(name: str) -> str:
    import dataclasses as dc

    return next(f.metadata["doc"] for f in dc.fields(SynthConfig) if f.name == name)


def run(args: argparse.Namespace) -> int:
    if (cfg := config_or_explain(SynthConfig, args, SHORTHANDS, "synth")) is None:  # --explain
        return 0
    if not cfg.out:
        raise UserError("no output directory given; pass --out DIR")
    regime = Regime(cfg.frequent_share, cfg.frequent_docs, cfg.free_wording, cfg.mentions)
    counts = write(cfg.out, cfg.people, cfg.seed, cfg.heldout, cfg.renderings, regime)
    print(f"wrote {counts['documents']} biographies of {counts['people']} people ({counts['frequent']} frequent, "
          f"{counts['facts']} facts) and {counts['heldout']} held-out renderings to {cfg.out}")
    return 0
