"""`lacy-fast eval`: FactScore, fact leakage, call precision / recall and perplexity.

    lacy-fast eval --slm runs/lacy --big oracle:synth/facts.jsonl --facts synth/facts.jsonl
    lacy-fast eval --slm runs/lacy --big runs/big --facts synth/facts.jsonl --sweep --out eval/lacy
    lacy-fast eval --slm runs/lacy --big runs/big --knowledge wiki_bios.jsonl --out eval/lacy   # real text

``--knowledge`` scores biographies of a knowledge source's titles instead (``knowledge_eval.py``).

Python (the demo evaluates several SLMs against one big model loaded once)::

    big = load_big("runs/big")
    for run in runs:
        result = evaluate(run, big, "synth/facts.jsonl", cfg=EvalConfig(people=100))
    curve = sweep(run, big, "synth/facts.jsonl", cfg=EvalConfig())
    plot_sweep({"lacy": curve}, Path("sweep.png"))

The evaluated people are the first ``people`` of ``heldout.jsonl`` (beside the facts file
unless given). Each measure is defined in its module:

- FactScore (``factscore.py``): generate from each person's name with the cascade, extract
  the stated facts with the fact table, supported / stated; also per popularity bucket
  (``factscore_frequent``, ``factscore_rare``) when the fact table has buckets.
- ``score``: the call score the rules rank (``CascadeConfig.score``, ``auto`` resolved from
  the SLM's training strategy: p(CALL), or entropy for a plain LM).
- ``call_rate``: share of the generation's decoding steps at which the rule called.
- Leakage (``leakage.py``) and perplexity / call precision and recall (``heldout.py``): one
  teacher-forced pass over the people's held-out texts, with the SLM alone.

``big=None`` (``--big none``) evaluates the SLM alone: nothing calls in generation
(call_rate 0); the held-out call statistics still show where the rule *would* call.

Result (JSON): ``factscore`` (macro FactScore, None when no fact was stated),
``factscore_<bucket>``, ``call_rate``, ``leakage``, ``perplexity``, ``score``, then
``factscore_detail``, ``factscore_by_bucket``, ``generation``
(cascade counts), ``calls`` (held-out precision / recall), ``leakage_detail``,
``perplexity_detail``, ``samples`` (a few generations with the big model's spans marked),
``slm``, ``big``, ``rule``, ``rule_heldout``, ``handoff`` (what one answered call supplies:
``token``, ``word``, or ``value`` for ``oracle-value:FACTS``, the upper bound; None alone),
``calibration`` (``--score combined``: the training documents its ranks come from, read from
``corpus.jsonl`` beside the facts, never about a held-out person), ``people``, ``config``,
``seconds``; with ``--sweep``, ``sweep``: the FactScore at each call budget.
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
from lacy_fast.cascade.engine import Cascade, Generation, summarize
from lacy_fast.cascade.calibration import Calibration, calibrate
from lacy_fast.cascade.generate import add_cascade_arguments, cascade_shorthands
from lacy_fast.cascade.rules import make_rule, ranked_score, resolve_score
from lacy_fast.cascade.slm import ExportedModel, load_model, resolve_device
from lacy_fast.config import CascadeConfig, EvalConfig
from lacy_fast.data.facts import FactTable, HeldOut, Person, read_heldout
from lacy_fast.errors import UserError
from lacy_fast.eval.factscore import factscore, prompt_for, score_generation
from lacy_fast.eval.heldout import call_stats, perplexity, score_texts
from lacy_fast.overrides import Shorthand, add_config_arguments, build_config, print_explain, shorthand_help
from lacy_fast.eval.leakage import leakage
from lacy_fast.eval.plots import plot_sweep
from lacy_fast.eval.report import format_report
from lacy_fast.fileio import check_writable, write_json
from lacy_fast.progress import Progress

SlmLike = ExportedModel | str | Path
BigLike = BigModel | ExportedModel | str | Path | None


def evaluate(slm: SlmLike, big: BigLike, facts_path: str | Path, *, heldout_path: str | Path | None = None,
             cfg: EvalConfig | None = None, device: torch.device | str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Every measure of the module docstring for ``slm`` calling ``big``.

    ``slm``: an export path (or run out_dir) or a loaded ``ExportedModel``. ``big``: None or
    "none" (the SLM alone), a ``--big`` spec, a loaded ``BigModel``, or an ``ExportedModel``
    (used as a same-tokenizer big model).
    """
    cfg = cfg or EvalConfig()
    start = time.perf_counter()
    slm, big = _slm(slm, device), _big(big, device, cfg.cascade)
    table, texts = _data(facts_path, heldout_path, cfg.people)
    people = [h.person for h in texts]
    score = resolve_score(cfg.cascade.score, slm.meta.get("strategy"))
    calib = _calibration(slm, score, facts_path, heldout_path, table, cfg.cascade, device)

    t0 = time.perf_counter()
    generations = _generate(slm, big, cfg.cascade, people, device, progress, calibration=calib)
    t1 = time.perf_counter()
    bar = Progress("eval held-out", total=len(texts), unit="texts", enabled=progress)
    scores = score_texts(slm, texts, batch_size=cfg.heldout_batch_size, device=device, progress=bar)
    bar.close()
    if calib is not None:
        for s in scores:
            s.scores["combined"] = calib.rank_product(s.scores["call_logodds"], s.scores["entropy"])
    t2 = time.perf_counter()

    fs, by_bucket = _factscores(table, people, generations)
    gen = summarize(generations)
    leak, ppl = leakage(scores), perplexity(scores)
    samples = []
    for person, g in zip(people[: cfg.samples], generations):
        facts = score_generation(table, person, g.text)
        samples.append({"person": person.name, "marked": g.marked(), "facts": [dataclasses.asdict(f) for f in facts]})
    return {
        "factscore": fs["macro"],
        **{f"factscore_{b}": f["macro"] for b, f in by_bucket.items()},
        "call_rate": gen["call_rate"],
        "leakage": leak["leakage"],
        "perplexity": ppl["perplexity"],
        "score": score,
        "factscore_detail": fs,
        "factscore_by_bucket": by_bucket,
        "generation": gen,
        "calls": call_stats(scores, make_rule(cfg.cascade), score, ranked_score(score, cfg.cascade.rule)),
        "leakage_detail": leak,
        "perplexity_detail": ppl,
        "samples": samples,
        "slm": slm.name,
        "big": big.name if big is not None else "none",
        "rule": cfg.cascade.rule if big is not None else "never",
        "rule_heldout": cfg.cascade.rule,
        "handoff": getattr(big, "handoff", None) if big is not None else None,
        "calibration": calib.meta if calib is not None else None,
        "people": len(people),
        "config": cfg.to_dict(),
        "seconds": {"generation": t1 - t0, "heldout": t2 - t1, "total": time.perf_counter() - start},
    }


def sweep(slm: SlmLike, big: BigLike, facts_path: str | Path, *, budgets: tuple[float, ...] | None = None,
          heldout_path: str | Path | None = None, cfg: EvalConfig | None = None,
          device: torch.device | str = "cpu", progress: bool = True) -> list[dict[str, Any]]:
    """FactScore against the call rate: one cascade generation per call budget (rule=budget).

    Returns one point per budget (``cfg.sweep`` unless ``budgets``): ``budget``,
    ``call_rate``, ``answered_rate``, ``steps``, ``calls``, ``factscore`` (macro), ``factscore_micro``,
    ``facts_per_generation``, ``supported_per_generation``, ``share_with_facts``.
    """
    cfg = cfg or EvalConfig()
    slm, big = _slm(slm, device), _big(big, device, cfg.cascade)
    if big is None:
        raise UserError("the call-rate sweep needs a big model to call; pass --big (a model or oracle:FACTS)")
    table, texts = _data(facts_path, heldout_path, cfg.people)
    people = [h.person for h in texts]
    score = resolve_score(cfg.cascade.score, slm.meta.get("strategy"))
    calib = _calibration(slm, score, facts_path, heldout_path, table, cfg.cascade, device)
    points = []
    for budget in budgets if budgets is not None else cfg.sweep:
        run_cfg = dataclasses.replace(cfg.cascade, rule="budget", budget=budget)
        generations = _generate(slm, big, run_cfg, people, device, progress, label=f"sweep {budget:.2f}",
                                calibration=calib)
        (fs, by_bucket), gen = _factscores(table, people, generations), summarize(generations)
        points.append({"budget": budget, "call_rate": gen["call_rate"], "answered_rate": gen["answered_rate"],
                       "steps": gen["steps"], "calls": gen["calls"],
                       "factscore": fs["macro"], "factscore_micro": fs["micro"],
                       **{f"factscore_{b}": f["macro"] for b, f in by_bucket.items()},
                       "facts_per_generation": fs["facts_per_generation"],
                       "supported_per_generation": fs["supported_per_generation"],
                       "share_with_facts": fs["share_with_facts"]})
    return points


def _factscores(table: FactTable, people: list[Person], generations: list[Generation]
                ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """FactScore of the generations, and per popularity bucket of their people."""
    texts = [g.text for g in generations]
    by_bucket = {b: factscore(table, [p for p in people if p.bucket == b],
                              [t for p, t in zip(people, texts) if p.bucket == b])
                 for b in sorted({p.bucket for p in people if p.bucket is not None})}
    return factscore(table, people, texts), by_bucket


def _generate(slm: ExportedModel, big: BigModel | None, cfg: CascadeConfig, people: list[Person],
              device: torch.device | str, progress: bool, label: str = "eval generate",
              calibration: Calibration | None = None) -> list[Generation]:
    bar = Progress(label, total=len(people), unit="people", enabled=progress)
    generations = Cascade(slm, big, cfg, device, calibration).generate([prompt_for(p) for p in people], bar)
    bar.close()
    return generations


def _calibration(slm: ExportedModel, score: str, facts_path: str | Path, heldout_path: str | Path | None,
                 table: FactTable, cfg: CascadeConfig, device: torch.device | str) -> Calibration | None:
    """score=combined: the CDFs on training documents (corpus.jsonl beside the facts) of people
    outside the held-out file, so that no evaluated person is read; None for other scores."""
    if score != "combined":
        return None
    heldout = Path(heldout_path) if heldout_path is not None else Path(facts_path).with_name("heldout.jsonl")
    exclude = {h.person.id for h in read_heldout(heldout, table)}  # every person an evaluation may take
    return calibrate(slm, Path(facts_path).with_name("corpus.jsonl"), table, exclude,
                     documents=cfg.calibration_docs, device=device)


def _slm(slm: SlmLike, device: torch.device | str) -> ExportedModel:
    return slm if isinstance(slm, ExportedModel) else load_model(slm, device)


def _big(big: BigLike, device: torch.device | str, cfg: CascadeConfig) -> BigModel | None:
    if isinstance(big, ExportedModel):
        return LacyBig(big)
    if big is None or isinstance(big, (str, Path)):
        return load_big(None if big is None else str(big), device, cfg.max_word_tokens)
    return big


def _data(facts_path: str | Path, heldout_path: str | Path | None, people: int) -> tuple[FactTable, list[HeldOut]]:
    table = FactTable.read(facts_path)
    heldout = Path(heldout_path) if heldout_path is not None else Path(facts_path).with_name("heldout.jsonl")
    texts = read_heldout(heldout, table)[:people]
    if not texts:
        raise UserError(f"held-out file {heldout} holds no text; write one with `lacy-fast synth --heldout 0.1`")
    return table, texts


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
    if args.explain:
        print_explain(EvalConfig, "eval", SHORTHANDS)
        return 0
    if (args.facts is None) == (args.knowledge is None):
        raise UserError("pass one of --facts (the synthetic fact table) and --knowledge (a knowledge source of articles)")
    if not args.slm:
        raise UserError("no SLM given; pass --slm OUT/export (or a run's out_dir)")
    sweep_given = args.sweep is not None or any(o.strip().startswith("sweep=") for o in args.overrides or ())
    if args.sweep is not None:
        try:
            args.sweep = [float(b) for b in args.sweep.split(",") if b.strip()] or None
        except ValueError:
            raise UserError(f"--sweep {args.sweep} is not a comma-separated list of budgets, e.g. 0,0.1,0.22,0.5,1")
    cfg = build_config(EvalConfig, args, SHORTHANDS, command="eval")
    args.sweep = ",".join(map(str, cfg.sweep)) if sweep_given else None
    cascade = cfg.cascade
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file; pass a directory")
    if args.out is not None:
        check_writable(args.out, "--out")  # before the work, not after it
    device = resolve_device(args.device)
    if args.knowledge is not None:
        return _run_knowledge(args, cfg, device)
    slm = load_model(args.slm, device)
    big = load_big(args.big, device, cascade.max_word_tokens)
    result = evaluate(slm, big, args.facts, heldout_path=args.heldout, cfg=cfg, device=device,
                      progress=not args.quiet)
    if args.sweep is not None:
        result["sweep"] = sweep(slm, big, args.facts, heldout_path=args.heldout, cfg=cfg, device=device,
                                progress=not args.quiet)
    if args.out is not None:
        write_json(args.out / "eval.json", result)
        if args.sweep is not None:
            plot_sweep({slm.label: result["sweep"]}, args.out / "sweep.png")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(format_report(result))
    if args.sweep is not None:
        print("\nsweep (budget -> call rate, FactScore, supported facts per generation):")
        for p in result["sweep"]:
            fs = "-" if p["factscore"] is None else f"{p['factscore']:.3f}"
            print(f"  {p['budget']:.2f} -> {p['call_rate']:.1%}, {fs}, {p['supported_per_generation']:.2f}")
    if args.out is not None:
        print(f"\nwrote {args.out / 'eval.json'}" + (f" and {args.out / 'sweep.png'}" if args.sweep is not None else ""))
    return 0


def _run_knowledge(args: argparse.Namespace, cfg: EvalConfig, device: torch.device) -> int:
    """``--knowledge``: FactScore on the source's titles (``knowledge_eval.py``)."""
    from lacy_fast.eval.knowledge_eval import evaluate_knowledge, format_knowledge_report
    from lacy_fast.eval.sources import open_source

    if args.sweep is not None:
        raise UserError("--sweep is computed on the synthetic fact table; pass --facts for it")
    source = open_source(args.knowledge, args.judge, device=str(device))
    slm = load_model(args.slm, device)
    big = load_big(args.big, device, cfg.cascade.max_word_tokens)
    result = evaluate_knowledge(slm, big, source, cfg, device, progress=not args.quiet)
    if args.out is not None:
        write_json(args.out / "eval.json", result)
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else format_knowledge_report(result))
    if args.out is not None and not args.json:
        print(f"\nwrote {args.out / 'eval.json'}")
    return 0
