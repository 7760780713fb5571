"""`lacy-fast demo`: the whole pipeline on the built-in corpus, ending in a comparison table.

    lacy-fast demo                     # CPU-sized: minutes on a 2-core machine
    lacy-fast demo --seeds 3           # three seeds per strategy: means and spreads
    lacy-fast demo --strategies none,lacy,lacy-full,ignore
    lacy-fast demo --scale gpu         # bigger corpus and models, bf16, for one GPU

Stages, each skipped when its output is already there: synthesise the corpus in the
paper's regime; prepare it (tokenizer, spaCy fact labels, the perfect judge's labels);
train the reference (a bigger plain LM on the same data: Rho-1's reference and the ``big``
row); train one SLM per row of ``RUNS`` and seed at an equal ground-truth-token budget;
evaluate each alone and in cascade with the fact table as the model it calls
(``oracle:facts.jsonl``, one word per call), at the equal budget ``CALL_BUDGET``, at the
argmax, and at every budget of ``Scale.sweep``; write results.json, report.md and plots.
``demo_measures`` computes the rows from what was measured and ``demo_report`` renders
them; docs/demo.md says why each stage is set up as it is.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lacy_fast.config import ObjectiveConfig
from lacy_fast.demo_measures import add_curves, curve_point, mean_row, measures, regime_stats, training_summary
from lacy_fast.demo_report import format_rows, render, setup_paragraph
from lacy_fast.errors import UserError
from lacy_fast.fileio import write_json, write_text
from lacy_fast.progress import duration, human

# Row name -> the ObjectiveConfig fields of its SLM. DEFAULT_ROWS run by default; the others
# on request (--strategies, or all).
RUNS: dict[str, dict[str, Any]] = {
    "none": {"strategy": "none"},
    "loss": {"strategy": "loss"},
    "spacy": {"strategy": "spacy"},
    "lacy": {"strategy": "lacy"},
    "rho": {"strategy": "rho"},
    "judge": {"strategy": "judge"},
    "ignore": {"strategy": "ignore"},  # the ablation: selected targets get no loss instead of <CALL>
    "lacy-full": {"strategy": "lacy", "renormalize": False},  # ordinary targets on the full softmax
    # Objectives that keep what the SLM can learn (docs/method.md, "Soft relabeling, warm-up"):
    "lacy-soft": {"strategy": "lacy", "call_weight": 0.5},  # a selected fact keeps half its ground-truth loss
    "lacy-idk": {"strategy": "lacy", "call_weight": 0.5, "call_weight_by_error": True},  # lambda by the row's error
    "lacy-warm": {"strategy": "lacy", "warmup_share": 0.25},  # the first quarter of the budget relabels nothing
}
PAPER = ("none", "loss", "spacy", "lacy", "rho", "judge")
# The default rows: the paper's six and the new variant with the largest curve_area in the
# kept 3-seed run of every row (docs/demo-cpu: lacy-idk 0.798 against lacy-full 0.770,
# lacy-soft 0.734, lacy-warm 0.730), chosen from that run, after it.
DEFAULT_VARIANT = "lacy-idk"
DEFAULT_ROWS = (*PAPER, DEFAULT_VARIANT)
# Rows evaluated on another row's SLMs with another call score (cascade/rules.py): name ->
# (the trained row, CascadeConfig.score). ``lacy-mix``: LaCy's SLMs deferring by the rank
# product of p(<CALL>) and their own entropy (cascade/calibration.py).
SCORED_ROWS: dict[str, tuple[str, str]] = {"lacy-mix": ("lacy", "combined")}
ALL_ROWS = (*RUNS, *SCORED_ROWS)
CALL_BUDGET = 0.22  # share of decoding steps that call in the main cascade row (the paper's deployment)
CALL_FRACTION = ObjectiveConfig().call_fraction  # the share of fact targets LaCy relabels (the paper's 0.6)
MODES = ("slm", "cascade", "cascade-argmax")
# Budgets of the FactScore-vs-budget curve of every cascade row and seed (its area is curve_area).
CURVE_BUDGETS = (0.05, 0.1, CALL_BUDGET, 0.35, 0.5)


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
    sweep: tuple[float, ...]  # budgets of every cascade's budget curve (curve_area spans them)


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
                 ref_lr=2e-3, ref_epochs=6.0, eval_people=40, max_new_tokens=48, sweep=CURVE_BUDGETS),
    # One GPU (not measured on one yet): 20x the people, bigger models.
    "gpu": Scale(people=4000, frequent_share=0.03, frequent_docs=16, free_wording=1.0, mentions=0.3, heldout=0.05,
                 vocab=8192, seq_len=512, micro_batch=32, slm="small", slm_lr=2e-3, slm_epochs=16.0,
                 ref="gpt2-124m", ref_lr=6e-4, ref_epochs=6.0, eval_people=400, max_new_tokens=64,
                 sweep=CURVE_BUDGETS),
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


def run_demo(out: Path, scale: Scale, *, strategies: tuple[str, ...] = DEFAULT_ROWS, seeds: int = 1,
             device: str = "auto", quiet: bool = False) -> list[dict[str, Any]]:
    """The pipeline of the module doc; returns the rows of results.json."""
    import torch

    from lacy_fast.config import CascadeConfig, EvalConfig
    from lacy_fast.eval.plots import read_metrics
    from lacy_fast.eval.run import evaluate

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    stages = Stages(5 + len(_trained_rows(strategies)) * seeds, quiet)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, scale, strategies, seeds)
    corpus, data, stats = _corpus_and_data(out, scale, stages, quiet)
    facts = corpus / "facts.jsonl"
    ref_dir, runs = _train_runs(out, scale, strategies, seeds, corpus, data, stats, stages, quiet)

    stages.begin(f"evaluate {len(runs)} SLMs alone and in cascade on {scale.eval_people} people, the reference, "
                 f"and each cascade at the budgets {', '.join(f'{b:g}' for b in scale.sweep)}")
    cfg = EvalConfig(people=scale.eval_people, sweep=scale.sweep,
                     cascade=CascadeConfig(rule="budget", budget=CALL_BUDGET, max_new_tokens=scale.max_new_tokens))
    per_run, seed_curves = _evaluate_runs(out, runs, strategies, facts, cfg, device, quiet)
    result = evaluate(ref_dir, None, facts, cfg=cfg, device=device, progress=not quiet)
    write_json(out / "eval" / "reference-alone.json", result)
    per_run[("big", "alone")] = [measures(result, training_summary(read_metrics(ref_dir)))]
    stages.end()

    rows = [mean_row(name, mode, values) for (name, mode), values in per_run.items()]
    add_curves(rows, seed_curves)
    _write_outputs(out, rows, runs, seed_curves)
    regime = regime_stats(corpus, data, stats)
    table = format_rows(rows)
    write_text(out / "report.md", render(rows, setup_paragraph(scale, seeds, stats, regime, CALL_BUDGET), table,
                                         regime, seeds, CALL_BUDGET, CALL_FRACTION,
                                         time.perf_counter() - stages.start))
    print(table)
    if not quiet:
        print(f"\nwrote {out}/results.json, report.md, budget_curve.png, lock_in.png, curves.png, sweep.png, "
              f"regime.png in "
              f"{duration(time.perf_counter() - stages.start)}", file=sys.stderr)
    return rows


def _corpus_and_data(out: Path, scale: Scale, stages: Stages, quiet: bool) -> tuple[Path, Path, dict[str, Any]]:
    """Stages 1 and 2: the synthetic corpus and its prepared shards (each kept when already
    there); returns the corpus folder, the data folder and its stats.json."""
    from lacy_fast.config import JudgeConfig, PrepareConfig, TokenizerConfig
    from lacy_fast.data import synth
    from lacy_fast.data.prepare import prepare

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
    return corpus, data, stats


def _train_runs(out: Path, scale: Scale, strategies: tuple[str, ...], seeds: int, corpus: Path, data: Path,
                stats: dict[str, Any], stages: Stages, quiet: bool) -> tuple[Path, dict[tuple[str, int], Path]]:
    """Stages 3 and 4: the reference, then one SLM per trained row and seed; returns the
    reference's run folder and the SLMs' by (row, seed)."""
    from lacy_fast.train.loop import train

    probe = _probe_data(corpus, data, out / "probe", quiet)
    ref_dir = out / "runs" / "reference"
    stages.begin(f"train the reference, a bigger model on the same data ({scale.ref} shape, plain LM, "
                 f"{human(scale.ref_epochs * stats['tokens'])} tokens)")
    _finished(train(_run_config(scale, data, ref_dir, scale.ref, scale.ref_lr, int(scale.ref_epochs * stats["tokens"]),
                                {"strategy": "none"}), progress=not quiet), ref_dir)
    stages.end()

    runs: dict[tuple[str, int], Path] = {}
    for seed in range(seeds):
        for name in _trained_rows(strategies):
            run = out / "runs" / (name if seeds == 1 else f"{name}-seed{seed}")
            runs[(name, seed)] = run
            stages.begin(f"train SLM '{name}'{f' seed {seed}' if seeds > 1 else ''} ({scale.slm} shape, "
                         f"{human(scale.slm_epochs * stats['tokens'])} ground-truth tokens)")
            objective = {**RUNS[name], **({"ref_checkpoint": str(ref_dir / "export")} if name == "rho" else {})}
            _finished(train(_run_config(scale, data, run, scale.slm, scale.slm_lr,
                                        int(scale.slm_epochs * stats["tokens"]), objective, seed, probe),
                            progress=not quiet), run)
            stages.end()
    return ref_dir, runs


def _write_outputs(out: Path, rows: list[dict[str, Any]], runs: dict[tuple[str, int], Path],
                   seed_curves: dict[str, list[list[dict[str, Any]]]]) -> None:
    """results.json, sweep.json and the plots (the first seed's training curves and sweep)."""
    from lacy_fast.eval.plots import (plot_budget_curve, plot_lock_in, plot_regime, plot_runs, plot_sweep,
                                      read_metrics)

    first_seed = {name: read_metrics(runs[(name, 0)]) for name, seed in runs if seed == 0}
    plot_runs(first_seed, out / "curves.png", window=5)
    plot_budget_curve(seed_curves, out / "budget_curve.png")
    plot_lock_in(first_seed, out / "lock_in.png")
    plot_sweep({name: per_seed[0] for name, per_seed in seed_curves.items()}, out / "sweep.png")
    plot_regime(rows, out / "regime.png")
    write_json(out / "results.json", rows)
    write_json(out / "sweep.json", seed_curves)


def _run_config(scale: Scale, data: Path, out: Path, shape: str, lr: float, gt_tokens: int,
                objective: dict[str, Any], seed: int = 0, probe: Path | None = None):
    """A training run of the demo, built as a value: ``gt_tokens`` ground-truth-gradient tokens
    (the equal budget), warm-up over its first 5%, the probe every 20th of the run."""
    from lacy_fast.config import DataConfig, ModelConfig, ObjectiveConfig, RunConfig, TrainConfig

    per_step = scale.seq_len * scale.micro_batch
    steps = gt_tokens // per_step
    train = TrainConfig(max_gt_tokens=gt_tokens, max_steps=2 * steps + 1, warmup_steps=max(1, steps // 20),
                        seq_len=scale.seq_len, micro_batch_size=scale.micro_batch, lr=lr, seed=1337 + seed,
                        ckpt_every=0, log_every=10, keep_last=1, probe="" if probe is None else str(probe),
                        probe_every=max(1, steps // 20))
    return RunConfig(out_dir=str(out), data=DataConfig(path=str(data), seed=1234 + seed),
                     model=ModelConfig(shape=shape, max_seq_len=scale.seq_len), train=train,
                     objective=ObjectiveConfig(**objective))


def _probe_data(corpus: Path, data: Path, out: Path, quiet: bool) -> Path:
    """The training probe: two training biographies of each frequent person (a biography states
    all of its subject's facts, a mention does not), prepared with the data's tokenizer and
    the perfect judge's labels, so the probe's judge-labeled tokens are exactly the facts."""
    from lacy_fast.config import JudgeConfig, PrepareConfig, TokenizerConfig
    from lacy_fast.data.prepare import prepare

    if (out / "stats.json").exists():
        return out
    people = [json.loads(line) for line in (corpus / "facts.jsonl").open()]
    frequent = [p for p in people if p["bucket"] == "frequent"]
    texts = [json.loads(line)["text"] for line in (corpus / "corpus.jsonl").open()]
    chosen = []
    for person in frequent:
        own = [t for t in texts if all(v in t for v in person["facts"].values())]
        chosen += own[:2]
    source = out.parent / "probe.jsonl"
    write_text(source, "".join(json.dumps({"text": t}) + "\n" for t in chosen))
    prepare(PrepareConfig(inputs=(str(source),), out=str(out), workers=1, shard_docs=500,
                          tokenizer=TokenizerConfig(path=str(data / "tokenizer.model")),
                          judge=JudgeConfig(spec=f"oracle:{corpus / 'facts.jsonl'}")), progress=not quiet)
    return out


def _evaluate_runs(out: Path, runs: dict[tuple[str, int], Path], strategies: tuple[str, ...], facts: Path,
                   cfg: Any, device: str, quiet: bool
                   ) -> tuple[dict[tuple[str, str], list[dict[str, Any]]], dict[str, list[list[dict[str, Any]]]]]:
    """Every SLM alone, in cascade at the equal budget and calling at the argmax, and its
    cascade at every budget of ``cfg.sweep`` (each seed). A row of ``SCORED_ROWS`` reuses
    its source's SLMs with another call score, in cascade only (alone and at the argmax it
    is its source). Returns the per-seed measures by (row, mode) and the per-seed budget
    curves by row (``sweep`` points; the equal-budget point is the cascade's own generation)."""
    from lacy_fast.cascade.big import load_big
    from lacy_fast.eval.plots import read_metrics
    from lacy_fast.eval.run import evaluate, sweep

    partner = load_big(f"oracle:{facts}", device)  # the paper's handoff: one word per call
    per_run: dict[tuple[str, str], list[dict[str, Any]]] = {}
    curves: dict[str, list[list[dict[str, Any]]]] = {}
    for name, seed, run, score in _eval_rows(runs, strategies):
        trained = training_summary(read_metrics(run))
        scored = dataclasses.replace(cfg, cascade=dataclasses.replace(cfg.cascade, score=score))
        argmax = dataclasses.replace(cfg, cascade=dataclasses.replace(cfg.cascade, rule="argmax"))
        modes = [("cascade", partner, scored)]
        if name not in SCORED_ROWS:
            modes = [("slm", None, cfg)] + modes + [("cascade-argmax", partner, argmax)]
        main = None
        for mode, big, mode_cfg in modes:
            result = evaluate(run, big, facts, cfg=mode_cfg, device=device, progress=not quiet)
            tag = run.name if name not in SCORED_ROWS else f"{name}{run.name[len(SCORED_ROWS[name][0]):]}"
            write_json(out / "eval" / f"{tag}-{mode}.json", result)
            per_run.setdefault((name, mode), []).append(measures(result, trained))
            main = result if mode == "cascade" else main
        assert main is not None
        rest = tuple(b for b in cfg.sweep if b != CALL_BUDGET)
        points = sweep(run, partner, facts, budgets=rest, cfg=scored, device=device, progress=not quiet)
        if CALL_BUDGET in cfg.sweep:
            points.append(curve_point(CALL_BUDGET, main))
        curves.setdefault(name, []).append(sorted(points, key=lambda p: p["budget"]))
    return per_run, curves


def _trained_rows(strategies: tuple[str, ...]) -> list[str]:
    """The rows whose SLMs are trained: ``strategies`` less the ``SCORED_ROWS``, plus their sources."""
    names = [s for s in strategies if s not in SCORED_ROWS]
    return names + [SCORED_ROWS[s][0] for s in strategies if s in SCORED_ROWS and SCORED_ROWS[s][0] not in names]


def _eval_rows(runs: dict[tuple[str, int], Path], strategies: tuple[str, ...]):
    """(row, seed, run, call score) for every evaluated row: each trained run with its own
    score (``auto``), and each requested ``SCORED_ROWS`` row on its source's runs."""
    for (name, seed), run in runs.items():
        yield name, seed, run, "auto"
    for name in strategies:
        if name in SCORED_ROWS:
            source, score = SCORED_ROWS[name]
            for (trained, seed), run in runs.items():
                if trained == source:
                    yield name, seed, run, score


def _finished(summary: dict[str, Any], run: Path) -> None:
    """A run stopped by a signal (it saved a checkpoint) stops the demo too: evaluating a
    half-trained model would compare it at another budget than the others."""
    if summary.get("stopped_by"):
        raise UserError(f"the demo was stopped by {summary['stopped_by']} while training {run}; rerun the same "
                        "command to resume where it stopped")


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
    parser.add_argument("--strategies", default=",".join(DEFAULT_ROWS),
                        help=f"comma-separated SLM rows, of: {', '.join(ALL_ROWS)}; or all (default "
                             f"{','.join(DEFAULT_ROWS)})")
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
    strategies = ALL_ROWS if args.strategies.strip() == "all" else \
        tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    bad = [s for s in strategies if s not in ALL_ROWS]
    if bad or not strategies:
        raise UserError(f"--strategies has {', '.join(bad) or 'nothing'}; choose from {', '.join(ALL_ROWS)} "
                        "or all")
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    run_demo(args.out, scale, strategies=strategies, seeds=args.seeds, device=args.device, quiet=args.quiet)
    return 0
