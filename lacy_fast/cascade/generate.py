"""`lacy-fast generate`: cascade generation from the command line.

    lacy-fast generate --slm runs/lacy --big oracle:synth/facts.jsonl --prompt "Thynoxine Nahoxski"
    lacy-fast generate --slm runs/lacy --big runs/big --prompt A --prompt B --rule argmax --json

prints each prompt with its continuation, the big model's text between [[ and ]], and a
line of counts per generation; ``--json`` prints one JSON object instead:
``{"slm", "big", "rule", "summary": {...}, "generations": [{"prompt", "text", "marked",
"called_spans", "tokens", "big_tokens", "steps", "calls", "answered", "call_rate",
"finish"}, ...]}``.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from lacy_fast.cascade.big import load_big
from lacy_fast.cascade.engine import Cascade, summarize
from lacy_fast.cascade.slm import load_model, resolve_device
from lacy_fast.config import CALL_RULES, CALL_SCORES, CascadeConfig
from lacy_fast.errors import ConfigError, UserError

# option -> CascadeConfig field, for the options generate and eval share.
_CASCADE_OPTIONS = {"rule": "rule", "score": "score", "threshold": "threshold", "budget": "budget", "max_new_tokens": "max_new_tokens",
                    "temperature": "temperature", "top_p": "top_p", "batch_size": "batch_size",
                    "max_word_tokens": "max_word_tokens", "seed": "seed"}


def add_cascade_arguments(parser: argparse.ArgumentParser, defaults: CascadeConfig | None = None) -> None:
    """Options of the SLM, the big model and the call rule (shared with `lacy-fast eval`)."""
    d = defaults or CascadeConfig()
    parser.add_argument("--slm", required=True, help="the SLM: an export directory (OUT/export) or a run's out_dir")
    parser.add_argument("--big", default="none",
                        help="the model called: a lacy-fast export (same tokenizer, next token), a local Hugging Face "
                             "model directory (next word, text-level), oracle:FACTS (the fact table, one word per "
                             "call), oracle-value:FACTS (the whole value per call: an upper bound), or none")
    parser.add_argument("--rule", choices=CALL_RULES, default=d.rule, help=f"call rule (default {d.rule})")
    parser.add_argument("--score", choices=CALL_SCORES, default=d.score,
                        help="what the threshold and budget rules rank: p_call, entropy or max_prob (the SLM's own "
                             "uncertainty), or combined (eval only: rank of p_call x rank of entropy, each ranked on "
                             "training documents of people never evaluated); auto: p_call for a LaCy-style SLM, "
                             f"entropy for a plain LM (default {d.score})")
    parser.add_argument("--threshold", type=float, default=d.threshold,
                        help=f"rule=threshold: call when the score exceeds this (default {d.threshold})")
    parser.add_argument("--budget", type=float, default=d.budget,
                        help=f"rule=budget: target share of steps that call (default {d.budget})")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                        help=f"tokens per generation at most (default {d.max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=d.temperature, help="SLM sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=float, default=d.top_p, help="nucleus mass when sampling (default 1)")
    parser.add_argument("--seed", type=int, default=d.seed, help="sampling seed")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help=f"prompts decoded together (default {d.batch_size})")
    parser.add_argument("--max-word-tokens", type=int, default=d.max_word_tokens,
                        help="Hugging Face big model: its tokens per word at most")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def cascade_config(args: argparse.Namespace) -> CascadeConfig:
    try:
        return CascadeConfig(**{field: getattr(args, opt) for opt, field in _CASCADE_OPTIONS.items()})
    except ConfigError as err:
        raise UserError(f"--{err.key.replace('_', '-')} {err.detail}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append", required=True,
                        help="text to continue (repeat for several, decoded as one batch)")
    add_cascade_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    cfg = cascade_config(args)
    if any(not p.strip() for p in args.prompt):
        raise UserError("--prompt is empty; give the text to continue, e.g. a person's name")
    device = resolve_device(args.device)
    slm = load_model(args.slm, device)
    big = load_big(args.big, device, cfg.max_word_tokens)
    cascade = Cascade(slm, big, cfg, device)
    generations = cascade.generate(args.prompt)
    result: dict[str, Any] = {
        "slm": slm.name, "big": big.name if big is not None else "none",
        "rule": cfg.rule if big is not None else "never", "score": cascade.score,
        "summary": summarize(generations), "generations": [g.to_dict() for g in generations],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"SLM {result['slm']} | big {result['big']} | rule {result['rule']} ({result['score']}) | "
          "[[...]]: text from the big model")
    for g in generations:
        print()
        print(g.marked())
        print(f"  steps {g.steps} | calls {g.calls} ({100 * g.call_rate:.1f}%), answered {g.answered} | "
              f"big-model tokens {sum(g.from_big)}/{len(g.tokens)} | finish {g.finish}")
    return 0
