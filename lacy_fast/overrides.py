"""One argument rule for every command: settings are config keys, flags are shorthands.

Every command that has settings reads them into a config dataclass. Its settings are
given as ``key=value`` (``train.lr=3e-4``, ``tokenizer.vocab_size=800``, ``cascade.budget=0.3``),
``--explain`` lists every key with its default and meaning, and a settings flag is a
shorthand for exactly one key (``--vocab-size 800`` is ``tokenizer.vocab_size=800``; its
help names the key). Flags that name things rather than settings (input files, prompts,
``--out`` of a command without a config section for it, ``--quiet``) are plain flags.

A flag and an override that set the same key to different values are refused in one
sentence, never resolved silently. The layers, each replacing the keys it names: the
dataclass defaults, a run file (``--config``), the ``key=value`` overrides, the shorthand
flags.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, TypeVar

from lacy_fast.config import _resolve_source, _set_dotted, explain, from_dict, parse_override, read_toml
from lacy_fast.errors import ConfigError, UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Shorthand:
    """A flag that sets one config key: ``Shorthand("--vocab-size", "tokenizer.vocab_size")``."""

    flag: str
    key: str

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """The positional ``key=value`` overrides and ``--explain`` of a command whose settings are ``cls``."""
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config keys of this command, e.g. " + _example(cls) + " (--explain lists them)")
    parser.add_argument("--explain", action="store_true", help="list every config key of this command with its "
                        "default and meaning, and exit")


def shorthand_help(text: str, key: str) -> str:
    """A flag's help that names the key it sets."""
    return f"{text} (shorthand for {key}=...)"


def build_config(cls: type[T], args: argparse.Namespace, shorthands: list[Shorthand], source: str | None = None,
                 command: str = "") -> T:
    """``cls`` from the defaults, ``source`` (a run file), ``args.overrides`` and the shorthand
    flags that were given (a flag whose value is None was not given)."""
    data: dict[str, Any] = read_toml(_resolve_source(source)) if source else {}
    given: dict[str, tuple[Any, str]] = {}
    for item in getattr(args, "overrides", None) or ():
        key, value = parse_override(item)
        _set_dotted(data, key, value, cls)
        given[key] = (value, item)
    flags = {}
    for s in shorthands:
        value = getattr(args, s.dest, None)
        if value is None:
            continue
        if isinstance(value, list):
            value = tuple(value)
        if s.key in given and not _same(given[s.key][0], value):
            raise UserError(f"{s.flag} {_show(value)} and {given[s.key][1]} set {s.key} to different values; "
                            "give one of them")
        _set_dotted(data, s.key, value, cls)
        flags[s.key] = s.flag
    try:
        return from_dict(cls, data)
    except ConfigError as err:  # a bad value given by a flag: name the flag the user typed
        if err.key in flags and err.key not in given:
            raise UserError(f"{flags[err.key]} {err.detail}") from None
        raise


def config_or_explain(cls: type[T], args: argparse.Namespace, shorthands: list[Shorthand], command: str) -> T | None:
    """A command's ``build_config``, or None once ``--explain``'s table is printed when the
    command was asked for it."""
    if args.explain:
        print_explain(cls, command, shorthands)
        return None
    return build_config(cls, args, shorthands, command=command)


def print_explain(cls: type, command: str, shorthands: list[Shorthand]) -> None:
    flags = {s.key: s.flag for s in shorthands}
    print(f"Config keys of `lacy-fast {command}` (set as key=value; a flag is a shorthand for the key beside it):")
    for key, default, text in explain(cls):
        flag = f" [{flags[key]}]" if key in flags else ""
        print(f"{key + flag:<34} {default:<14} {text}")


def split_overrides(values: list[str] | None) -> tuple[list[str], list[str]]:
    """(values, overrides): ``key=value`` items that argparse gave a flag taking several
    values (``--input a.txt workers=2``) back to the overrides. A value with '=' that names
    an existing path stays a value."""
    from pathlib import Path

    values = list(values or [])
    taken = [v for v in values if "=" in v and not Path(v).exists()]
    return [v for v in values if v not in taken], taken


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list):
        a = tuple(a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b or str(a) == str(b)


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _example(cls: type) -> str:
    rows = explain(cls)
    return rows[0][0] + "=..." if rows else "key=value"
