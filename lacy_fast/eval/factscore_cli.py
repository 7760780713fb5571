"""`lacy-fast factscore`: FactScore of generations against a knowledge source.

    lacy-fast factscore --knowledge wiki_bios.jsonl --generations gen.jsonl [--judge hf:DIR] [--out fs.json]

``--generations``: JSONL, one ``{"title": ..., "generation": ...}`` per line (other keys
are ignored). ``--knowledge``: JSONL of ``{"title", "text"}`` articles, or the synthetic
facts.jsonl of ``lacy-fast synth`` (scored exactly, as `lacy-fast eval --facts` does).
Every title must be in the source. ``sources.py`` defines the atomic facts, the verifiers and
the score.

Prints a summary table and one line per generation; ``--out FILE`` writes the details (and
``--json`` prints them instead), one JSON object: ``factscore`` (mean over the items that
state at least one fact; null when none does), ``micro``, ``facts``, ``supported``,
``generations``, ``facts_per_generation``, ``supported_per_generation``,
``share_with_facts``, ``judge``, ``knowledge``, ``source``, ``retrieved_passages``,
``seconds``, ``facts_per_second``, and ``items``: per generation ``title``, ``facts``,
``supported``, ``score``, ``claims`` (each fact: ``text``, ``kind``, ``supported``, and for
a knowledge source ``relation``, ``sentence``, ``passages``), ``generation``.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lacy_fast.config import Config, doc
from lacy_fast.errors import ConfigError, UserError
from lacy_fast.fileio import check_writable, jsonl_string_pairs, utf8_problem, write_json
from lacy_fast.eval.report import format_scores
from lacy_fast.overrides import Shorthand, add_config_arguments, config_or_explain, shorthand_help
from lacy_fast.progress import Progress

GEN_HINT = 'JSONL with one {"title": ..., "generation": ...} per line'


def read_generations(path: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(title, generation) pairs and "file:line" of each."""
    rows = list(jsonl_string_pairs(path, ("title", "generation"), "generations file", "generation", GEN_HINT))
    return [(title, text) for _, title, text in rows], [f"{path}:{n}" for n, _, _ in rows]


def score_file(knowledge: Path, generations: Path, judge: str = "rules", k: int = 5, device: str = "cpu",
               progress: bool = True) -> dict[str, Any]:
    from lacy_fast.eval.sources import open_source, summarize

    pairs, where = read_generations(generations)
    source = open_source(knowledge, judge, k=k, device=device)
    start = time.perf_counter()
    bar = Progress("factscore", total=len(pairs), unit="generations", enabled=progress)
    items = source.score(pairs, where, bar)
    bar.close()
    seconds = time.perf_counter() - start
    summary = summarize(items)
    return {**summary, "judge": source.judge_name, "knowledge": str(knowledge), "source": source.kind,
            "retrieved_passages": k if source.kind == "knowledge" else None, "seconds": seconds,
            "facts_per_second": summary["facts"] / seconds if seconds > 0 else None,
            "items": [i.to_dict() for i in items]}


@dataclass
class FactScoreConfig(Config):
    """The settings of `lacy-fast factscore` (its flags are shorthands for these keys)."""

    judge: str = doc("rules", "rules (no model: spaCy claims checked in the retrieved passages) or hf:DIR (a local "
                     "Hugging Face causal LM answers True / False)")
    passages: int = doc(5, "passages retrieved per fact")

    def check(self) -> None:
        if self.passages < 1:
            raise ConfigError("passages", f"is {self.passages}; retrieve at least 1 passage per fact")


SHORTHANDS = [Shorthand("--judge", "judge"), Shorthand("--passages", "passages")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--knowledge", type=Path,
                        help='knowledge source: JSONL of {"title", "text"} articles, or facts.jsonl of `lacy-fast synth`')
    parser.add_argument("--generations", type=Path, help=f"the generations: {GEN_HINT}")
    parser.add_argument("--judge", help=shorthand_help("rules (default) or hf:DIR", "judge"))
    parser.add_argument("--passages", type=int, help=shorthand_help("passages retrieved per fact (default 5)",
                                                                     "passages"))
    parser.add_argument("--device", default="cpu", help="device of an hf: judge (default cpu)")
    parser.add_argument("--out", type=Path, help="write the details (every generation and each judged claim) to this "
                        "JSON file")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON instead of the tables")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    add_config_arguments(parser, FactScoreConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_or_explain(FactScoreConfig, args, SHORTHANDS, "factscore")
    if cfg is None:
        return 0
    if args.knowledge is None or args.generations is None:
        raise UserError("pass --knowledge FILE (the facts to check against) and --generations FILE (what to score)")
    if args.out is not None and args.out.is_dir():
        raise UserError(f"--out {args.out} is a directory; pass a file name")
    if args.out is not None:
        check_writable(args.out, "--out")  # before the work, not after it
    try:
        result = score_file(args.knowledge, args.generations, cfg.judge, cfg.passages, args.device, not args.quiet)
    except UnicodeDecodeError:
        problem = args.knowledge.is_file() and utf8_problem(args.knowledge, "knowledge source")
        if problem:
            raise UserError(problem)
        raise
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False), flush=True)
    if args.out is not None:
        try:
            write_json(args.out, result)
        except OSError as err:
            if not args.json:  # should --out fail after all (the disk filled meanwhile), the scores reach stdout
                print(json.dumps(result, indent=2, ensure_ascii=False), flush=True)
            raise UserError(f"--out {args.out} could not be written ({err.strerror}); the result is printed above")
    if not args.json:
        print(format_scores(result, args.out))
    return 0
