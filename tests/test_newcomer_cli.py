"""One argument rule across commands (settings are keys, flags are shorthands, a conflict is
one sentence), one table layout for `eval --facts` and `eval --knowledge`, the factscore
summary, and the plots' labels, axes, panels and legends."""
import json

import pytest

from lacy_fast import cli
from lacy_fast.data import synth


@pytest.mark.parametrize("argv, words", [
    (["prepare", "--input", "x.txt", "--out", "d", "--vocab-size", "800", "tokenizer.vocab_size=500"],
     "--vocab-size 800 and tokenizer.vocab_size=500 set tokenizer.vocab_size to different values; give one of them"),
    (["synth", "--out", "s", "--people", "20", "people=30"], "--people 20 and people=30 set people"),
    (["generate", "--slm", "x", "--prompt", "A", "--budget", "0.3", "budget=0.5"], "--budget 0.3 and budget=0.5"),
    (["eval", "--slm", "x", "--facts", "f.jsonl", "--budget", "0.3", "cascade.budget=0.5"],
     "--budget 0.3 and cascade.budget=0.5 set cascade.budget"),
    (["eval", "--slm", "x", "--facts", "f.jsonl", "--people", "3", "people=4"], "--people 3 and people=4"),
    (["factscore", "--knowledge", "k", "--generations", "g", "--passages", "3", "passages=4"],
     "--passages 3 and passages=4"),
    (["plot", "runs/a", "--x", "step", "x=gt_tokens"], "--x step and x=gt_tokens"),
    (["factscore", "--knowledge", "k", "--generations", "g", "--passages", "0"], "--passages is 0"),
    (["synth", "--out", "s", "heldout=2"], "config key 'heldout' is 2.0; it must lie in [0, 1]"),
    (["generate", "--slm", "x", "--prompt", "A", "nope=1"], "config key 'nope' does not exist"),
])
def test_a_flag_and_a_key_that_disagree_are_one_sentence(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err


def test_flags_and_keys_mean_the_same(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path / "a"), "--people", "12", "--seed", "3"]) == 0
    assert cli.main(["synth", f"out={tmp_path / 'b'}", "people=12", "seed=3"]) == 0
    assert cli.main(["synth", "--out", str(tmp_path / "c"), "people=12", "--seed", "3", "seed=3"]) == 0  # agree
    for name in ("corpus.jsonl", "facts.jsonl", "heldout.jsonl", "articles.jsonl"):
        a = (tmp_path / "a" / name).read_bytes()
        assert a == (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()


@pytest.mark.parametrize("command, key, flag", [
    ("synth", "people", "--people"), ("prepare", "tokenizer.vocab_size", "--vocab-size"),
    ("generate", "budget", "--budget"), ("eval", "cascade.budget", "--budget"),
    ("factscore", "passages", "--passages"), ("plot", "x", "--x"),
])
def test_every_command_explains_its_keys_and_their_flags(command, key, flag, capsys):
    assert cli.main([command, "--explain"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"{key} [{flag}]") for line in lines), lines[:5]


def test_synth_articles_are_a_knowledge_source(tmp_path):
    synth.write(tmp_path, 15, seed=0)
    facts = [json.loads(line) for line in (tmp_path / "facts.jsonl").read_text().splitlines()]
    articles = [json.loads(line) for line in (tmp_path / "articles.jsonl").read_text().splitlines()]
    corpus = {json.loads(line)["text"] for line in (tmp_path / "corpus.jsonl").read_text().splitlines()}
    assert [a["title"] for a in articles] == [f["name"] for f in facts]
    assert all(a["text"] in corpus and a["title"].split()[-1] in a["text"] for a in articles)


# -- output a person reads -------------------------------------------------------------------


def test_factscore_prints_a_summary_and_writes_details(tmp_path, capsys):
    synth.write(tmp_path, 20, seed=0)
    people = [json.loads(line) for line in (tmp_path / "facts.jsonl").read_text().splitlines()][:3]
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"title": p["name"], "generation": f"{p['name']} was born in "
                                       f"{p['facts']['birth_place']}."}) + "\n" for p in people))
    out = tmp_path / "fs.json"
    assert cli.main(["factscore", "--knowledge", str(tmp_path / "facts.jsonl"), "--generations", str(gen),
                     "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert len(lines) < 15 and "{" not in text  # a table, not JSON
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["FactScore", "micro"])
    assert lines[header + 1].split()[:3] == ["1.000", "1.000", "3/3"]
    assert [line.split()[-1] for line in lines if line.startswith(people[0]["name"])] == ["1.00"]
    assert f"details (each claim and its verdict): {out}" in text
    details = json.loads(out.read_text())
    assert [i["title"] for i in details["items"]] == [p["name"] for p in people]
    assert details["items"][0]["claims"][0]["supported"] is True


def test_eval_facts_and_knowledge_print_one_layout():
    from lacy_fast.eval.report import format_report

    fs = {"factscore": 0.5, "micro": 0.5, "facts_per_generation": 2.0, "share_with_facts": 1.0, "supported": 2, "facts": 4,
          "generations": 2}
    facts_result = {
        "factscore": 0.5, "factscore_detail": fs, "call_rate": 0.22, "leakage": 0.1, "perplexity": 3.0,
        "calls": {"precision": 0.4, "recall": 0.3, "call_rate": 0.2, "recall_first": 0.3, "mean_p_call_fact": 0.5,
                  "mean_p_call_other": 0.1},
        "generation": {"steps": 10, "calls": 2, "answered": 2, "big_token_share": 0.2, "tokens_per_generation": 5.0},
        "leakage_detail": {"leaked": 1, "facts": 10}, "perplexity_detail": {"fact": 9.0, "other": 2.0},
        "slm": "s", "big": "oracle:f", "rule": "budget", "rule_heldout": "budget", "people": 2}
    mode = {"factscore": 0.25, "micro": 0.2, "facts": 4, "supported": 1, "facts_per_generation": 2.0,
            "share_with_facts": 1.0, "generation": {"call_rate": 0.0}}
    knowledge_result = {"slm": "s", "big": "b", "rule": "budget", "people": 2, "knowledge": "k", "judge": "rules",
                        "alone": mode, "cascade": {**mode, "generation": {"call_rate": 0.2}},
                        "leakage_note": "n"}

    def table(text):
        lines = text.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("mode "))
        return lines[start], [line.split()[0] for line in lines[start + 2:] if line.split()[:1] in (["alone"],
                                                                                                 ["cascade"])]

    facts_header, facts_rows = table(format_report(facts_result))
    knowledge_header, knowledge_rows = table(format_report(knowledge_result))
    assert facts_header.split() == knowledge_header.split()
    assert facts_rows == ["cascade"] and knowledge_rows == ["alone", "cascade"]
    assert table(format_report({**facts_result, "big": "none"}))[1] == ["alone"]


# -- plots -------------------------------------------------------------------------------------


def write_run(path, strategy, n=12):
    path.mkdir()
    rows = [{"step": s, "loss": 5 - s / 10, "loss_gt": 5 - s / 12, "loss_call": 3.0, "call_rate": 0.15,
             "lr": 1e-3 * s / n, "grad_norm": 1.0 / s, "gt_tokens": 100 * s} for s in range(1, n + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.json").write_text(json.dumps({"objective": {"strategy": strategy}}))


def test_curves_are_labelled_by_strategy_with_lr_and_grad_norm_panels(tmp_path):
    from lacy_fast.eval.plots import draw_runs, read_metrics, run_label

    write_run(tmp_path / "a", "lacy")
    write_run(tmp_path / "b", "none")
    runs = {run_label(tmp_path / name): read_metrics(tmp_path / name) for name in ("a", "b")}
    assert list(runs) == [f"lacy ({tmp_path / 'a'})", f"none ({tmp_path / 'b'})"]
    fig = draw_runs(runs, x="gt_tokens")
    titles = [ax.get_title() for ax in fig.axes]
    assert "learning rate" in titles and "gradient norm (before clipping)" in titles
    assert fig.axes[-1].get_xlabel() == "ground-truth-gradient tokens"
    assert list(fig.axes[-1].lines[0].get_xdata()) == [100 * s for s in range(1, 13)]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == list(runs)
    assert cli.main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "x=gt_tokens"]) == 0
    assert (tmp_path / "a" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_the_regime_plot_legends_cover_no_bar_and_its_axes_are_labelled():
    from lacy_fast.eval.plots import draw_regime

    rows = []
    for name in ("none", "loss", "spacy", "lacy", "rho", "judge"):
        # Tall bars (1.0), where a legend inside the axes would sit on them.
        rows.append({"strategy": name, "mode": "slm", "factscore_frequent": 1.0, "factscore_rare": 1.0})
        rows.append({"strategy": name, "mode": "cascade", "factscore_frequent": 1.0, "factscore_rare": 1.0,
                     "calls_unknown_fact": 0.4, "calls_known_fact": 0.3, "calls_free": 0.2, "calls_other": 0.1})
    fig = draw_regime(rows)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes[:2]:
        assert ax.get_xlabel()
        legend = ax.get_legend().get_window_extent(renderer)
        for bar in ax.patches:
            box = bar.get_window_extent(renderer)
            assert not legend.overlaps(box), (ax.get_title(), bar)


def test_exports_written_with_model_preset_still_load(tmp_path):
    import torch

    from lacy_fast.config import ModelConfig
    from lacy_fast.model import GPT
    from lacy_fast.model.io import load_export, save_export

    model = GPT(ModelConfig(shape="tiny", n_layer=1, d_model=16, n_head=2, max_seq_len=16, vocab_size=300))
    path = save_export(tmp_path / "export", model)
    config = json.loads((path / "config.json").read_text())
    config["lacy_fast"]["model"]["preset"] = config["lacy_fast"]["model"].pop("shape")  # as older versions wrote
    (path / "config.json").write_text(json.dumps(config))
    from lacy_fast.fileio import write_manifest

    write_manifest(path)  # an older version wrote no manifest; a consistent one lets the shape check speak
    loaded, _ = load_export(path)
    assert loaded.cfg.shape == "tiny" and loaded.cfg.d_model == 16
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
