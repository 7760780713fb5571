"""`lacy-fast generate`: cascade generation from the command line.

    lacy-fast generate --slm runs/lacy --big oracle:synth/facts.jsonl --prompt "Thynoxine Nahoxski"
    lacy-fast generate --slm runs/lacy --big runs/big --prompt A --prompt B --rule argmax --json

prints each prompt with its continuation, the big model's text between [[ and ]], and a
line of counts per generation; ``--json`` prints JSON Lines instead, one row per generation:
``{"title", "generation", "prompt", "text", "marked", "called_spans", "tokens", "big_tokens",
"steps", "calls", "answered", "call_rate", "finish", "slm", "big", "rule", "score"}``, where
``generation`` is prompt + text, so that ``lacy-fast generate ... --json > gen.jsonl`` is
what ``lacy-fast factscore --generations gen.jsonl`` reads. ``--prompts FILE`` takes the
titles of a JSONL file (a knowledge source, ``articles.jsonl`` of ``lacy-fast synth``) as
prompts, each without a parenthesised part ("Anna Tolk (biologist)" -> "Anna Tolk").

Settings are CascadeConfig keys (``budget=0.3``, ``--explain`` lists them); each flag
``--rule``, ``--budget``... is a shorthand for one (``lacy_fast/overrides.py``).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from lacy_fast.cascade.big import load_big
from lacy_fast.cascade.engine import Cascade, summarize
from lacy_fast.cascade.slm import load_model, resolve_device
from lacy_fast.config import CALL_RULES, CALL_SCORES, CascadeConfig
from lacy_fast.errors import UserError
from lacy_fast.overrides import Shorthand, add_config_arguments, config_or_explain, shorthand_help

# Options generate and eval share, each a shorthand for a CascadeConfig key (under
# ``cascade.`` in eval's EvalConfig).
_CASCADE_FIELDS = ("rule", "score", "threshold", "budget", "max_new_tokens", "temperature", "top_p", "batch_size",
                   "max_word_tokens", "seed")


def cascade_shorthands(prefix: str = "") -> list[Shorthand]:
    return [Shorthand(f"--{name.replace('_', '-')}", f"{prefix}{name}") for name in _CASCADE_FIELDS]


def add_cascade_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """Options of the SLM, the big model and the call rule (shared with `lacy-fast eval`)."""
    d = CascadeConfig()
    parser.add_argument("--slm", help="the SLM: an export directory (OUT/export) or a run's out_dir")
    parser.add_argument("--big", default="none",
                        help="the model called: a lacy-fast export (same tokenizer, next token), a local Hugging Face "
                             "model directory (next word, text-level), oracle:FACTS (the fact table, one word per "
                             "call), oracle-value:FACTS (the whole value per call: an upper bound), or none")
    helps = {
        "rule": f"call rule: {', '.join(CALL_RULES)} (default {d.rule})",
        "score": "what the threshold and budget rules rank: p_call, entropy or max_prob (the SLM's own uncertainty), "
                 "or combined (eval only: rank of p_call x rank of entropy, each ranked on training documents of "
                 f"people never evaluated); auto: p_call for a LaCy-style SLM, entropy for a plain LM (default {d.score})",
        "threshold": f"rule=threshold: call when the score exceeds this (default {d.threshold})",
        "budget": f"rule=budget: target share of steps that call (default {d.budget})",
        "max_new_tokens": f"tokens per generation at most (default {d.max_new_tokens})",
        "temperature": "SLM sampling temperature (0: greedy)",
        "top_p": "nucleus mass when sampling (default 1)",
        "seed": "sampling seed",
        "batch_size": f"prompts decoded together (default {d.batch_size})",
        "max_word_tokens": "Hugging Face big model: its tokens per word at most",
    }
    types = {"rule": str, "score": str, "max_new_tokens": int, "batch_size": int, "max_word_tokens": int, "seed": int}
    for s in cascade_shorthands(prefix):
        name = s.key.removeprefix(prefix)
        choices = {"rule": CALL_RULES, "score": CALL_SCORES}.get(name)
        parser.add_argument(s.flag, type=types.get(name, float), choices=choices,
                            help=shorthand_help(helps[name], s.key))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


SHORTHANDS = cascade_shorthands()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append",
                        help="text to continue (repeat for several, decoded as one batch): for a model trained on "
                             "`lacy-fast synth`'s corpus, a person's name")
    parser.add_argument("--prompts", type=Path, metavar="FILE", help="more prompts: the titles of a JSONL file of "
                        '{"title", ...} rows (a knowledge source, or articles.jsonl of `lacy-fast synth`)')
    parser.add_argument("--limit", type=int, help="with --prompts: its first this many titles")
    add_cascade_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON row per generation (JSONL: title, "
                        "generation, ...), the input `lacy-fast factscore --generations` reads")
    add_config_arguments(parser, CascadeConfig)


def run(args: argparse.Namespace) -> int:
    if (cfg := config_or_explain(CascadeConfig, args, SHORTHANDS, "generate")) is None:  # --explain
        return 0
    if not args.slm:
        raise UserError("no SLM given; pass --slm OUT/export (or a run's out_dir)")
    titles = _titles(args)
    prompts = [re.sub(r"\s*\([^)]*\)", "", t).strip() or t for t in titles]
    device = resolve_device(args.device)
    slm = load_model(args.slm, device)
    big = load_big(args.big, device, cfg.max_word_tokens)
    cascade = Cascade(slm, big, cfg, device)
    generations = cascade.generate(prompts)
    head: dict[str, Any] = {"slm": slm.name, "big": big.name if big is not None else "none",
                            "rule": cfg.rule if big is not None else "never", "score": cascade.score}
    if args.json:
        for title, g in zip(titles, generations):
            print(json.dumps({"title": title, "generation": g.prompt + g.text, **g.to_dict(), **head}))
        return 0
    print(f"SLM {head['slm']} | big {head['big']} | rule {head['rule']} ({head['score']}) | "
          "[[...]]: text from the big model")
    for g in generations:
        print()
        print(g.marked())
        print(f"  steps {g.steps} | calls {g.calls} ({100 * g.call_rate:.1f}%), answered {g.answered} | "
              f"big-model tokens {sum(g.from_big)}/{len(g.tokens)} | finish {g.finish}")
    summary = summarize(generations)
    print(f"\n{summary['generations']} generations | call rate {summary['call_rate']:.1%} | big-model tokens "
          f"{summary['big_token_share']:.1%} | {summary['tokens_per_generation']:.1f} tokens per generation")
    return 0


def _titles(args: argparse.Namespace) -> list[str]:
    """The prompts' titles: the --prompt texts, then the titles of --prompts (its first --limit)."""
    titles = list(args.prompt or [])
    if any(not p.strip() for p in titles):
        raise UserError("--prompt is empty; give the text to continue, e.g. a person's name")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit is {args.limit}; it must be at least 1")
    if args.prompts is not None:
        hint = 'JSONL with a "title" per row (articles.jsonl of `lacy-fast synth`, or a knowledge source)'
        rows = _title_rows(args.prompts, hint)
        titles += rows[: args.limit] if args.limit is not None else rows
    if not titles:
        raise UserError("no prompt given; pass --prompt TEXT (e.g. a person's name) or --prompts FILE")
    return titles


def _title_rows(path: Path, hint: str) -> list[str]:
    if not path.is_file():
        raise UserError(f"--prompts {path} does not exist; pass {hint}")
    titles = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                title = json.loads(line)["title"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{n} has no title; pass {hint}")
            if not isinstance(title, str) or not title.strip():
                raise UserError(f"{path}:{n} needs a non-empty string title; pass {hint}")
            titles.append(title)
    if not titles:
        raise UserError(f"--prompts {path} is empty; pass {hint}")
    return titles
