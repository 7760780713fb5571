"""`lacy-fast train`: its options, ``--explain``, and the run.

    lacy-fast train --config tiny data.path=DIR [key=value ...]
    torchrun --nproc_per_node 8 -m lacy_fast.cli train --config lacy-334m data.path=DIR
    deepspeed --num_gpus 8 --module lacy_fast.cli train --config lacy-334m data.path=DIR
"""
from __future__ import annotations

import argparse

from lacy_fast.config import RunConfig, explain, load_config
from lacy_fast.errors import UserError
from lacy_fast.train.settings import resolve_call_rate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="a run file: a built-in one (tiny, gpt2-124m, lacy-334m, "
                        "lacy-1.3b) or a TOML file; model sizes are model.shape=NAME, not run files")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4")
    parser.add_argument("--explain", action="store_true", help="list every config key with its default and meaning "
                        "(with a config and data.path: also what objective.call_rate resolves to)")
    parser.add_argument("--quiet", action="store_true", help="no progress or start-up lines (the banner stays)")
    parser.add_argument("--fresh", action="store_true", help="start over: delete the checkpoints, export and metrics "
                        "an earlier run left in out_dir (without it, a rerun resumes)")


def run(args: argparse.Namespace) -> int:
    if args.explain:
        _explain(args)
        return 0
    from lacy_fast.fileio import disk_full_is_user_error
    from lacy_fast.train.loop import train

    cfg = load_config(RunConfig, args.config, args.overrides)
    with disk_full_is_user_error(cfg.out_dir):
        train(cfg, progress=not args.quiet, fresh=args.fresh, banner=True)
    return 0


def _explain(args: argparse.Namespace) -> None:
    from lacy_fast.train.identity import MAY_CHANGE

    print("Every key, its default and meaning (the method: docs/method.md):")
    for key, default, text in explain(RunConfig):
        print(f"{key:<28} {default:<14} {text}")
    print("\nA resumed run must keep every setting above except these, which may change:")
    for key, why in MAY_CHANGE.items():
        print(f"{key:<28} {why}")
    cfg = load_config(RunConfig, args.config, args.overrides)
    if cfg.data.path or cfg.data.source == "online":
        try:
            rate, how = resolve_call_rate(cfg)
        except UserError as err:
            rate, how = None, str(err)
        print(f"\nobjective.call_rate for this config: {'unresolved' if rate is None else f'{rate:.4f}'} ({how})")
