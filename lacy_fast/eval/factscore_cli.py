"""`lacy-fast factscore`: FactScore of generations against a knowledge source.

    lacy-fast factscore --knowledge wiki_bios.jsonl --generations gen.jsonl [--judge hf:DIR] [--out fs.json]

``--generations``: JSONL, one ``{"title": ..., "generation": ...}`` per line (other keys
are ignored). ``--knowledge``: JSONL of ``{"title", "text"}`` articles, or the synthetic
facts.jsonl of ``lacy-fast synth`` (scored exactly, as `lacy-fast eval --facts` does).
Every title must be in the source. ``sources.py`` defines the atomic facts, the judges and
the score.

Prints, and writes to ``--out``, one JSON object: ``factscore`` (mean over the items that
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
from pathlib import Path
from typing import Any

from lacy_fast.errors import UserError
from lacy_fast.fileio import check_writable, jsonl_string_pairs, utf8_problem, write_json
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--knowledge", required=True, type=Path,
                        help='knowledge source: JSONL of {"title", "text"} articles, or facts.jsonl of `lacy-fast synth`')
    parser.add_argument("--generations", required=True, type=Path, help=f"the generations: {GEN_HINT}")
    parser.add_argument("--judge", default="rules",
                        help="rules (default: no model, spaCy claims checked in the retrieved passages) or hf:DIR "
                             "(a local Hugging Face causal LM answers True / False)")
    parser.add_argument("--passages", type=int, default=5, help="passages retrieved per fact (default 5)")
    parser.add_argument("--device", default="cpu", help="device of an hf: judge (default cpu)")
    parser.add_argument("--out", type=Path, help="also write the JSON result to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    if args.passages < 1:
        raise UserError(f"--passages is {args.passages}; retrieve at least 1 passage per fact")
    if args.out is not None and args.out.is_dir():
        raise UserError(f"--out {args.out} is a directory; pass a file name")
    if args.out is not None:
        check_writable(args.out, "--out")  # before the work, not after it
    try:
        result = score_file(args.knowledge, args.generations, args.judge, args.passages, args.device, not args.quiet)
    except UnicodeDecodeError:
        problem = args.knowledge.is_file() and utf8_problem(args.knowledge, "knowledge source")
        if problem:
            raise UserError(problem)
        raise
    # Printed first: should --out fail after all (the disk filled meanwhile), the scores are on stdout.
    print(json.dumps(result, indent=2, ensure_ascii=False), flush=True)
    if args.out is not None:
        try:
            write_json(args.out, result)
        except OSError as err:
            raise UserError(f"--out {args.out} could not be written ({err.strerror}); the result is printed above")
    return 0
