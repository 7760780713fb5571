"""The `lacy-fast` command.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``. Only the module of the command being run is imported, so
``lacy-fast --help`` and light commands never pay for torch, spaCy or DeepSpeed.

A ``UserError`` anywhere below becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from lacy_fast import __version__
from lacy_fast.errors import UserError

# name -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("lacy_fast.data.synth", "write the built-in synthetic biography corpus and its fact table"),
    "prepare": ("lacy_fast.data.prepare", "tokenize, label facts and write memory-mapped shards"),
    "train": ("lacy_fast.train.cli", "train a model with the LaCy objective (DeepSpeed)"),
    "generate": ("lacy_fast.cascade.generate", "cascade generation: the SLM calls a bigger model"),
    "eval": ("lacy_fast.eval.run", "FactScore, fact leakage, call precision/recall and perplexity"),
    "factscore": ("lacy_fast.eval.factscore_cli", "FactScore of generations against a knowledge source"),
    "plot": ("lacy_fast.eval.plots", "draw loss and call-rate curves of a training run to PNG"),
    "demo": ("lacy_fast.demo", "the whole pipeline on the built-in corpus, ending in a comparison table"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one sentence (and exit code 2, as argparse does)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items())
    parser = _Parser(
        prog="lacy-fast",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain small language models that learn when to <CALL> a bigger model.",
        epilog=f"commands:\n{lines}\n\nRun 'lacy-fast COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("command", nargs="?", help="one of the commands below")
    return parser


def _take_local_rank(argv: list[str]) -> list[str]:
    """Drop the ``--local_rank=N`` the deepspeed launcher puts before the command (it also sets
    LOCAL_RANK in the environment, which is what the training loop reads)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not eq and i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            out.append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _take_local_rank(list(sys.argv[1:] if argv is None else argv))
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"lacy-fast {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        top.error(f"unknown command '{name}'; choose one of {', '.join(COMMANDS)}")
    module_name, summary = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = _Parser(prog=f"lacy-fast {name}", description=summary)
    module.add_arguments(parser)
    args = parser.parse_intermixed_args(rest)  # `key=value` overrides may follow options
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"lacy-fast {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lacy-fast {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lacy-fast ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
