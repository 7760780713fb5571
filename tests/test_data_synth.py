"""The synthetic biography corpus: deterministic, facts stated, disjoint value sets."""
import json
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
                           "--people", "50", "--seed", "3"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sum(1 for _ in (tmp_path / "s" / "corpus.jsonl").open()) == 50
    proc = subprocess.run([sys.executable, "-m", "lacy_fast.cli", "synth", "--out", str(tmp_path / "s"),
                           "--people", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


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
