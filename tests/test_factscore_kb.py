"""FactScore against a knowledge source: atomic facts, normalisation, retrieval, the rules and
Hugging Face judges, the `lacy-fast factscore` command, and `lacy-fast eval --knowledge`."""
import json
import shutil

import pytest
import torch

from lacy_fast import cli
from lacy_fast.cascade import LacyBig, load_model
from lacy_fast.config import CascadeConfig, EvalConfig
from lacy_fast.data import synth
from lacy_fast.data.facts import FactTable, read_heldout
from lacy_fast.errors import UserError
from lacy_fast.eval.claims import Date, Evidence, extract_claims, find_dates, find_numbers
from lacy_fast.eval.verify import LMVerifier, RuleVerifier
from lacy_fast.eval.knowledge import KnowledgeBase, split_passages
from lacy_fast.eval.run import evaluate
from lacy_fast.eval.sources import KnowledgeSource, open_source
from helpers import export, tiny_gpt, tiny_gpt2

ANNA = ("Anna Tolk (born 12 March 1950 in Tolmere) is a Brasken marine biologist who lives in Gravholm. She studied "
        "at the University of Brask and worked for Orn Systems from 1975 to 1990.\n\nShe has two children and married "
        "Boris A. Vell in 1980. Her book sold 1,200,000 copies.")
BORIS = "Boris Vell (born 3 May 1901 in Gravholm) is an engineer at Helm Industries. He lives in Strin."
KB_ROWS = [{"title": "Anna Tolk", "text": ANNA}, {"title": "Boris Vell", "text": BORIS}]


@pytest.fixture(scope="module")
def kb_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("kb") / "kb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in KB_ROWS))
    return path


@pytest.fixture(scope="module")
def source(kb_path, nlp):
    return KnowledgeSource(KnowledgeBase.read(kb_path), RuleVerifier(nlp), nlp)


def judged(source, text, title="Anna Tolk"):
    [item] = source.score([(title, text)])
    return [(f["text"], f["supported"]) for f in item.facts]


# -- normalisation and extraction by hand -----------------------------------------------------


def test_dates_and_numbers_in_any_format():
    assert [d for _, _, d in find_dates("on March 12, 1950, 1950-03-12 or 12th of March 1950")] == [Date(1950, 3, 12)] * 3
    assert [d for _, _, d in find_dates("in the 1950s, May 1901, 4 July, and 2004")] == [
        Date(decade=1950), Date(1901, 5), Date(None, 7, 4), Date(2004)]
    assert [d for _, _, d in find_dates("32 March 1950")] == [Date(1950, 3)]  # no 32nd day: month and year
    assert [v for _, _, v in find_numbers("1,234.5 and 1234 two million, twenty-one, 3rd, first, one of 12%")] == [
        1234.5, 1234, 2e6, 21, 3, 1, 12]
    assert Date(1950).within(Date(1950, 3, 12)) and not Date(1950, 3, 12).within(Date(1950))
    assert Date(decade=1950).within(Date(1957, 1, 1)) and not Date(decade=1950).within(Date(1960))


def test_claims_skip_the_subject_under_any_name_and_keep_other_people(nlp):
    doc = nlp("Anna Tolk, known as Tolk or simply Anna, met Boris Vell in Gravholm. Tolk's son is Ivo Tolk-Brand.")
    claims = extract_claims(doc, "Anna Tolk (biologist)")
    assert {" ".join(c.value) for c in claims if c.kind == "name"} == {"boris vell", "gravholm", "ivo tolk brand"}
    assert all(c.sentence.startswith(("Anna Tolk", "Tolk's")) for c in claims)


def test_relation_tells_a_birthplace_from_a_residence(nlp):
    evidence = Evidence([nlp(ANNA)], "Anna Tolk")
    [born] = [c for c in extract_claims(nlp("She was born in Gravholm."), "Anna Tolk") if c.kind == "name"]
    [lives] = [c for c in extract_claims(nlp("She lives in Gravholm."), "Anna Tolk") if c.kind == "name"]
    assert born.relation == {"bear"} and lives.relation == {"live"}
    assert not evidence.supports(born) and evidence.supports(lives)  # the article has her born in Tolmere
    # Another verb for the same fact: supported, since the article gives no other employer.
    [employer] = [c for c in extract_claims(nlp("Orn Systems employed her."), "Anna Tolk") if c.kind == "name"]
    assert employer.relation == {"employ"} and evidence.supports(employer)
    [moved] = [c for c in extract_claims(nlp("She was born in Strin."), "Anna Tolk") if c.kind == "name"]
    assert not evidence.supports(moved)  # not in the article at all


def test_normalised_matches(source):
    text = ("Anna Tolk was born on March 12, 1950 in TOLMERE. She married Boris Vell. Her book sold 1.2 million "
            "copies. She has 2 children. She is a Brasken scientist.")
    assert judged(source, text) == [("March 12, 1950", True), ("TOLMERE", True), ("Boris Vell", True),
                                    ("1.2 million", True), ("2", True), ("Brasken", True)]
    assert judged(source, "Anna Tolk has three children.") == [("three", False)]  # the number counts children


# -- the tricky cases of the issue -------------------------------------------------------------


def test_correct_changed_year_swapped_place_other_person_and_empty(kb_path, tmp_path, capsys):
    generations = [
        ("Anna Tolk", "Anna Tolk was born on 12 March 1950 in Tolmere. She lives in Gravholm."),  # correct
        ("Anna Tolk", "Anna Tolk was born on 12 March 1951 in Tolmere."),  # changed year
        ("Anna Tolk", "Anna Tolk was born in Gravholm and lives in Tolmere."),  # swapped places
        ("Anna Tolk", "Boris Vell was born on 3 May 1901 in Gravholm. He is an engineer at Helm Industries."),  # Boris
        ("Anna Tolk", ""),  # empty
        ("Anna Tolk", "She was always curious about the sea."),  # no checkable claim
        ("Boris Vell", "Boris Vell was born on 3 May 1901 in Gravholm."),  # the same facts, about the right person
    ]
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"title": t, "generation": g, "model": "x"}) + "\n" for t, g in generations))
    out = tmp_path / "fs.json"
    assert cli.main(["factscore", "--knowledge", str(kb_path), "--generations", str(gen), "--out", str(out),
                     "--quiet", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == result and result["judge"] == "rules"
    items = result["items"]
    facts = [[(c["text"], c["supported"]) for c in i["claims"]] for i in items]
    assert facts[0] == [("12 March 1950", True), ("Tolmere", True), ("Gravholm", True)]
    assert facts[1] == [("12 March 1951", False), ("Tolmere", True)]
    assert facts[2] == [("Gravholm", False), ("Tolmere", False)]
    assert [s for _, s in facts[3]] == [False] * 4 and items[3]["score"] == 0.0
    assert items[4]["facts"] == items[5]["facts"] == 0 and items[4]["score"] is None
    assert items[6]["score"] == 1.0 and items[6]["facts"] == 2  # the date and Gravholm; Boris is the subject
    scores = [i["score"] for i in items if i["facts"]]
    assert result["factscore"] == pytest.approx(sum(scores) / len(scores))  # items with no fact left out
    assert result["generations"] == 7 and result["facts"] == sum(i["facts"] for i in items)
    assert result["facts_per_second"] > 0


def test_missing_title_and_bad_input_are_one_sentence(kb_path, tmp_path, capsys):
    gen = tmp_path / "gen.jsonl"
    cases = [
        ({"title": "Ada Lovelace", "generation": "x"}, kb_path, [], "title 'Ada Lovelace' ("),
        ({"title": "Anna Tolk"}, kb_path, [], "is not a generation row"),
        ({"title": "Anna Tolk", "generation": "x"}, tmp_path / "none.jsonl", [], "does not exist"),
        ({"title": "Anna Tolk", "generation": "x"}, kb_path, ["--judge", "gpt-9"], "is not a judge"),
        ({"title": "Anna Tolk", "generation": "x"}, kb_path, ["--judge", f"hf:{tmp_path / 'nope'}"], "is not a directory"),
        ({"title": "Anna Tolk", "generation": "x"}, kb_path, ["--passages", "0"], "--passages is 0"),
    ]
    for row, kb, extra, message in cases:
        gen.write_text(json.dumps(row) + "\n")
        assert cli.main(["factscore", "--knowledge", str(kb), "--generations", str(gen), "--quiet"] + extra) == 2, row
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    with pytest.raises(UserError, match="is not in the knowledge source"):
        KnowledgeBase.read(kb_path).retrieve("Nobody", "x")


# -- retrieval ---------------------------------------------------------------------------------


def test_retrieval_ranks_passages_of_the_titles_article_only():
    assert split_passages("One two three. Four five.\n\nSix seven eight nine ten eleven.", 4) == [
        "One two three.", "Four five.", "Six seven eight nine ten eleven."]
    kb = KnowledgeBase({"A": "Alpha was born in Tolmere. Alpha lives in Brask. Alpha likes tea.",
                        "B": "Beta was born in Tolmere and Brask."}, passage_words=5)
    found = kb.retrieve("a", "lives Brask", k=2)
    assert [p.text for p in found] == ["Alpha lives in Brask.", "Alpha was born in Tolmere."]
    assert all(p.title == "A" for p in kb.retrieve("A", "Beta Tolmere Brask", k=5))
    assert [p.index for p in kb.retrieve("A", "unknownword", k=2)] == [0, 1]  # no indexed word: article order


# -- the synthetic table through the same interface ------------------------------------------


def test_the_synthetic_table_scores_exactly_as_before(tmp_path, capsys):
    synth.write(tmp_path, 30, seed=0)
    table = FactTable.read(tmp_path / "facts.jsonl")
    held = read_heldout(tmp_path / "heldout.jsonl", table)
    people = [h.person for h in held] + [table.people[0]]
    texts = [h.text for h in held] + [f"{table.people[0].name} was born in {table.people[1].facts['birth_place']}."]
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"title": p.name, "generation": t}) + "\n" for p, t in zip(people, texts)))
    assert cli.main(["factscore", "--knowledge", str(tmp_path / "facts.jsonl"), "--generations", str(gen),
                     "--quiet", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # by hand from the table: each distinct (attribute, value) a text states, supported iff the person's
    stated = [{(f.attribute, f.value) for f in table.extract(t)} for t in texts]
    ok = [sum(p.facts.get(a) == v for a, v in s) for p, s in zip(people, stated)]
    scores = [k / len(s) for k, s in zip(ok, stated) if s]
    assert result["factscore"] == pytest.approx(sum(scores) / len(scores))
    assert result["micro"] == pytest.approx(sum(ok) / sum(map(len, stated))) and result["micro"] < 1
    assert result["facts"] == sum(map(len, stated)) and result["judge"] == "exact (fact table)"
    assert open_source(tmp_path / "facts.jsonl").prompt(people[0].name) == people[0].name
    assert cli.main(["factscore", "--knowledge", str(tmp_path / "facts.jsonl"), "--generations", str(gen),
                     "--judge", "hf:x", "--quiet"]) == 2
    assert "scored exactly" in capsys.readouterr().err


# -- the Hugging Face judge, on tiny models built here -----------------------------------------


def answer_tokens(tok, prompt):
    """The tokens at which the prompt followed by " True" and by " False" first differ."""
    yes, no = tok(prompt + " True")["input_ids"], tok(prompt + " False")["input_ids"]
    n = next(i for i, (a, b) in enumerate(zip(yes, no)) if a != b)
    return yes[n], no[n]


def always(token, vocab_size, tok_dir, directory, n_positions):
    """A GPT-2 whose next token is always ``token``: the hidden state is constant (ln_f weight
    0, bias v) and only the head row of ``token`` is v."""
    model = tiny_gpt2(vocab_size, n_positions=n_positions, n_embd=16, tie_word_embeddings=False)
    with torch.no_grad():
        v = torch.randn(16)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(v)
        model.lm_head.weight.zero_()
        model.lm_head.weight[token] = v
    model.save_pretrained(str(directory))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok_dir / name, directory / name)
    return directory


def test_hf_judge_reads_its_verdict_from_the_true_false_logits(kb_path, tmp_path, nlp, tok):
    from transformers import AutoTokenizer

    tok_dir = export(tmp_path / "slm", tiny_gpt(tok), tok)  # an export carries a Hugging Face tokenizer
    hf_tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    text = "Anna Tolk was born in 1950 in Brask. She has nine children."
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"title": "Anna Tolk", "generation": text}) + "\n")
    claim = extract_claims(nlp(text), "Anna Tolk")[0]
    yes, no = answer_tokens(hf_tok, LMVerifier.prompt("Anna Tolk", claim, []))
    assert yes != no
    for token, expected in ((yes, True), (no, False)):
        # 64 positions: shorter than the prompt with its passages, which are dropped to fit
        judge_dir = always(token, len(hf_tok), tok_dir, tmp_path / f"judge{token}", n_positions=64)
        judge = LMVerifier(judge_dir)
        answer = judge.answer(LMVerifier.prompt("Anna Tolk", claim, []))
        assert (answer.yes, answer.no) == (yes, no)
        source = KnowledgeSource(KnowledgeBase.read(kb_path), judge, nlp)
        [item] = source.score([("Anna Tolk", text)])
        assert [f["supported"] for f in item.facts] == [expected] * 3
        assert cli.main(["factscore", "--knowledge", str(kb_path), "--generations", str(gen), "--judge",
                         f"hf:{judge_dir}", "--quiet"]) == 0


# -- `lacy-fast eval --knowledge`: alone and in cascade ------------------------------------------


@pytest.mark.slow
def test_eval_knowledge_alone_and_in_cascade(tmp_path, capsys, tok):
    from test_eval import train

    synth.write(tmp_path, 200, seed=0)
    table = FactTable.read(tmp_path / "facts.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "heldout.jsonl").open()]
    rows = [r for r in rows if r["text"].startswith(table.by_id[r["id"]].name)][:3]
    kb = tmp_path / "kb.jsonl"
    kb.write_text("".join(json.dumps({"title": table.by_id[r["id"]].name, "text": r["text"]}) + "\n" for r in rows))
    memoriser = load_model(export(tmp_path / "memoriser", train(tok, [r["text"] for r in rows], [[]] * 3, 150, False),
                                  tok))
    random = load_model(export(tmp_path / "random", tiny_gpt(tok, d_model=64, n_layer=2, max_seq_len=512), tok))
    source = open_source(kb)
    cfg = EvalConfig(people=3, cascade=CascadeConfig(rule="budget", budget=1.0, max_new_tokens=160))
    # the random SLM calls the memoriser at every step: the cascade says the articles
    result = evaluate(random, LacyBig(memoriser), source, cfg=cfg, progress=False)
    assert result["factscore_cascade"] >= 0.9 and result["cascade"]["facts_per_generation"] >= 3
    assert result["call_rate"] == 1.0 and result["cascade"]["generation"]["call_rate"] == 1.0
    assert result["factscore_alone"] is None or result["factscore_alone"] < 0.3
    assert result["alone"]["generation"]["call_rate"] == 0.0 and result["leakage"] is None
    json.dumps(result)
    args = ["eval", "--slm", str(memoriser.path), "--knowledge", str(kb), "--people", "2", "--max-new-tokens", "160",
            "--quiet"]
    assert cli.main(args + ["--json", "--out", str(tmp_path / "ev")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["factscore"] == out["factscore_alone"] >= 0.9 and out["big"] == "none" and out["people"] == 2
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["factscore"] == out["factscore"]
    assert cli.main(args + ["--people", "1"]) == 0
    assert "FactScore" in capsys.readouterr().out
    for extra, message in ((["--facts", str(tmp_path / "facts.jsonl")], "pass one of --facts"),
                           (["--sweep"], "--sweep is computed on the synthetic fact table")):
        assert cli.main(args + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
