"""The synthetic biography corpus: deterministic, facts stated, disjoint value sets."""
import json
import random
import re
import subprocess
import sys

from lacy_fast.data import synth


def _write(tmp_path, name, people=300, seed=0):
    out = tmp_path / name
    synth.write(out, people, seed)
    return out


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = _write(tmp_path, "a"), _write(tmp_path, "b"), _write(tmp_path, "c", seed=1)
    for name in ("corpus.jsonl", "facts.jsonl", "heldout.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()


def test_every_fact_is_stated_in_its_biography(tmp_path):
    out = _write(tmp_path, "a")
    texts = [json.loads(line)["text"] for line in (out / "corpus.jsonl").open()]
    people = [json.loads(line) for line in (out / "facts.jsonl").open()]
    assert len(texts) == len(people) == 300
    for text, person in zip(texts, people):
        assert person["name"] in text.split(". ")[0]  # the first sentence names the person in full
        assert set(person["facts"]) <= set(synth.ATTRIBUTES)
        assert set(person["facts"]) >= set(synth.ATTRIBUTES) - {"award"}
        for value in person["facts"].values():
            assert value in text
    assert len({p["name"] for p in people}) == 300


def test_value_sets_are_disjoint_across_attributes():
    people = synth.make_people(2000, seed=0)
    owner = {}
    for p in people:
        for attr, value in p.facts.items():
            assert owner.setdefault(value, attr) == attr, (value, attr, owner[value])
    names = {p.name for p in people}
    assert not names & set(owner)


def test_heldout_renders_the_same_facts_with_other_templates(tmp_path):
    out = _write(tmp_path, "a")
    corpus = [json.loads(line)["text"] for line in (out / "corpus.jsonl").open()]
    facts = [json.loads(line) for line in (out / "facts.jsonl").open()]
    held = [json.loads(line) for line in (out / "heldout.jsonl").open()]
    assert len(held) == 30
    for row in held:
        text = row["text"]
        assert text not in corpus
        for value in facts[row["id"]]["facts"].values():
            assert value in text
        # No sentence of a held-out biography that states a fact appears in its corpus text.
        for sentence in re.split(r"(?<=\.) ", text):
            if any(v in sentence for v in facts[row["id"]]["facts"].values()):
                assert sentence not in corpus[row["id"]]


def test_templates_and_cues_are_structured_data():
    for attr, templates in synth.TEMPLATES.items():
        assert attr in synth.ATTRIBUTES and len(templates) >= 4
        assert all(t.count("{value}") == 1 for t in templates)
    assert synth.CUES["was born in"] == "birth_place"
    assert synth.CUES["was born on"] == "birth_date"
    assert synth.CUES["worked for"] == "employer"


def test_cli(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lacy_fast.cli", "synth", "--out", str(tmp_path / "s"),
                           "--people", "50", "--seed", "3", "--frequent-share", "0"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sum(1 for _ in (tmp_path / "s" / "corpus.jsonl").open()) == 50
    # The default is the paper's regime: 5 frequent people in 16 biographies each, 45 in one.
    proc = subprocess.run([sys.executable, "-m", "lacy_fast.cli", "synth", "--out", str(tmp_path / "p"),
                           "--people", "50", "--seed", "3"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sum(1 for _ in (tmp_path / "p" / "corpus.jsonl").open()) == 5 * 16 + 45
    proc = subprocess.run([sys.executable, "-m", "lacy_fast.cli", "synth", "--out", str(tmp_path / "s"),
                           "--people", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    proc = subprocess.run([sys.executable, "-m", "lacy_fast.cli", "synth", "--out", str(tmp_path / "s"),
                           "--free-wording", "1.5"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--free-wording" in proc.stderr and proc.stderr.count("\n") == 1


def test_several_renderings_state_the_same_facts_differently(tmp_path):
    out = tmp_path / "r"
    counts = synth.write(out, 40, seed=2, renderings=3)
    texts = [json.loads(line)["text"] for line in (out / "corpus.jsonl").open()]
    people = [json.loads(line) for line in (out / "facts.jsonl").open()]
    held = {json.loads(line)["id"]: json.loads(line)["text"] for line in (out / "heldout.jsonl").open()}
    assert counts["documents"] == len(texts) == 120 and len(people) == 40
    # Rendering 0 is the single-rendering corpus, byte for byte.
    synth.write(tmp_path / "one", 40, seed=2)
    assert [json.loads(line)["text"] for line in (tmp_path / "one" / "corpus.jsonl").open()] == texts[:40]
    for p in people:
        renderings = [texts[p["id"] + 40 * r] for r in range(3)]
        assert len(set(renderings)) == 3
        for text in renderings:
            assert all(value in text for value in p["facts"].values())
        if p["id"] in held:  # held-out text repeats no fact sentence of any rendering
            for sentence in re.split(r"(?<=\.) ", held[p["id"]]):
                if any(v in sentence for v in p["facts"].values()):
                    assert all(sentence not in text for text in renderings), sentence


# -- the paper's regime: popularity buckets and free wording --------------------------------


def test_popularity_buckets_are_respected(tmp_path):
    out = tmp_path / "p"
    regime = synth.Regime(frequent_share=0.1, frequent_docs=6, free_wording=1.0, mentions=0.5)
    counts = synth.write(out, 120, seed=5, heldout=0.25, renderings=2, regime=regime)
    people = [json.loads(line) for line in (out / "facts.jsonl").open()]
    texts = [json.loads(line)["text"] for line in (out / "corpus.jsonl").open()]
    # Every biography opens with its subject's full name: count each person's biographies.
    opens = {p["name"]: sum(p["name"] in t.split(". ")[0] for t in texts) for p in people}
    frequent = [p for p in people if p["bucket"] == "frequent"]
    assert len(frequent) == counts["frequent"] == 12
    assert {p["bucket"] for p in people} == {"frequent", "rare"}
    for p in people:
        expected = 2 * 6 if p["bucket"] == "frequent" else 2
        assert p["documents"] == expected == opens[p["name"]], p["name"]
    assert counts["documents"] == len(texts) == 12 * 12 + 108 * 2
    # Frequent people are mentioned in other biographies; rare ones never.
    mentioned = {p["name"]: sum(p["name"] in t and p["name"] not in t.split(". ")[0] for t in texts)
                 for p in people}
    assert sum(mentioned[p["name"]] for p in frequent) > 0
    assert all(mentioned[p["name"]] == 0 for p in people if p["bucket"] == "rare")
    # Every frequent person is held out; the held-out file alternates the buckets.
    held = [json.loads(line) for line in (out / "heldout.jsonl").open()]
    buckets = [people[row["id"]]["bucket"] for row in held]
    assert buckets.count("frequent") == 12 and buckets[:4] == ["frequent", "rare", "frequent", "rare"]


def test_free_wording_spans_are_free_choices_and_never_facts():
    people = synth.make_people(60, seed=1)
    famous = tuple(people[:6])
    words = {w for pool in synth.FREE_WORDS.values() for w in pool} | set(synth.CONNECTIVES)
    values = {v for p in people for v in p.facts.values()}
    assert not words & values and not words & set(synth.OCCUPATIONS)
    seen: set[str] = set()
    for p in people:
        doc = synth.render(p, random.Random(p.id), regime=synth.PAPER, famous=famous)
        free = [doc.text[s:e] for s, e in doc.free]
        assert free and all(w in words for w in free), free
        for value in p.facts.values():  # facts are stated, and no free span overlaps one
            start = doc.text.index(value)
            assert all(e <= start or s >= start + len(value) for s, e in doc.free)
        seen.update(free)
    assert len(seen) > 40  # the choices vary across biographies
    # Fixed wording: no free span, and the same person renders the same words every time.
    fixed = synth.Regime(free_wording=0.0)
    doc = synth.render(people[0], random.Random(0), regime=fixed)
    assert doc.free == () and not any(c in doc.text for c in synth.CONNECTIVES if c not in ("Later",))


def test_spacy_rule_leaves_free_wording_alone():
    """The default fact rule (POS PROPN, NUM) flags facts, not the acceptable alternatives:
    the share of flagged words that are free wording stays tiny, and the fact values are
    flagged (so this measure would notice a rule that flagged everything)."""
    from lacy_fast.data.labeling import load_spacy

    nlp = load_spacy(need_entities=False)
    bios = list(synth.biographies(80, seed=2, heldout=0.0, regime=synth.PAPER))
    docs = [d for b in bios for d in b.documents[:1]]
    flagged = flagged_free = free = value_words = value_flagged = 0
    for b, doc, parsed in zip(bios, docs, nlp.pipe([d.text for d in docs])):
        spans = [(doc.text.index(v), doc.text.index(v) + len(v)) for v in b.person.facts.values()]
        for tok in parsed:
            fact = tok.pos_ in ("PROPN", "NUM")
            in_free = any(s <= tok.idx < e for s, e in doc.free)
            in_value = any(s <= tok.idx < e for s, e in spans)
            flagged += fact
            free += in_free
            flagged_free += fact and in_free
            value_words += in_value
            value_flagged += fact and in_value
    assert free > 200 and flagged > 500
    assert flagged_free / flagged < 0.005, (flagged_free, flagged)
    assert value_flagged / value_words > 0.6
