"""`lacy-fast demo`: the whole pipeline on the built-in corpus, ending in a comparison table.

    lacy-fast demo                     # CPU-sized: minutes on a 2-core machine
    lacy-fast demo --seeds 3           # three seeds per strategy: means and spreads
    lacy-fast demo --strategies none,lacy,lacy-full,ignore
    lacy-fast demo --scale gpu         # bigger corpus and models, bf16, for one GPU

Stages (each skipped when its output is already there, so a rerun only redoes what is
missing):
 1. synthesise fictional biographies in the paper's regime (``synth.Regime``): a few
    *frequent* people in many biographies, most *rare* people in one; free wording (words
    whose choice is free and truthful) throughout;
 2. prepare: train the tokenizer, label facts with spaCy, add the perfect judge's labels
    (``oracle``: exactly the tokens of the fact table's values) for the ``judge`` baseline,
    write shards;
 3. train the *reference*: a bigger model on the same data, a plain LM. It is Rho-1's
    reference model for the ``rho`` baseline (the paper's setting: a larger model trained on
    the same corpus; its excess loss marks what a bigger model learns and the SLM does
    not) and the ``big`` row of the table;
 4. train one SLM per strategy and seed, every one to the same number of
    ground-truth-gradient tokens, and those that rank all targets (``loss``, ``rho``) at the
    same share of <CALL> targets as ``lacy`` (``objective.call_rate=auto``);
 5. evaluate every SLM alone and in cascade with the bigger model that answers its calls,
    which here is the fact table itself (``oracle:facts.jsonl``: it knows every fact, the
    regime's "bigger model that knows nearly all", at no training cost; a trained bigger
    model that knew the rare people's facts would need tens of passes over the corpus). The
    main cascade row gives every strategy the same call budget (22% of decoding steps, the
    paper's deployment) and ranks steps by each SLM's call score (p(<CALL>) for a LaCy-style
    SLM, its own entropy for a plain LM), so it compares *where* each SLM calls; a second
    row lets each SLM call whenever <CALL> is its most likely token; a sweep over call
    budgets draws FactScore against the call rate (first seed);
 6. write OUT/results.json, OUT/report.md (the table, the regime's diagnostics and what the
    numbers say, computed from them), curves.png, sweep.png and regime.png.

Nothing here decides a winner in advance: report.md states whichever ordering the numbers
have, and when LaCy does not win, which property of the regime did not hold.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lacy_fast.config import ObjectiveConfig
from lacy_fast.errors import UserError
from lacy_fast.fileio import write_json, write_text
from lacy_fast.progress import duration, human

# Row name -> the objective overrides of its SLM. The first six are the paper's baselines and
# run by default; the others run on request (--strategies).
RUNS: dict[str, list[str]] = {
    "none": ["objective.strategy=none"],
    "loss": ["objective.strategy=loss"],
    "spacy": ["objective.strategy=spacy"],
    "lacy": ["objective.strategy=lacy"],
    "rho": ["objective.strategy=rho"],
    "judge": ["objective.strategy=judge"],
    "ignore": ["objective.strategy=ignore"],  # the ablation: selected targets get no loss instead of <CALL>
    "lacy-full": ["objective.strategy=lacy", "objective.renormalize=false"],  # ordinary targets on the full softmax
}
STRATEGIES = ("none", "loss", "spacy", "lacy", "rho", "judge")
CALL_BUDGET = 0.22  # share of decoding steps that call in the main cascade row (the paper's deployment)
CALL_FRACTION = ObjectiveConfig().call_fraction  # the share of fact targets LaCy relabels (the paper's 0.6)
MODES = ("slm", "cascade", "cascade-argmax")


@dataclass(frozen=True)
class Scale:
    """Sizes of one demo scale."""

    people: int  # fictional people
    frequent_share: float  # of them written about often (synth.Regime)
    frequent_docs: int  # biographies of a frequent person (a rare one has one)
    free_wording: float  # synth.Regime.free_wording
    mentions: float  # synth.Regime.mentions
    heldout: float  # share of the rare people with a held-out rendering (every frequent one has one)
    vocab: int  # SentencePiece vocabulary, <CALL> included
    seq_len: int
    micro_batch: int
    slm: str  # model shapes (model.shape)
    slm_lr: float
    slm_epochs: float  # ground-truth-token budget of every SLM, in passes over the corpus
    ref: str
    ref_lr: float
    ref_epochs: float
    eval_people: int  # held-out people evaluated (half frequent, half rare while both last)
    max_new_tokens: int
    sweep: tuple[float, ...]


SCALES = {
    # Sized for a 2-core CPU inside 12 minutes, every stage included. 12 frequent people in
    # 16 biographies each and 388 rare ones in one, so that rare people's facts are ~2/3 of
    # the fact statements, more than the 60% LaCy relabels (the paper's setting: most facts
    # are beyond the SLM). Over its 16 passes the SLM sees a frequent person's facts ~250
    # times and a rare person's 16 times: a plain LM memorises nearly all of the first and
    # almost none of the second (measured, 3 seeds at 15 frequent people: FactScore
    # 0.91-0.98 vs 0.00-0.07 alone; at 13 passes or lr 3e-3 that held for some seeds only).
    "cpu": Scale(people=400, frequent_share=0.03, frequent_docs=16, free_wording=1.0, mentions=0.3, heldout=0.25,
                 vocab=2048, seq_len=256, micro_batch=4, slm="tiny", slm_lr=6e-3, slm_epochs=16.0, ref="small",
                 ref_lr=2e-3, ref_epochs=6.0, eval_people=40, max_new_tokens=48,
                 sweep=(0.0, 0.05, 0.1, 0.22, 0.5, 1.0)),
    # One GPU (not measured on one yet): 20x the people, bigger models.
    "gpu": Scale(people=4000, frequent_share=0.03, frequent_docs=16, free_wording=1.0, mentions=0.3, heldout=0.05,
                 vocab=8192, seq_len=512, micro_batch=32, slm="small", slm_lr=2e-3, slm_epochs=16.0,
                 ref="gpt2-124m", ref_lr=6e-4, ref_epochs=6.0, eval_people=400, max_new_tokens=64,
                 sweep=(0.0, 0.05, 0.1, 0.22, 0.35, 0.5, 0.75, 1.0)),
}


class Stages:
    """Numbered stage lines on stderr with the time each took."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet, self.n = total, quiet, 0
        self.start = self._t = time.perf_counter()

    def begin(self, what: str) -> None:
        self.n += 1
        self._t = time.perf_counter()
        if not self.quiet:
            print(f"[demo {self.n}/{self.total}] {what}", file=sys.stderr, flush=True)

    def end(self, note: str = "") -> None:
        if not self.quiet:
            took = duration(time.perf_counter() - self._t)
            print(f"[demo {self.n}/{self.total}] done in {took}{' - ' + note if note else ''}", file=sys.stderr,
                  flush=True)


def run_demo(out: Path, scale: Scale, *, strategies: tuple[str, ...] = STRATEGIES, seeds: int = 1,
             device: str = "auto", quiet: bool = False) -> list[dict[str, Any]]:
    """The pipeline of the module doc; returns the rows of results.json."""
    import torch

    from lacy_fast.cascade.big import load_big
    from lacy_fast.config import (CascadeConfig, EvalConfig, JudgeConfig, PrepareConfig, RunConfig, TokenizerConfig,
                                  load_config)
    from lacy_fast.data import synth
    from lacy_fast.data.prepare import prepare
    from lacy_fast.eval.plots import plot_regime, plot_runs, plot_sweep, read_metrics
    from lacy_fast.eval.run import evaluate, sweep
    from lacy_fast.train.loop import train

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    stages = Stages(5 + len(strategies) * seeds, quiet)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, scale, strategies, seeds)

    regime = synth.Regime(scale.frequent_share, scale.frequent_docs, scale.free_wording, scale.mentions)
    stages.begin(f"synthesise {scale.people} people ({scale.frequent_share:.0%} frequent, in {scale.frequent_docs} "
                 "biographies each; the rest in one)")
    corpus = out / "synth"
    facts = corpus / "facts.jsonl"
    if not facts.exists():
        synth.write(corpus, scale.people, seed=0, heldout=scale.heldout, regime=regime)
    stages.end()

    stages.begin(f"prepare: tokenizer ({scale.vocab} pieces), spaCy fact labels, judge labels, shards")
    data = out / "data"
    if not (data / "stats.json").exists():
        prepare(PrepareConfig(inputs=(str(corpus / "corpus.jsonl"),), out=str(data), workers=2, shard_docs=500,
                              tokenizer=TokenizerConfig(vocab_size=scale.vocab),
                              judge=JudgeConfig(spec=f"oracle:{facts}")), progress=not quiet)
    stats = json.loads((data / "stats.json").read_text())
    stages.end(f"{human(stats['tokens'])} tokens, {stats['fact_fraction']:.1%} fact tokens, "
               f"{stats['judge_fraction']:.1%} judge tokens")

    common = [f"data.path={data}", f"train.seq_len={scale.seq_len}", f"model.max_seq_len={scale.seq_len}",
              f"train.micro_batch_size={scale.micro_batch}", "train.ckpt_every=0", "train.log_every=10",
              "train.keep_last=1"]
    per_step = scale.seq_len * scale.micro_batch

    def budget(epochs: float) -> list[str]:
        tokens = int(epochs * stats["tokens"])
        return [f"train.max_gt_tokens={tokens}", f"train.max_steps={2 * tokens // per_step + 1}",
                f"train.warmup_steps={max(1, tokens // per_step // 20)}"]

    ref_dir = out / "runs" / "reference"
    stages.begin(f"train the reference, a bigger model on the same data ({scale.ref} shape, plain LM, "
                 f"{human(scale.ref_epochs * stats['tokens'])} tokens)")
    _finished(train(load_config(RunConfig, "tiny", common + budget(scale.ref_epochs) + [
        f"out_dir={ref_dir}", f"model.shape={scale.ref}", "objective.strategy=none", f"train.lr={scale.ref_lr}"]),
        progress=not quiet), ref_dir)
    stages.end()

    runs: dict[tuple[str, int], Path] = {}
    for seed in range(seeds):
        for name in strategies:
            run = out / "runs" / (name if seeds == 1 else f"{name}-seed{seed}")
            runs[(name, seed)] = run
            stages.begin(f"train SLM '{name}'{f' seed {seed}' if seeds > 1 else ''} ({scale.slm} shape, "
                         f"{human(scale.slm_epochs * stats['tokens'])} ground-truth tokens)")
            extra = [f"objective.ref_checkpoint={ref_dir / 'export'}"] if name == "rho" else []
            _finished(train(load_config(RunConfig, "tiny", common + budget(scale.slm_epochs) + RUNS[name] + extra + [
                f"out_dir={run}", f"model.shape={scale.slm}", f"train.lr={scale.slm_lr}",
                f"train.seed={1337 + seed}", f"data.seed={1234 + seed}"]), progress=not quiet), run)
            stages.end()

    stages.begin(f"evaluate {len(runs)} SLMs alone and in cascade on {scale.eval_people} people, the reference, "
                 "and a call-rate sweep")
    cfg = EvalConfig(people=scale.eval_people, sweep=scale.sweep,
                     cascade=CascadeConfig(rule="budget", budget=CALL_BUDGET, max_new_tokens=scale.max_new_tokens))
    argmax = dataclasses.replace(cfg, cascade=dataclasses.replace(cfg.cascade, rule="argmax"))
    partner = load_big(f"oracle:{facts}", device)
    per_run: dict[tuple[str, str], list[dict[str, Any]]] = {}
    curves = {}
    for (name, seed), run in runs.items():
        trained = _trained(read_metrics(run))
        for mode, big, mode_cfg in (("slm", None, cfg), ("cascade", partner, cfg), ("cascade-argmax", partner, argmax)):
            result = evaluate(run, big, facts, cfg=mode_cfg, device=device, progress=not quiet)
            write_json(out / "eval" / f"{run.name}-{mode}.json", result)
            per_run.setdefault((name, mode), []).append(_measures(result, trained))
        if seed == 0:
            curves[name] = sweep(run, partner, facts, cfg=cfg, device=device, progress=not quiet)
    result = evaluate(ref_dir, None, facts, cfg=cfg, device=device, progress=not quiet)
    write_json(out / "eval" / "reference-alone.json", result)
    per_run[("big", "alone")] = [_measures(result, _trained(read_metrics(ref_dir)))]
    stages.end()

    rows = [_row(name, mode, values) for (name, mode), values in per_run.items()]
    regime_stats = _regime_stats(corpus, data, stats)
    plot_runs({name: read_metrics(runs[(name, 0)]) for name in strategies}, out / "curves.png", window=5)
    plot_sweep(curves, out / "sweep.png")
    plot_regime(rows, out / "regime.png")
    write_json(out / "results.json", rows)
    write_json(out / "sweep.json", curves)
    table = format_rows(rows)
    write_text(out / "report.md", _report(rows, curves, table, scale, seeds, stats, regime_stats,
                                          time.perf_counter() - stages.start))
    print(table)
    if not quiet:
        print(f"\nwrote {out}/results.json, report.md, curves.png, sweep.png, regime.png in "
              f"{duration(time.perf_counter() - stages.start)}", file=sys.stderr)
    return rows


def _finished(summary: dict[str, Any], run: Path) -> None:
    """A run stopped by a signal (it saved a checkpoint) stops the demo too: evaluating a
    half-trained model would compare it at another budget than the others."""
    if summary.get("stopped_by"):
        raise UserError(f"the demo was stopped by {summary['stopped_by']} while training {run}; rerun the same "
                        "command to resume where it stopped")


# ----------------------------------------------------------------------------------------
# Rows: one per (strategy, mode), means over seeds
# ----------------------------------------------------------------------------------------

# Measures averaged over seeds (with a spread for those marked).
SPREAD = ("factscore", "factscore_frequent", "factscore_rare", "call_auc")


def _trained(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """What the training run realised: steps, ground-truth tokens, the share of <CALL> targets."""
    rates = [r["call_rate"] for r in metrics if r.get("call_rate") is not None]
    return {"train_steps": metrics[-1]["step"], "gt_tokens": metrics[-1].get("gt_tokens"),
            "train_call_rate": sum(rates) / len(rates) if rates else 0.0}


def _measures(result: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
    calls = result["calls"]
    return {
        "factscore": result["factscore"],
        "factscore_frequent": result.get("factscore_frequent"),
        "factscore_rare": result.get("factscore_rare"),
        "call_rate": result["call_rate"],
        "leakage": result["leakage"],
        "perplexity": result["perplexity"],
        "call_auc": calls["auc"],
        "call_auc_first": calls["auc_first"],
        "calls_unknown_fact": calls["landing"]["unknown_fact"],
        "calls_known_fact": calls["landing"]["known_fact"],
        "calls_free": calls["landing"]["free"],
        "calls_other": calls["landing"]["other"],
        "call_precision": calls["precision"],
        "call_recall": calls["recall"],
        "mean_p_call_fact": calls["mean_p_call_fact"],
        "mean_p_call_other": calls["mean_p_call_other"],
        "facts_per_generation": result["factscore_detail"]["facts_per_generation"],
        **trained,
        "score": result["score"],
    }


def _row(strategy: str, mode: str, values: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds (None where any seed has None), and the spread of SPREAD measures."""
    row: dict[str, Any] = {"strategy": strategy, "mode": mode, "seeds": len(values)}
    for key, first in values[0].items():
        column = [v[key] for v in values]
        if isinstance(first, str):
            row[key] = first
        elif any(c is None for c in column):
            row[key] = None
        else:
            row[key] = statistics.fmean(column)
            if key in SPREAD and len(column) > 1:
                row[f"{key}_std"] = statistics.stdev(column)
    return row


# (header, key, format) of the printed table; "±" cells add the spread when seeds > 1.
TABLE = [("FactScore", "factscore", "{:.3f}"), ("frequent", "factscore_frequent", "{:.3f}"),
         ("rare", "factscore_rare", "{:.3f}"), ("call rate", "call_rate", "{:.1%}"),
         ("train CALL", "train_call_rate", "{:.1%}"), ("AUC", "call_auc", "{:.3f}"),
         ("calls@unknown", "calls_unknown_fact", "{:.0%}"), ("calls@free", "calls_free", "{:.0%}"),
         ("leakage", "leakage", "{:.3f}"), ("ppl", "perplexity", "{:.2f}")]


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table; '-' where a value is missing, '±' the seed spread."""
    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        if row.get(key) is None:
            return "-"
        text = fmt.format(row[key])
        return text + (f" ±{fmt.format(row[key + '_std']).lstrip('0')}" if row.get(key + "_std") is not None else "")

    header = ["model", "score"] + [h for h, _, _ in TABLE]
    body = [[f"{r['strategy']} {r['mode']}", r["score"] if r["mode"] != "slm" and r["mode"] != "alone" else "-"]
            + [cell(r, k, f) for _, k, f in TABLE] for r in rows]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


# ----------------------------------------------------------------------------------------
# The regime's diagnostics and the report
# ----------------------------------------------------------------------------------------


def _regime_stats(corpus: Path, data: Path, stats: dict[str, Any]) -> dict[str, Any]:
    """Corpus-side facts of the regime: buckets, and what spaCy's rule flags on the held-out
    texts, whose fact values and free-wording spans are known: how much free wording it
    takes for a fact, how many value tokens it finds, and what else it flags."""
    import numpy as np

    from lacy_fast.config import LabelConfig
    from lacy_fast.data.facts import FactTable, read_heldout, value_spans
    from lacy_fast.data.labeling import FLAG_FACT, FactLabeler
    from lacy_fast.data.tokenizer import Tokenizer

    people = [json.loads(line) for line in (corpus / "facts.jsonl").open()]
    held = read_heldout(corpus / "heldout.jsonl", FactTable.read(corpus / "facts.jsonl"))
    tok = Tokenizer.load(data / "tokenizer.model")
    labeled = FactLabeler(LabelConfig(), tok).label_batch([h.text for h in held])
    n = {"tokens": 0, "flagged": 0, "free": 0, "flagged_free": 0, "value": 0, "flagged_value": 0}
    for h, (_, flags) in zip(held, labeled):
        _, starts, ends = tok.encode_with_offsets(h.text)
        fact = (flags[: len(starts)] & FLAG_FACT) != 0  # (T,)

        def inside(spans) -> np.ndarray:
            return np.array([any(s < e_ and e > s_ for s_, e_ in spans) for s, e in zip(starts, ends)], dtype=bool)

        free, value = inside(h.free), inside(value_spans(h.text, h.person).values())
        for key, mask in (("tokens", np.ones_like(fact)), ("flagged", fact), ("free", free),
                          ("flagged_free", fact & free), ("value", value), ("flagged_value", fact & value)):
            n[key] += int(mask.sum())
    frequent = [p for p in people if p["bucket"] == "frequent"]
    statements = sum(p["documents"] * len(p["facts"]) for p in people)  # every biography states all its facts
    rare_statements = sum(p["documents"] * len(p["facts"]) for p in people if p["bucket"] == "rare")

    def share(a: str, b: str) -> float:
        return n[a] / n[b] if n[b] else 0.0

    return {
        "people": len(people), "frequent": len(frequent),
        "rare_fact_share": rare_statements / statements if statements else 0.0,
        "documents": sum(p["documents"] for p in people),
        "frequent_documents": sum(p["documents"] for p in frequent),
        "free_token_share": share("free", "tokens"),
        "free_share_of_fact_flags": share("flagged_free", "flagged"),
        "free_flagged": share("flagged_free", "free"),
        "values_flagged": share("flagged_value", "value"),
        "value_share_of_fact_flags": share("flagged_value", "flagged"),
        "fact_fraction": stats["fact_fraction"],
    }


def _report(rows: list[dict[str, Any]], curves: dict[str, list[dict]], table: str, scale: Scale, seeds: int,
            stats: dict[str, Any], regime: dict[str, Any], seconds: float) -> str:
    by = {(r["strategy"], r["mode"]): r for r in rows}
    lines = [
        "# lacy-fast demo",
        "",
        f"Built-in corpus in the paper's regime: {regime['people']} fictional people, {regime['frequent']} of them "
        f"*frequent* ({regime['frequent_documents']} of the {regime['documents']} biographies), the others *rare* "
        f"(one biography each); {stats['tokens']} tokens, {stats['fact_fraction']:.1%} of them fact tokens (spaCy "
        f"proxy), {regime['free_token_share']:.1%} free wording. SLMs: `{scale.slm}` shape, each trained on "
        f"{scale.slm_epochs:g} passes' worth of ground-truth-gradient tokens ({seeds} seed{'s' if seeds > 1 else ''} "
        f"per strategy). Reference (Rho-1's, and the `big alone` row): `{scale.ref}` shape, a bigger model trained "
        f"as a plain LM on the same data ({scale.ref_epochs:g} passes). The model the SLMs call is the fact table "
        "(`oracle:facts.jsonl`): it knows every fact and answers a call made right before a value with the whole "
        "value, and declines elsewhere. Evaluated on "
        f"{scale.eval_people} held-out people, half frequent and half rare; greedy decoding from each name. "
        f"Modes: `slm` alone; `cascade`: calls on {CALL_BUDGET:.0%} of decoding steps, those whose call score "
        "(column `score`: p(<CALL>), or the entropy of its next-token distribution for a plain LM) is highest; "
        "`cascade-argmax`: calls whenever <CALL> is the most likely token. AUC, where calls land, leakage and "
        "perplexity come from teacher-forced held-out renderings. "
        + (f"Values are means over {seeds} seeds, ± the standard deviation. " if seeds > 1 else "")
        + f"Whole run: {duration(seconds)}.",
        "",
        "```",
        table,
        "```",
        "",
        "![training curves](curves.png)",
        "",
        "![FactScore vs call rate](sweep.png)",
        "",
        "![the regime](regime.png)",
        "",
        "## The regime",
        "",
    ]
    lines += _regime_lines(by, regime)
    lines += ["", "## What the table shows", ""]
    lines += _verdict(by, curves, seeds)
    return "\n".join(lines) + "\n"


def _fs(row: dict[str, Any] | None, key: str = "factscore") -> str:
    if row is None or row.get(key) is None:
        return "-"
    spread = row.get(f"{key}_std")
    return f"{row[key]:.3f}" + (f" ± {spread:.3f}" if spread is not None else "")


def _regime_lines(by: dict[tuple[str, str], dict[str, Any]], regime: dict[str, Any]) -> list[str]:
    """Numbers that confirm or refute the two properties the claim rests on."""
    out = []
    alone = {s: r for (s, m), r in by.items() if m == "slm"}
    plain = alone.get("none")
    if plain is not None:
        out.append(f"- Facts an SLM can learn and facts it cannot: the plain LM alone scores {_fs(plain, 'factscore_frequent')} "
                   f"on frequent people and {_fs(plain, 'factscore_rare')} on rare ones. "
                   + _holds(plain.get("factscore_frequent"), plain.get("factscore_rare")))
    out.append(f"- Facts about rare people are {regime['rare_fact_share']:.0%} of the fact statements of the corpus; "
               f"LaCy relabels the highest-loss {CALL_FRACTION:.0%} of the fact tokens, so "
               + ("they can all be rare people's facts." if regime["rare_fact_share"] >= CALL_FRACTION else
                  "it must also relabel facts of frequent people, which it then does not learn."))
    big = by.get(("big", "alone"))
    if big is not None:
        out.append(f"- The reference (a bigger model on the same data) alone: {_fs(big, 'factscore_frequent')} on "
                   f"frequent people, {_fs(big, 'factscore_rare')} on rare ones; the fact table the SLMs call knows "
                   "every fact.")
    out.append(f"- Acceptable alternatives: free wording is {regime['free_token_share']:.1%} of the held-out tokens; "
               f"spaCy's fact rule flags {regime['free_flagged']:.2%} of its tokens, so free wording makes up "
               f"{regime['free_share_of_fact_flags']:.2%} of the fact-flagged tokens.")
    out.append(f"- The fact proxy: spaCy's rule flags {regime['values_flagged']:.0%} of the tokens of fact-table "
               f"values, and {1 - regime['value_share_of_fact_flags']:.0%} of what it flags is no value (mostly the "
               "subject's own name, which a biography repeats, and the names of people it mentions).")
    learned = {s: r for (s, m), r in by.items() if m == "slm" and r.get("factscore_frequent") is not None}
    if "none" in learned and len(learned) > 1:
        out.append("- What each SLM learned of the facts it could learn (alone, frequent people): "
                   + ", ".join(f"`{s}` {_fs(r, 'factscore_frequent')}" for s, r in learned.items()) + ".")
    landing = {s: r for (s, m), r in by.items() if m == "cascade" and r.get("calls_free") is not None}
    if landing:
        out.append("- Where the budget's calls land on held-out text (unknown facts / known facts / free wording / "
                   "other): " + "; ".join(
                       f"`{s}` {r['calls_unknown_fact']:.0%} / {r['calls_known_fact']:.0%} / {r['calls_free']:.0%} / "
                       f"{r['calls_other']:.0%}" for s, r in landing.items()) + ".")
        out.append("- How well the call score separates unknown-fact tokens from all others (ROC AUC): "
                   + ", ".join(f"`{s}` {_fs(r, 'call_auc')}" for s, r in landing.items()) + ".")
    trained = {s: r for (s, m), r in by.items() if m == "slm"}
    out.append("- Realised share of <CALL> targets in training: "
               + ", ".join(f"`{s}` {r['train_call_rate']:.1%}" for s, r in trained.items()) + ".")
    return out


def _holds(frequent: float | None, rare: float | None) -> str:
    if frequent is None or rare is None:
        return "One of the buckets states no fact, so the property cannot be checked."
    if frequent >= 0.5 and rare <= 0.2:
        return "The property holds: it memorised most frequent facts and few rare ones."
    return "The property does not hold at this size: " + (
        "it memorised too few frequent facts." if frequent < 0.5 else "it memorised many rare facts too.")


def _verdict(by: dict[tuple[str, str], dict[str, Any]], curves: dict[str, list[dict]], seeds: int) -> list[str]:
    """Sentences computed from the numbers (no claim is written in advance)."""
    def scores(mode: str) -> dict[str, dict[str, Any]]:
        return {s: r for (s, m), r in by.items() if m == mode and r["factscore"] is not None}

    def ranked(rows: dict[str, dict[str, Any]]) -> str:
        return ", ".join(f"`{s}` {_fs(r)}" for s, r in sorted(rows.items(), key=lambda kv: -kv[1]["factscore"]))

    out = []
    cascade, alone, argmax = scores("cascade"), scores("slm"), scores("cascade-argmax")
    if cascade:
        best = max(cascade, key=lambda s: cascade[s]["factscore"])
        out.append(f"- Cascade at an equal call budget ({CALL_BUDGET:.0%} of steps): `{best}` scores best; "
                   f"{ranked(cascade)}.")
        out.append("- By bucket in that cascade (frequent / rare): " + ", ".join(
            f"`{s}` {_fs(r, 'factscore_frequent')} / {_fs(r, 'factscore_rare')}" for s, r in cascade.items()) + ".")
    if alone:
        out.append(f"- Alone (no calls): {ranked(alone)}.")
    if argmax:
        out.append("- Calling whenever <CALL> is the argmax: " + ", ".join(
            f"`{s}` {_fs(r)} at {r['call_rate']:.0%} of steps" for s, r in argmax.items()) + ".")
    if "lacy" in curves:
        mine = {p["budget"]: p["factscore"] for p in curves["lacy"] if p["factscore"] is not None}
        for other, points in curves.items():
            if other == "lacy":
                continue
            theirs = {p["budget"]: p["factscore"] for p in points if p["factscore"] is not None}
            common = [b for b in mine if b in theirs and 0 < b < 1]
            wins = [b for b in common if mine[b] > theirs[b]]
            out.append(f"- Sweep (first seed): LaCy beats `{other}` at {len(wins)} of the {len(common)} call budgets "
                       "strictly between 0 and 1 at which both state facts.")
    leak = {s: r["leakage"] for s, r in alone.items() if r["leakage"] is not None}
    if leak:
        out.append("- Fact leakage (a held-out fact still produced with <CALL> forbidden): "
                   + ", ".join(f"`{s}` {v:.3f}" for s, v in leak.items()) + ".")
    if "lacy" in cascade:
        out += _lacy_against_baselines(cascade, by, seeds)
    if "lacy" in cascade and "lacy-full" in cascade:
        out.append(_renormalize_switch(by))
    return out


def _renormalize_switch(by: dict[tuple[str, str], dict[str, Any]]) -> str:
    """What scoring the ordinary targets on the full softmax (``lacy-full``) changes against ``lacy``."""
    def pair(mode: str, key: str, fmt: str) -> str:
        full, paper = by[("lacy-full", mode)].get(key), by[("lacy", mode)].get(key)
        return "-" if full is None or paper is None else f"{fmt.format(full)} against {fmt.format(paper)}"

    full, paper = by[("lacy-full", "cascade")], by[("lacy", "cascade")]
    return ("- The objective switch, `lacy-full` (ordinary targets on the full softmax, `objective.renormalize=false`) "
            "against `lacy` (the paper's renormalised softmax), the same budget and seeds: mean p(<CALL>) on held-out "
            f"fact tokens {pair('cascade', 'mean_p_call_fact', '{:.2f}')} and elsewhere "
            f"{pair('cascade', 'mean_p_call_other', '{:.2f}')}; AUC {pair('cascade', 'call_auc', '{:.3f}')}; calls "
            f"on unknown facts {pair('cascade', 'calls_unknown_fact', '{:.0%}')}, on other tokens "
            f"{pair('cascade', 'calls_other', '{:.0%}')}; alone on frequent people "
            f"{pair('slm', 'factscore_frequent', '{:.3f}')}; cascade FactScore {_fs(full)} against {_fs(paper)} "
            f"({full['factscore'] - paper['factscore']:+.3f}).")


def _lacy_against_baselines(cascade: dict[str, dict[str, Any]], by: dict[tuple[str, str], dict[str, Any]],
                            seeds: int) -> list[str]:
    """LaCy's cascade against every other cascade at the equal budget, with the seed spread."""
    lacy = cascade["lacy"]
    others = {s: r for s, r in cascade.items() if s != "lacy"}
    if not others:
        return []
    margins = {s: lacy["factscore"] - r["factscore"] for s, r in others.items()}

    def spread(r: dict[str, Any]) -> float:
        return r.get("factscore_std") or 0.0

    clear = [s for s, m in margins.items() if m > max(spread(lacy), spread(others[s]))]
    line = "- LaCy's cascade against each baseline's at the equal budget (difference of FactScore"
    line += ", against the larger seed spread): " if seeds > 1 else "; one seed, so no spread to compare against): "
    line += ", ".join(f"`{s}` {m:+.3f}" for s, m in margins.items()) + "."
    out = [line]
    if len(clear) == len(others) and seeds > 1:
        out.append("- LaCy's cascade is above every baseline by more than the seed spread: the paper's result "
                   "holds here.")
        return out
    if seeds == 1:
        out.append("- With one seed this says nothing about significance; `--seeds 3` gives spreads.")
    behind = [s for s in others if s not in clear]
    if behind:
        out.append(f"- LaCy is not clearly above {', '.join(f'`{s}`' for s in behind)}." + _why_not(by, behind))
    return out


def _why_not(by: dict[tuple[str, str], dict[str, Any]], behind: list[str]) -> str:
    """Which property of the regime or of the method the numbers say did not hold."""
    def value(strategy: str, mode: str, key: str) -> float | None:
        return (by.get((strategy, mode)) or {}).get(key)

    text = ""
    plain_frequent, plain_rare = value("none", "slm", "factscore_frequent"), value("none", "slm", "factscore_rare")
    if plain_frequent is not None and plain_rare is not None and (plain_frequent < 0.5 or plain_rare > 0.2):
        text += (f" The SLMs do not separate learnable from unlearnable facts here (plain LM alone: "
                 f"{plain_frequent:.2f} frequent, {plain_rare:.2f} rare), so choosing which facts to delegate has "
                 "little to choose between.")
    lacy_frequent = value("lacy", "slm", "factscore_frequent")
    if plain_frequent is not None and lacy_frequent is not None and lacy_frequent < plain_frequent - 0.1:
        text += (f" LaCy's SLM did not learn all it could: alone on frequent people it scores {lacy_frequent:.2f} "
                 f"against the plain LM's {plain_frequent:.2f}. A target relabeled as <CALL> gets no ground-truth "
                 "gradient (the <CALL> loss even pushes its logit down), so a fact relabeled early in training keeps "
                 "a high loss and keeps being relabeled: the selection by current loss does not let go of a "
                 "learnable fact once it has taken it.")
    other = value("lacy", "cascade", "calls_other")
    if other is not None:
        text += (f" {other:.0%} of LaCy's held-out calls land on tokens that are neither a fact nor free wording, "
                 "where the bigger model has nothing to supply; spaCy's rule, which LaCy learns from, flags many "
                 "such tokens (the subject's name wherever the biography repeats it: see the fact proxy above).")
    lacy_auc = value("lacy", "cascade", "call_auc")
    for s in behind:
        if s == "judge":
            text += (" `judge` learns from the perfect judge's labels (exactly the fact table's values) and calls "
                     "the fact table itself: it is the ceiling of label quality, not a competing proxy.")
            continue
        auc = value(s, "cascade", "call_auc")
        if auc is None or lacy_auc is None:
            continue
        text += (f" `{s}` separates unknown-fact tokens from the rest {'better' if auc > lacy_auc else 'less well'} "
                 f"(AUC {auc:.3f} against LaCy's {lacy_auc:.3f}; calls on unknown facts "
                 f"{value(s, 'cascade', 'calls_unknown_fact'):.0%} against "
                 f"{value('lacy', 'cascade', 'calls_unknown_fact'):.0%}, on free wording "
                 f"{value(s, 'cascade', 'calls_free'):.0%} against {value('lacy', 'cascade', 'calls_free'):.0%}).")
    return text


def _check_settings(out: Path, scale: Scale, strategies: tuple[str, ...], seeds: int) -> None:
    settings = {"scale": dataclasses.asdict(scale), "strategies": list(strategies), "seeds": seeds}
    path = out / "demo.json"
    if path.exists():
        if json.loads(path.read_text()) != json.loads(json.dumps(settings)):
            raise UserError(f"{out} holds a demo run with other settings; pass --fresh to start over or another --out")
    else:
        write_json(path, settings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory (default demo-out)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                        help="cpu: minutes on a 2-core machine; gpu: bigger corpus and models for one GPU")
    parser.add_argument("--people", type=int, help="override the scale's number of people")
    parser.add_argument("--seeds", type=int, default=1, help="SLMs trained per strategy, with other seeds; the report "
                                                             "gives means and spreads (default 1)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated SLM rows, of: {', '.join(RUNS)} (default {','.join(STRATEGIES)})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    scale = SCALES[args.scale]
    if args.people is not None:
        if args.people < 20:
            raise UserError(f"--people is {args.people}; the demo needs at least 20")
        scale = dataclasses.replace(scale, people=args.people)
    if args.seeds < 1:
        raise UserError(f"--seeds is {args.seeds}; it must be at least 1")
    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    bad = [s for s in strategies if s not in RUNS]
    if bad or not strategies:
        raise UserError(f"--strategies has {', '.join(bad) or 'nothing'}; choose from {', '.join(RUNS)}")
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    run_demo(args.out, scale, strategies=strategies, seeds=args.seeds, device=args.device, quiet=args.quiet)
    return 0
