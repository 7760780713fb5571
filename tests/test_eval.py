"""Evaluation: the FactScore extractor by hand, then every measure on tiny models trained in
the test to a known behaviour (one memorises biographies, one calls at their facts)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lacy_fast import cli
from lacy_fast.cascade import ArgmaxRule, Cascade, ThresholdRule, load_big, load_model
from lacy_fast.cascade.slm import context_ids
from lacy_fast.config import CascadeConfig, EvalConfig
from lacy_fast.data import synth
from lacy_fast.errors import UserError
from lacy_fast.data.facts import FactTable, Person, read_heldout, value_spans
from lacy_fast.cascade.rules import call_scores, resolve_score
from lacy_fast.eval.heldout import (FREE, KNOWN_FACT, OTHER, UNKNOWN_FACT, TextScores, call_stats, leakage, leaks,
                                    roc_auc, score_texts)
from lacy_fast.eval.plots import plot_sweep
from lacy_fast.eval.report import format_table
from lacy_fast.eval.run import evaluate, sweep
from lacy_fast.eval.sources import SyntheticSource, summarize
from helpers import export, tiny_gpt

# -- the extractor and the scores, by hand ---------------------------------------------------

ANNA = Person(0, "Anna Tolk", "she", {"birth_place": "Tolmere", "occupation": "marine biologist",
                                      "birth_date": "12 March 1950", "education": "University of Brask"})
BORIS = Person(1, "Boris Vell", "he", {"birth_place": "Gravholm", "occupation": "biologist",
                                       "birth_date": "3 May 1901", "education": "Polytechnic of Strin"})
TABLE = FactTable([ANNA, BORIS])
SOURCE = SyntheticSource(TABLE)


def facts_of(text, person=ANNA):
    return [(f["kind"], f["text"], f["supported"]) for f in SOURCE.facts(person, text)]


def factscore(people, texts):
    return summarize(SOURCE.score([(p.name, t) for p, t in zip(people, texts)]), TABLE.attributes)


def test_extractor_right_wrong_partial_and_none():
    assert facts_of("Anna Tolk was born in Tolmere on 12 March 1950.") == [
        ("birth_place", "Tolmere", True), ("birth_date", "12 March 1950", True)]
    assert facts_of("Anna Tolk was born in Gravholm.") == [("birth_place", "Gravholm", False)]  # Boris's
    assert facts_of("She studied at the University of Brask and lives in Gravholm.") == [
        ("education", "University of Brask", True), ("birth_place", "Gravholm", False)]
    assert facts_of("She was known for a careful approach to her work.") == []


def test_extractor_matches_whole_values_longest_first():
    assert facts_of("She worked as a marine biologist.") == [("occupation", "marine biologist", True)]
    assert facts_of("She worked as a biologist.") == [("occupation", "biologist", False)]
    assert facts_of("Tolmereville and Tolmer are not Tolmere's") == [("birth_place", "Tolmere", True)]
    assert facts_of("born on 12 March 19501 or 12  March 1950 or 12 march 1950") == []  # no whole, exact value
    assert facts_of("Tolmere. Again: Tolmere! And Gravholm, Gravholm.") == [
        ("birth_place", "Tolmere", True), ("birth_place", "Gravholm", False)]  # each fact once


def test_factscore_micro_macro_and_shares():
    texts = ["Born in Tolmere, a marine biologist.",  # 2/2
             "Born in Gravholm, a marine biologist.",  # 1/2
             "Nothing to say.",  # no fact
             "Born on 3 May 1901."]  # 0/1
    fs = factscore([ANNA] * 4, texts)
    assert (fs["facts"], fs["supported"], fs["generations"]) == (5, 3, 4)
    assert fs["micro"] == pytest.approx(3 / 5)
    assert fs["factscore"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert fs["facts_per_generation"] == pytest.approx(5 / 4)
    assert fs["supported_per_generation"] == pytest.approx(3 / 4)
    assert fs["share_with_facts"] == pytest.approx(3 / 4)
    assert fs["by_attribute"]["birth_place"] == {"facts": 2, "supported": 1, "precision": 0.5}
    empty = factscore([ANNA], ["Nothing."])
    assert empty["factscore"] is None and empty["micro"] is None and empty["share_with_facts"] == 0


def test_call_stats_and_leakage_by_hand():
    # Six positions; "Tolmere" spans targets 2..3, "biologist" 4..5. Greedy gets Tolmere's
    # first token only (no leak) and both of biologist's (a leak).
    # Position 1 is free wording, 0 is other.
    p_call = np.array([0.1, 0.2, 0.9, 0.3, 0.8, 0.05], dtype=np.float32)
    scores = TextScores(targets=np.array([5, 6, 7, 8, 9, 10]), nll=np.zeros(6),
                        scores={"p_call": p_call, "entropy": 1 - p_call},
                        call_argmax=np.array([False, True, True, False, False, False]),
                        greedy=np.array([5, 0, 7, 0, 9, 10]), spans=[("birth_place", 2, 4), ("occupation", 4, 6)],
                        truncated_facts=0, free=np.array([False, True, False, False, False, False]))
    stats = call_stats([scores], ArgmaxRule())  # calls at 1 and 2; facts at 2..5
    assert stats["precision"] == pytest.approx(1 / 2) and stats["recall"] == pytest.approx(1 / 4)
    assert stats["recall_first"] == pytest.approx(1 / 2) and stats["call_rate"] == pytest.approx(2 / 6)
    assert stats["mean_p_call_fact"] == pytest.approx((0.9 + 0.3 + 0.8 + 0.05) / 4)
    assert stats["mean_p_call_other"] == pytest.approx((0.1 + 0.2) / 2)
    assert call_stats([scores], ThresholdRule(0.95))["precision"] is None
    # Tolmere (2..3) is an unknown fact, biologist (4..5) a known one.
    assert scores.classes().tolist() == [OTHER, FREE, UNKNOWN_FACT, UNKNOWN_FACT, KNOWN_FACT, KNOWN_FACT]
    assert stats["landing"] == {"unknown_fact": 0.5, "known_fact": 0.0, "free": 0.5, "other": 0.0}
    # Unknown-fact scores (0.9, 0.3) against the rest (0.1, 0.2, 0.8, 0.05): 7 of 8 pairs.
    assert stats["score"] == "p_call" and stats["auc"] == pytest.approx(7 / 8)
    assert stats["auc_first"] == pytest.approx(1.0)  # 0.9 against 0.1 and 0.2
    flipped = call_stats([scores], ThresholdRule(0.5), "entropy")  # 1 - p_call: the ranking reversed
    assert flipped["auc"] == pytest.approx(1 / 8)  # calls at 0, 1, 3 and 5: one of each class
    assert flipped["landing"] == {"unknown_fact": 0.25, "known_fact": 0.25, "free": 0.25, "other": 0.25}
    assert leaks(scores) == [("birth_place", False), ("occupation", True)]
    assert leakage([scores])["leakage"] == pytest.approx(0.5)


def test_roc_auc_counts_ties_as_half():
    assert roc_auc(np.array([1.0, 1.0]), np.array([1.0, 0.0])) == pytest.approx((0.5 + 1 + 0.5 + 1) / 4)
    assert roc_auc(np.array([0.0]), np.array([1.0, 2.0])) == 0.0
    assert roc_auc(np.array([]), np.array([1.0])) is None


def test_call_scores_are_normalised_uncertainty():
    call_id = 2
    logits = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0],  # uniform over the own vocabulary, <CALL> likely
                           [30.0, 0.0, -5.0, 0.0, 0.0]])  # certain
    s = call_scores(logits, call_id)
    assert s["entropy"][0] == pytest.approx(1.0) and s["entropy"][1] == pytest.approx(0.0, abs=1e-6)
    assert s["max_prob"][0] == pytest.approx(0.75) and s["max_prob"][1] == pytest.approx(0.0, abs=1e-6)
    assert s["p_call"][0] == pytest.approx(torch.softmax(logits[0], 0)[call_id].item())
    assert set(call_scores(logits, call_id, ("entropy",))) == {"entropy"}
    assert resolve_score("auto", "none") == "entropy" and resolve_score("auto", "ignore") == "entropy"
    assert resolve_score("auto", "lacy") == "p_call" and resolve_score("max_prob", "lacy") == "max_prob"


# -- tiny models trained to a known behaviour -------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic corpus of 200 people; the held-out file keeps four people whose held-out
    biography opens with their name (the prompt), so a model that memorised them can be
    scored on its own biographies."""
    out = tmp_path_factory.mktemp("synth")
    synth.write(out, 200, seed=0)
    table = FactTable.read(out / "facts.jsonl")
    rows = [json.loads(line) for line in (out / "heldout.jsonl").open()]
    keep = [r for r in rows if r["text"].startswith(table.by_id[r["id"]].name)][:4]
    (out / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    return out


def train(tok, texts, spans_of, steps, call_facts):
    """A 2-layer GPT trained to reproduce ``texts`` (EOS, text, EOS); with ``call_facts`` every
    fact-value target becomes <CALL>, as a LaCy model learns to delegate them."""
    torch.manual_seed(0)
    model = tiny_gpt(tok, d_model=64, n_layer=2, max_seq_len=512, call_scale=1.0).train()
    rows = []
    for text, spans in zip(texts, spans_of):
        ids = context_ids(tok, text) + [tok.eos_id]
        targets = torch.tensor(ids[1:])
        if call_facts:
            _, starts, ends = tok.encode_with_offsets(text)
            for lo, hi in spans:  # target j is text token j (the last target, EOS, is no fact)
                targets[:-1][torch.from_numpy((starts < hi) & (ends > lo))] = tok.call_id
        rows.append((torch.tensor(ids[:-1]), targets))
    width = max(len(i) for i, _ in rows)
    inputs = torch.stack([F.pad(i, (0, width - len(i)), value=tok.eos_id) for i, _ in rows])
    targets = torch.stack([F.pad(t, (0, width - len(t)), value=-100) for _, t in rows])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        logits = model.logits(model(inputs))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def models(data, tok, tmp_path_factory):
    table = FactTable.read(data / "facts.jsonl")
    held = read_heldout(data / "heldout.jsonl", table)
    texts = [h.text for h in held]
    spans = [list(value_spans(h.text, h.person).values()) for h in held]
    root = tmp_path_factory.mktemp("models")
    return {
        "memoriser": load_model(export(root / "memoriser" / "export", train(tok, texts, spans, 150, False), tok)),
        "caller": load_model(export(root / "caller" / "export", train(tok, texts, spans, 150, True), tok)),
        "random": load_model(export(root / "random", tiny_gpt(tok, d_model=64, n_layer=2, max_seq_len=512), tok)),
    }


CFG = EvalConfig(cascade=CascadeConfig(rule="argmax", max_new_tokens=160))


def test_a_memorising_model_states_true_facts_and_leaks_them(models, data):
    result = evaluate(models["memoriser"], None, data / "facts.jsonl", cfg=CFG, progress=False)
    assert result["factscore"] == 1.0 and result["factscore_detail"]["facts_per_generation"] >= 3
    assert result["leakage"] == 1.0 and result["leakage_detail"]["facts"] >= 4 * 7
    assert result["perplexity"] < 1.5 and result["call_rate"] == 0.0 and result["rule"] == "never"
    json.dumps(result)  # serialisable as it is
    random = evaluate(models["random"], "none", data / "facts.jsonl", cfg=CFG, progress=False)
    assert random["leakage"] == 0.0 and random["perplexity"] > 100
    assert random["factscore_detail"]["facts"] == 0 and random["factscore"] is None


def test_a_calling_model_calls_at_facts_and_the_oracle_fills_them_in(models, data):
    facts = data / "facts.jsonl"
    alone = evaluate(models["caller"], None, facts, cfg=CFG, progress=False)
    calls = alone["calls"]  # held-out: where the argmax rule would call
    assert calls["precision"] > 0.9 and calls["recall"] > 0.9 and alone["call_rate"] == 0.0
    assert calls["mean_p_call_fact"] > 0.5 > calls["mean_p_call_other"]
    assert alone["leakage"] < 0.5  # trained to call, it never learned to say the values
    oracle = evaluate(models["caller"], f"oracle:{facts}", facts, cfg=CFG, progress=False)
    gen = oracle["generation"]
    assert 0 < gen["answered"] < gen["calls"] and 0 < oracle["call_rate"] < 0.5  # declined where no cue
    assert oracle["factscore"] == 1.0
    assert oracle["factscore_detail"]["supported"] >= alone["factscore_detail"]["supported"] + 8
    assert "[[" in oracle["samples"][0]["marked"] and oracle["samples"][0]["facts"][0]["supported"]


def test_leakage_equals_explicit_greedy_decoding(models, data, tok):
    """The one-pass leakage against decoding each value with <CALL> at -inf, token by token."""
    table = FactTable.read(data / "facts.jsonl")
    held = read_heldout(data / "heldout.jsonl", table)
    outcomes = []
    for name in ("caller", "random", "memoriser"):
        model = models[name].model
        for h, scores in zip(held, score_texts(models[name], held)):
            context = context_ids(tok, h.text)
            for (attr, lo, hi), (_, leaked) in zip(scores.spans, leaks(scores)):
                ids = context[: lo + 1]  # EOS and the text up to the value's first token
                decoded = []
                with torch.no_grad():
                    for _ in range(hi - lo):
                        logits = model.logits(model(torch.tensor([ids + decoded]))[0, -1])
                        logits[tok.call_id] = float("-inf")
                        decoded.append(int(logits.argmax()))
                gold = context[lo + 1: hi + 1]
                assert leaked == (decoded == gold), (name, attr)
                outcomes.append(leaked)
    assert any(outcomes) and not all(outcomes)


def test_perplexity_against_a_float64_reference(models, data, tok):
    table = FactTable.read(data / "facts.jsonl")
    held = read_heldout(data / "heldout.jsonl", table)
    result = evaluate(models["caller"], None, data / "facts.jsonl", cfg=CFG, progress=False)
    model = models["caller"].model.double()
    nll = []
    with torch.no_grad():
        for h in held:
            ids = context_ids(tok, h.text) + [tok.eos_id]
            logp = torch.log_softmax(model.logits(model(torch.tensor([ids[:-1]])))[0], -1)  # (T, V)
            p_call = logp[:, tok.call_id].exp()
            nll += (-(logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0] - torch.log1p(-p_call))).tolist()
    model.float()
    assert result["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)
    assert result["perplexity_detail"]["tokens"] == len(nll)


def test_sweep_spans_call_rates_and_plots(models, data, tmp_path):
    facts = data / "facts.jsonl"
    big = load_big(f"oracle:{facts}")
    cfg = EvalConfig(cascade=CascadeConfig(max_new_tokens=60))
    points = sweep(models["caller"], big, facts, budgets=(0.0, 0.3, 1.0), cfg=cfg, progress=False)
    rates = [p["call_rate"] for p in points]
    assert rates[0] == 0.0 and abs(rates[1] - 0.3) < 0.05 and rates[2] == 1.0
    assert points[2]["answered_rate"] < 1.0  # the oracle declines where no fact is cued
    png = plot_sweep({"caller": points, "again": points}, tmp_path / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with pytest.raises(UserError, match="needs a big model"):
        sweep(models["caller"], None, facts, cfg=cfg, progress=False)


def test_loaded_and_same_tokenizer_big_models_are_accepted(models, data):
    facts = data / "facts.jsonl"
    cfg = EvalConfig(cascade=CascadeConfig(rule="budget", budget=0.3, max_new_tokens=20))
    result = evaluate(str(models["caller"].path.parent), models["memoriser"], facts, cfg=cfg, progress=False)
    assert result["big"] == str(models["memoriser"].path) and abs(result["call_rate"] - 0.3) < 0.1
    assert result["generation"]["answered"] == result["generation"]["calls"]
    table = format_table({"caller": result, "twice": result})
    assert table.count("\n") == 3 and "FactScore" in table.splitlines()[0]


def test_combined_score_calibrates_on_people_never_evaluated(models, data, monkeypatch):
    """The rank product's CDFs come from training documents that name no held-out person;
    they are stored once per SLM; the budget rule on the product meets its budget."""
    import lacy_fast.cascade.calibration as calibration

    facts = data / "facts.jsonl"
    table = FactTable.read(facts)
    evaluated = [h.person.name for h in read_heldout(data / "heldout.jsonl", table)]
    read = []
    real = calibration.context_ids
    monkeypatch.setattr(calibration, "context_ids", lambda tok, text: read.append(text) or real(tok, text))
    cfg = EvalConfig(cascade=CascadeConfig(rule="budget", budget=0.3, score="combined", max_new_tokens=40,
                                           calibration_docs=20))
    result = evaluate(models["caller"], f"oracle:{facts}", facts, cfg=cfg, progress=False)
    assert len(read) == 20 and result["calibration"]["documents"] == 20
    assert not [t for t in read for name in evaluated if name in t]
    assert all(table.person_in(t) is not None for t in read)
    gen = result["generation"]
    assert result["score"] == "combined" and abs(gen["calls"] - 0.3 * gen["steps"]) <= 1
    assert result["handoff"] == "word" and result["calls"]["score"] == "combined"

    calib = calibration.calibrate(models["caller"], data / "corpus.jsonl", table,
                                  {h.person.id for h in read_heldout(data / "heldout.jsonl", table)}, documents=20)
    assert len(read) == 20  # read back from the export, not computed again
    for kind in calibration.KINDS:
        ref = calib.values[kind]
        x = torch.from_numpy(np.sort(np.concatenate([ref, np.linspace(ref[0] - 1, ref[-1] + 1, 500)])))
        u = calib.cdf(kind, x).numpy()
        assert np.all(np.diff(u) >= 0) and 0 < u[0] and u[-1] < 1  # monotone, inside (0, 1)
        assert calib.cdf(kind, torch.tensor([ref[0] - 1.0, ref[-1] + 1.0])).tolist() == pytest.approx(
            [0.5 / (len(ref) + 1), (len(ref) + 0.5) / (len(ref) + 1)])
    with pytest.raises(UserError, match="score combined"):
        Cascade(models["caller"], load_big(f"oracle:{facts}"), cfg.cascade)


# -- the command line ----------------------------------------------------------------------------


def test_eval_cli_json_out_and_table(models, data, tmp_path, capsys):
    facts = data / "facts.jsonl"
    args = ["eval", "--slm", str(models["caller"].path), "--big", f"oracle:{facts}", "--facts", str(facts),
            "--rule", "argmax", "--max-new-tokens", "40", "--quiet"]
    assert cli.main(args + ["--json", "--sweep", "0,1", "--out", str(tmp_path / "ev")]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("factscore", "call_rate", "leakage", "perplexity"):
        assert isinstance(out[key], float)
    assert [p["budget"] for p in out["sweep"]] == [0.0, 1.0]
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["factscore"] == out["factscore"]
    assert (tmp_path / "ev" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "FactScore" in text and "[[" in text and "leakage" in text


def test_eval_cli_errors_are_one_line(models, data, tmp_path, capsys):
    slm = str(models["caller"].path)
    (tmp_path / "held.jsonl").write_text(json.dumps({"id": 999999, "text": "x"}) + "\n")
    cases = [
        (["--facts", str(data / "corpus.jsonl")], "is not a row of the built-in fact table"),
        (["--facts", str(tmp_path / "facts.jsonl")], "does not exist"),
        (["--facts", str(data / "facts.jsonl"), "--heldout", str(tmp_path / "held.jsonl")], "is about person 999999"),
        (["--facts", str(data / "facts.jsonl"), "--sweep", "0,lots"], "--sweep 0,lots"),
        (["--facts", str(data / "facts.jsonl"), "--sweep"], "needs a big model"),
        (["--facts", str(data / "facts.jsonl"), "--people", "0"], "--people is 0"),
    ]
    for extra, message in cases:
        assert cli.main(["eval", "--slm", slm, "--quiet"] + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
