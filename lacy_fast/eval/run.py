"""`lacy-fast eval`: FactScore, and where the source has held-out text, fact leakage, call
precision / recall and perplexity.

    lacy-fast eval --slm runs/lacy --big oracle:synth/facts.jsonl --facts synth/facts.jsonl
    lacy-fast eval --slm runs/lacy --big runs/big --facts synth/facts.jsonl --sweep --out eval/lacy
    lacy-fast eval --slm runs/lacy --big runs/big --knowledge wiki_bios.jsonl --out eval/lacy   # real text

Python (the demo evaluates several SLMs against one big model loaded once)::

    big = load_big("runs/big")
    for run in runs:
        result = evaluate(run, big, "synth/facts.jsonl", cfg=EvalConfig(people=100))
    curve = sweep(run, big, "synth/facts.jsonl", cfg=EvalConfig())

``evaluate(slm, big, source)`` generates a biography for each evaluated title with the
cascade (``big=None``: the SLM alone) and scores it against the source (``sources.py``:
the FactScore summary). A source with held-out text (the synthetic fact table: its
evaluated titles are the first ``people`` of ``heldout.jsonl``) adds the held-out measures
of ``heldout.py`` from one teacher-forced pass with the SLM alone, FactScore per popularity
bucket, and ``score`` (the call score the rules rank); a source without (a knowledge
source: its first ``people`` titles) adds the SLM alone beside the cascade. ``report.py``
formats either result (one JSON object: ``--out DIR`` writes ``DIR/eval.json``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from lacy_fast.cascade.big import BigModel, LacyBig, load_big
from lacy_fast.cascade.calibration import Calibration, calibrate
from lacy_fast.cascade.engine import Cascade, Generation, summarize as generation_summary
from lacy_fast.cascade.generate import add_cascade_arguments, cascade_shorthands
from lacy_fast.cascade.rules import make_rule, ranked_score, resolve_score
from lacy_fast.cascade.slm import ExportedModel, load_model, resolve_device
from lacy_fast.config import CascadeConfig, EvalConfig
from lacy_fast.data.facts import FactTable, HeldOut, read_heldout
from lacy_fast.errors import UserError
from lacy_fast.eval.heldout import call_stats, leakage, perplexity, score_texts
from lacy_fast.eval.plots import plot_sweep
from lacy_fast.eval.report import format_report, format_sweep
from lacy_fast.eval.sources import FactSource, Item, SyntheticSource, open_source, summarize
from lacy_fast.fileio import check_writable, write_json
from lacy_fast.overrides import Shorthand, add_config_arguments, config_or_explain, shorthand_help
from lacy_fast.progress import Progress

SlmLike = ExportedModel | str | Path
BigLike = BigModel | ExportedModel | str | Path | None
SourceLike = FactSource | str | Path
LEAKAGE_NOTE = ("fact leakage needs the same facts in text the model has not seen (held-out renderings); a knowledge "
                "source has one article per entity, usually training text, so it is not defined here")


def evaluate(slm: SlmLike, big: BigLike, source: SourceLike, *, cfg: EvalConfig | None = None,
             device: torch.device | str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Every measure the source allows for ``slm`` calling ``big``.

    ``slm``: an export path (or run out_dir) or a loaded ``ExportedModel``. ``big``: None or
    "none" (the SLM alone), a ``--big`` spec, a loaded ``BigModel``, or an ``ExportedModel``
    (used as a same-tokenizer big model). ``source``: a ``FactSource`` or its path.
    """
    cfg = cfg or EvalConfig()
    start = time.perf_counter()
    slm, big, source = _slm(slm, device), _big(big, device, cfg.cascade), _source(source)
    texts = source.heldout(cfg.people)
    titles = [h.person.name for h in texts] if texts is not None else source.titles[: cfg.people]
    if not titles:
        raise UserError(f"knowledge source {source.name} has no title to evaluate")
    score = resolve_score(cfg.cascade.score, slm.meta.get("strategy"))
    calib = _calibration(slm, score, source, cfg.cascade, device) if texts is not None else None
    t0 = time.perf_counter()
    main = "cascade" if big is not None else "alone"
    modes = {main: big} if texts is not None else {"alone": None, main: big}  # without held-out text: both
    runs = {name: _generate(slm, model, cfg.cascade, source, titles, device, progress, name, calib)
            for name, model in modes.items()}
    generations, items = runs[main]
    gen = generation_summary(generations)
    fs = summarize(items, source.attributes)
    result: dict[str, Any] = {
        "factscore": fs["factscore"], "call_rate": gen["call_rate"],
        "samples": [source.sample(i, g.marked()) for g, i in zip(generations[: cfg.samples], items)],
        "slm": slm.name, "big": big.name if big is not None else "none",
        "rule": cfg.cascade.rule if big is not None else "never", "people": len(titles), "config": cfg.to_dict(),
    }
    if texts is None:
        result.update(_compared(runs), leakage=None, leakage_note=LEAKAGE_NOTE, judge=source.judge_name,
                      knowledge=source.name, seconds=time.perf_counter() - start)
        return result
    t1 = time.perf_counter()
    result.update(_heldout_measures(slm, texts, cfg, score, calib, device, progress), score=score,
                  factscore_detail=fs, generation=gen, rule_heldout=cfg.cascade.rule,
                  handoff=getattr(big, "handoff", None) if big is not None else None,
                  calibration=calib.meta if calib is not None else None)
    by_bucket = _by_bucket(source, items)
    result.update({f"factscore_{b}": f["factscore"] for b, f in by_bucket.items()}, factscore_by_bucket=by_bucket)
    result["seconds"] = {"generation": t1 - t0, "heldout": time.perf_counter() - t1,
                         "total": time.perf_counter() - start}
    return result


def _compared(runs: dict[str, tuple[list[Generation], list[Item]]]) -> dict[str, Any]:
    """The SLM alone beside the cascade: each mode's summary with its generation counts."""
    summaries = {name: {**summarize(items), "generation": generation_summary(gens)}
                 for name, (gens, items) in runs.items()}
    return {"factscore_alone": summaries["alone"]["factscore"],
            "factscore_cascade": summaries["cascade"]["factscore"] if "cascade" in summaries else None, **summaries}


def _heldout_measures(slm: ExportedModel, texts: list[HeldOut], cfg: EvalConfig, score: str,
                      calib: Calibration | None, device: torch.device | str, progress: bool) -> dict[str, Any]:
    """Leakage, perplexity and held-out calls from one teacher-forced pass (``heldout.py``)."""
    bar = Progress("eval held-out", total=len(texts), unit="texts", enabled=progress)
    scores = score_texts(slm, texts, batch_size=cfg.heldout_batch_size, device=device, progress=bar)
    bar.close()
    if calib is not None:
        for s in scores:
            s.scores["combined"] = calib.rank_product(s.scores["call_logodds"], s.scores["entropy"])
    leak, ppl = leakage(scores), perplexity(scores)
    calls = call_stats(scores, make_rule(cfg.cascade), score, ranked_score(score, cfg.cascade.rule))
    return {"leakage": leak["leakage"], "perplexity": ppl["perplexity"], "calls": calls, "leakage_detail": leak,
            "perplexity_detail": ppl}


def sweep(slm: SlmLike, big: BigLike, source: SourceLike, *, budgets: tuple[float, ...] | None = None,
          cfg: EvalConfig | None = None, device: torch.device | str = "cpu", progress: bool = True
          ) -> list[dict[str, Any]]:
    """FactScore against the call rate: one cascade generation per call budget (rule=budget).

    Returns one point per budget (``cfg.sweep`` unless ``budgets``): ``budget``,
    ``call_rate``, ``answered_rate``, ``steps``, ``calls``, ``factscore``, ``factscore_micro``,
    ``factscore_<bucket>``, ``facts_per_generation``, ``supported_per_generation``, ``share_with_facts``.
    """
    cfg = cfg or EvalConfig()
    slm, big, source = _slm(slm, device), _big(big, device, cfg.cascade), _source(source)
    if big is None:
        raise UserError("the call-rate sweep needs a big model to call; pass --big (a model or oracle:FACTS)")
    texts = source.heldout(cfg.people)
    titles = [h.person.name for h in texts] if texts is not None else source.titles[: cfg.people]
    score = resolve_score(cfg.cascade.score, slm.meta.get("strategy"))
    calib = _calibration(slm, score, source, cfg.cascade, device) if texts is not None else None
    points = []
    for budget in budgets if budgets is not None else cfg.sweep:
        run_cfg = dataclasses.replace(cfg.cascade, rule="budget", budget=budget)
        generations, items = _generate(slm, big, run_cfg, source, titles, device, progress, f"sweep {budget:.2f}",
                                       calib)
        fs, gen = summarize(items), generation_summary(generations)
        points.append({"budget": budget, "call_rate": gen["call_rate"], "answered_rate": gen["answered_rate"],
                       "steps": gen["steps"], "calls": gen["calls"],
                       "factscore": fs["factscore"], "factscore_micro": fs["micro"],
                       **{f"factscore_{b}": f["factscore"] for b, f in _by_bucket(source, items).items()},
                       **{k: fs[k] for k in ("facts_per_generation", "supported_per_generation", "share_with_facts")}})
    return points


def _by_bucket(source: FactSource, items: list[Item]) -> dict[str, dict[str, Any]]:
    """FactScore over the items of each popularity bucket of the source's titles."""
    buckets = [source.bucket(i.title) for i in items]
    return {b: summarize([i for i, ib in zip(items, buckets) if ib == b], source.attributes)
            for b in sorted({b for b in buckets if b is not None})}


def _generate(slm: ExportedModel, big: BigModel | None, cfg: CascadeConfig, source: FactSource, titles: list[str],
              device: torch.device | str, progress: bool, label: str,
              calibration: Calibration | None = None) -> tuple[list[Generation], list[Item]]:
    """The cascade's generation for each title, and the items the source scores them as."""
    bar = Progress(f"eval {label}", total=len(titles), unit="people", enabled=progress)
    generations = Cascade(slm, big, cfg, device, calibration).generate([source.prompt(t) for t in titles], bar)
    bar.close()
    bar = Progress(f"factscore {label}", total=len(titles), unit="generations", enabled=progress)
    items = source.score([(t, source.scored_text(g.prompt, g.text)) for t, g in zip(titles, generations)],
                         progress=bar)
    bar.close()
    return generations, items


def _calibration(slm: ExportedModel, score: str, source: SyntheticSource, cfg: CascadeConfig,
                 device: torch.device | str) -> Calibration | None:
    """score=combined: the CDFs on training documents (corpus.jsonl beside the facts) of people
    outside the held-out file, so that no evaluated person is read; None for other scores."""
    if score != "combined":
        return None
    exclude = {h.person.id for h in read_heldout(source.heldout_path, source.table)}  # every person evaluable
    return calibrate(slm, Path(source.table.path).with_name("corpus.jsonl"), source.table, exclude,
                     documents=cfg.calibration_docs, device=device)


def _slm(slm: SlmLike, device: torch.device | str) -> ExportedModel:
    return slm if isinstance(slm, ExportedModel) else load_model(slm, device)


def _big(big: BigLike, device: torch.device | str, cfg: CascadeConfig) -> BigModel | None:
    if isinstance(big, ExportedModel):
        return LacyBig(big)
    if big is None or isinstance(big, (str, Path)):
        return load_big(None if big is None else str(big), device, cfg.max_word_tokens)
    return big


def _source(source: SourceLike) -> FactSource:
    return open_source(source) if isinstance(source, (str, Path)) else source


# -- command line ---------------------------------------------------------------------------


SHORTHANDS = [Shorthand("--people", "people"), Shorthand("--sweep", "sweep"), *cascade_shorthands("cascade.")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = EvalConfig()
    parser.add_argument("--facts", type=Path, help="facts.jsonl of `lacy-fast synth` (the ground truth)")
    parser.add_argument("--knowledge", type=Path,
                        help='instead of --facts: a knowledge source, JSONL of {"title", "text"} articles; biographies '
                             "of its first --people titles are generated alone and in cascade and scored against it")
    parser.add_argument("--judge", default="rules", help="with --knowledge: rules (no model) or hf:DIR (a local "
                        "Hugging Face causal LM judges each fact)")
    parser.add_argument("--heldout", type=Path, help="held-out texts (default: heldout.jsonl beside --facts)")
    parser.add_argument("--people", type=int, help=shorthand_help(f"held-out people evaluated (default {d.people})",
                                                                  "people"))
    add_cascade_arguments(parser, "cascade.")
    parser.add_argument("--sweep", nargs="?", const=",".join(str(b) for b in d.sweep), metavar="B,B,...",
                        help=shorthand_help("also sweep the call budget and draw FactScore vs call rate (default "
                                            f"budgets: {','.join(str(b) for b in d.sweep)})", "sweep"))
    parser.add_argument("--out", type=Path, help="directory for eval.json (and sweep.png with --sweep)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    add_config_arguments(parser, EvalConfig)


def run(args: argparse.Namespace) -> int:
    sweep_given = _parse_sweep(args)
    cfg = config_or_explain(EvalConfig, args, SHORTHANDS, "eval")
    if cfg is None:
        return 0
    args.sweep = ",".join(map(str, cfg.sweep)) if sweep_given else None
    if (args.facts is None) == (args.knowledge is None):
        raise UserError("pass one of --facts (the synthetic fact table) and --knowledge (a knowledge source of articles)")
    if not args.slm:
        raise UserError("no SLM given; pass --slm OUT/export (or a run's out_dir)")
    if args.knowledge is not None and args.sweep is not None:
        raise UserError("--sweep is computed on the synthetic fact table; pass --facts for it")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file; pass a directory")
    if args.out is not None:
        check_writable(args.out, "--out")  # before the work, not after it
    device = resolve_device(args.device)
    if args.knowledge is not None:
        source = open_source(args.knowledge, args.judge, device=str(device))
    else:
        source = SyntheticSource(FactTable.read(args.facts), args.heldout)
    slm = load_model(args.slm, device)
    big = load_big(args.big, device, cfg.cascade.max_word_tokens)
    result = evaluate(slm, big, source, cfg=cfg, device=device, progress=not args.quiet)
    if args.sweep is not None:
        result["sweep"] = sweep(slm, big, source, cfg=cfg, device=device, progress=not args.quiet)
    if args.out is not None:
        write_json(args.out / "eval.json", result)
        if args.sweep is not None:
            plot_sweep({slm.label: result["sweep"]}, args.out / "sweep.png")
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    print(format_report(result))
    if args.sweep is not None:
        print(format_sweep(result["sweep"]))
    if args.out is not None:
        print(f"\nwrote {args.out / 'eval.json'}" + (f" and {args.out / 'sweep.png'}" if args.sweep is not None else ""))
    return 0


def _parse_sweep(args: argparse.Namespace) -> bool:
    """``--sweep B,B,...`` as a list of budgets (the config reads it); whether a sweep was asked for."""
    given = args.sweep is not None or any(o.strip().startswith("sweep=") for o in args.overrides or ())
    if args.sweep is not None:
        try:
            args.sweep = [float(b) for b in args.sweep.split(",") if b.strip()] or None
        except ValueError:
            raise UserError(f"--sweep {args.sweep} is not a comma-separated list of budgets, e.g. 0,0.1,0.22,0.5,1")
    return given
