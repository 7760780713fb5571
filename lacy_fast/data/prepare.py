"""``lacy-fast prepare``: raw text -> tokenizer -> fact labels -> memory-mapped shards.

    lacy-fast prepare --input corpus/*.jsonl.gz --out data/wiki --vocab-size 32000 --workers 8
    lacy-fast prepare --input more.txt --out data/x --tokenizer data/wiki/tokenizer.model label.subwords=first
    lacy-fast prepare --show data/wiki --docs 5      # decoded documents, fact tokens as [[...]]
    lacy-fast prepare --input synth/corpus.jsonl --out data/s --judge oracle:synth/facts.jsonl

Locks OUT, checks the settings against ``OUT/prepare.json``, trains (or copies) the
tokenizer, then tokenizes and labels shards in worker processes, runs the judge step and
writes ``OUT/stats.json`` last. A rerun keeps every complete shard; other settings are
refused. docs/data.md gives the order of the steps and what a dead worker or a killed run
leaves.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any, Iterator

from lacy_fast.config import PrepareConfig
from lacy_fast.data import shards as shard_io
from lacy_fast.data.workers import ShardPool, die_with_parent, exit_if_orphaned
from lacy_fast.data.readers import SkipReport, read_documents, resolve_inputs
from lacy_fast.errors import UserError
from lacy_fast.fileio import disk_full_is_user_error, write_bytes, write_json
from lacy_fast.lock import DirLock
from lacy_fast.overrides import (
    Shorthand, add_config_arguments, build_config, print_explain, shorthand_help, split_overrides,
)
from lacy_fast.progress import Progress

SETTINGS_FILE = "prepare.json"
TRAIN_DOC_CHARS = 4000  # characters of each sampled document the tokenizer trains on


SHORTHANDS = [Shorthand("--input", "inputs"), Shorthand("--out", "out"),
              Shorthand("--vocab-size", "tokenizer.vocab_size"), Shorthand("--tokenizer", "tokenizer.path"),
              Shorthand("--workers", "workers"), Shorthand("--judge", "judge.spec")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", metavar="PATH", help=shorthand_help(
        "text files, directories or globs (.txt, .jsonl, .parquet, optionally .gz)", "inputs"))
    parser.add_argument("--out", help=shorthand_help("output directory (shards, tokenizer.model, stats.json)", "out"))
    parser.add_argument("--vocab-size", type=int, help=shorthand_help(
        "vocabulary of the trained tokenizer, <CALL> included (default 32000)", "tokenizer.vocab_size"))
    parser.add_argument("--tokenizer", metavar="FILE", help=shorthand_help(
        "use this SentencePiece .model (with a <CALL> control symbol) instead of training one", "tokenizer.path"))
    parser.add_argument("--workers", type=int, help=shorthand_help(
        "worker processes, each tokenizing and labeling (default 1)", "workers"))
    parser.add_argument("--config", metavar="FILE", help="a TOML run file of PrepareConfig keys")
    parser.add_argument("--judge", metavar="SPEC", help=shorthand_help(
        "who sets flag bit 1 (strategy judge): none (default), oracle:FACTS.jsonl or hf:DIR; rerun with another "
        "to relabel bit 1 alone", "judge.spec"))
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.add_argument("--show", metavar="DIR", help="print documents of a prepare output with fact tokens marked "
                        "[[...]], judge tokens {{...}}, and exit")
    parser.add_argument("--docs", type=int, default=3, help="documents --show prints (default 3)")
    add_config_arguments(parser, PrepareConfig)


def run(args: argparse.Namespace) -> int:
    if args.explain:
        print_explain(PrepareConfig, "prepare", SHORTHANDS)
        return 0
    if args.show:
        shard_io.show(args.show, args.docs)
        return 0
    cfg = config_from_args(args)
    with disk_full_is_user_error(cfg.out):
        stats = prepare(cfg, progress=not args.quiet)
    print(f"prepared {stats['documents']} documents, {stats['tokens']} tokens ({stats['fact_fraction']:.1%} facts) "
          f"in {stats['shards']} shards at {cfg.out} in {stats['seconds']:.1f} s")
    if stats["judge"] != "none":
        print(f"judge {stats['judge']}: {stats['judge_tokens']} tokens ({stats['judge_fraction']:.1%}) flagged, "
              f"{stats['judge_tokens_per_core_s'] or 0:,.0f} tokens/s per core (spaCy: "
              f"{stats['spacy_tokens_per_core_s'] or 0:,.0f})")
    skipped = {k: v for k, v in stats["skipped"].items() if v}
    if skipped:
        print("skipped documents: " + ", ".join(f"{k} {v}" for k, v in skipped.items())
              + (f" (listed in {cfg.reader.error_log})" if cfg.reader.error_log else ""))
    return 0


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    # `--input a.txt shard_docs=10`: argparse hands the override to --input; take it back.
    inputs, taken = split_overrides(args.input)
    args.input = inputs or None
    args.overrides = taken + list(args.overrides or [])
    try:
        cfg = build_config(PrepareConfig, args, SHORTHANDS, args.config, "prepare")
    except UserError as err:
        if str(err).startswith("--judge ") and " is " in str(err):
            raise UserError(f"--judge {args.judge} is not a judge; pass none, oracle:FACTS.jsonl or hf:DIR") from None
        raise
    if not cfg.inputs:
        raise UserError("no input given; pass --input PATH [PATH ...] (files, directories or globs)")
    if not cfg.out:
        raise UserError("no output directory given; pass --out DIR")
    return cfg


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------


def prepare(cfg: PrepareConfig, progress: bool = True) -> dict[str, Any]:
    """Run ``prepare`` with ``cfg``; returns what it writes to ``stats.json``."""
    start = time.perf_counter()
    files = resolve_inputs(cfg.inputs)
    if cfg.judge.spec != "none":  # a judge that cannot run is refused before any labeling
        from lacy_fast.data.judge import describe

        describe(cfg.judge, cfg.label.subwords)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory")
    with DirLock(out, "prepare run"):  # creates out; nothing reads or writes it before the lock is held
        return _prepare_locked(cfg, files, out, start, progress)


def _prepare_locked(cfg: PrepareConfig, files: list[Path], out: Path, start: float, progress: bool) -> dict[str, Any]:
    settings = _settings(cfg, files)
    committed = _check_settings(out, settings)
    tok, n_docs = _tokenizer(cfg, out, committed, progress)
    if not committed:  # the tokenizer exists: the settings are those of this folder from now on
        write_json(out / SETTINGS_FILE, settings)
    tok_path = out / "tokenizer.model"

    skips = SkipReport(cfg.reader.error_log)
    bar = Progress("prepare", total=n_docs, unit="docs", enabled=progress)
    done_stats: dict[int, dict[str, Any]] = {}
    resumed = 0
    tokens_this_run = 0
    try:
        with ShardPool(cfg.workers, _init_worker, (cfg.label, str(tok_path)), bar, doing="labeling",
                       kept="finished") as pool:
            for index, texts in _chunks(read_documents(cfg.inputs, cfg.reader, skips), cfg.shard_docs):
                previous = _finished(out, index, len(texts), tok.sha256)
                if previous is not None:
                    done_stats[index] = previous
                    resumed += 1
                    bar.update(len(texts))
                    continue
                pool.submit(index, _label_shard, index, texts, str(out), tok.sha256, tok.vocab_size)
                del texts
                while len(pool.pending) > cfg.workers:  # bounded: at most workers + 1 shards in memory
                    tokens_this_run += _collect(pool, done_stats)
            while pool.pending:
                tokens_this_run += _collect(pool, done_stats)
    finally:
        skips.close()
    bar.close()
    _remove_stale(out, len(done_stats))
    from lacy_fast.data.relabel import run_judge

    judged = run_judge(cfg, out, tok, progress=progress)

    seconds = time.perf_counter() - start
    from lacy_fast.data.labeling import LabelStats

    total = LabelStats()
    for index in sorted(done_stats):
        total.merge(done_stats[index])
    # spaCy's labeling cost, from the shards that recorded it (labeled by this version).
    timed = [s for s in done_stats.values() if "label_cpu_seconds" in s]
    spacy_cpu = sum(s["label_cpu_seconds"] for s in timed)
    spacy_tokens = sum(s["tokens"] for s in timed)
    stats = {
        **{k: v for k, v in total.to_dict().items() if not k.startswith("fact_tokens_by")},
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens_this_run / seconds, 1) if seconds > 0 else 0.0,
        "tokens_this_run": tokens_this_run,
        "workers": cfg.workers,
        "shards": len(done_stats),
        "resumed_shards": resumed,
        "skipped": dict(skips.counts),
        "skipped_total": skips.total,
        "spacy_seconds": round(sum(s["label_seconds"] for s in timed), 3),
        "spacy_cpu_seconds": round(spacy_cpu, 3),
        "spacy_tokens_per_core_s": round(spacy_tokens / spacy_cpu, 1) if spacy_cpu > 0 else None,
        "spacy_core_hours_per_billion_tokens": (round(spacy_cpu / 3600 / spacy_tokens * 1e9, 2) if spacy_tokens
                                                else None),
        **judged,
        "fact_tokens_by_pos": total.to_dict()["fact_tokens_by_pos"],
        "fact_tokens_by_entity": total.to_dict()["fact_tokens_by_entity"],
        "tokenizer": {"sha256": tok.sha256, "vocab_size": tok.vocab_size, "call_id": tok.call_id,
                      "eos_id": tok.eos_id, "trained": not cfg.tokenizer.path},
        "label": dataclasses.asdict(cfg.label),
    }
    write_json(out / "stats.json", stats)
    return stats


def _settings(cfg: PrepareConfig, files: list[Path]) -> dict[str, Any]:
    """What determines the shards' content (not workers, batch size, log path)."""
    from lacy_fast.data.tokenizer import Tokenizer

    label = {k: v for k, v in cfg.label.to_dict().items() if k != "batch_size"}
    tokenizer = cfg.tokenizer.to_dict()
    if cfg.tokenizer.path:  # a given tokenizer is known by its bytes, not its path
        tokenizer = {"sha256": Tokenizer.load(cfg.tokenizer.path).sha256}
    return {
        "format_version": shard_io.VERSION,
        "inputs": [[str(p.resolve()), p.stat().st_size] for p in files],
        "reader": {k: v for k, v in cfg.reader.to_dict().items() if k != "error_log"},
        "tokenizer": tokenizer,
        "label": label,
        "shard_docs": cfg.shard_docs,
    }


def _tokenizer(cfg: PrepareConfig, out: Path, committed: bool, progress: bool):
    """(the tokenizer at OUT/tokenizer.model, the document count): the given one copied there,
    the one a run of these settings trained (``committed``), or one trained now."""
    from lacy_fast.data.tokenizer import Tokenizer

    tok_path = out / "tokenizer.model"
    if cfg.tokenizer.path:
        given = Tokenizer.load(cfg.tokenizer.path)
        if not tok_path.exists() or shard_io.file_sha256(tok_path) != given.sha256:
            write_bytes(tok_path, given.path.read_bytes())
        return Tokenizer.load(tok_path), _count(cfg)
    if committed and tok_path.exists():  # resuming: the settings match, so this is the one trained for them
        return Tokenizer.load(tok_path), _count(cfg)
    sample, n_docs = _sample(cfg)
    if progress:
        print(f"training a {cfg.tokenizer.model_type} tokenizer of {cfg.tokenizer.vocab_size} pieces on "
              f"{len(sample)} documents", flush=True)
    return Tokenizer.train(sample, cfg.tokenizer, tok_path), n_docs


def _check_settings(out: Path, settings: dict[str, Any]) -> bool:
    """Whether ``out`` holds these settings already (False: none yet); other settings are refused."""
    path = out / SETTINGS_FILE
    if path.exists() and not (out / "tokenizer.model").exists() and not shard_io.shard_paths(out):
        return False  # nothing was made under those settings (a tokenizer that failed to train): not binding
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = None
        if old != settings:
            what = next((k for k in settings if old is None or old.get(k) != settings[k]), "format")
            raise UserError(f"{out} was prepared with other settings ({what} differs); use another --out, or delete "
                            f"{out} to start over")
        return True
    return False


def _count(cfg: PrepareConfig) -> int:
    """Documents the reader yields (a cheap pass, for the progress bar's ETA)."""
    return sum(1 for _ in read_documents(cfg.inputs, cfg.reader, SkipReport()))


def _sample(cfg: PrepareConfig) -> tuple[list[str], int]:
    """A seeded uniform sample of ``train_docs`` documents (reservoir sampling) and the count."""
    rng = random.Random(cfg.tokenizer.seed)
    k = cfg.tokenizer.train_docs
    sample: list[str] = []
    n = 0
    for doc in read_documents(cfg.inputs, cfg.reader, SkipReport()):
        text = doc.text[:TRAIN_DOC_CHARS]
        if n < k:
            sample.append(text)
        else:
            j = rng.randrange(n + 1)
            if j < k:
                sample[j] = text
        n += 1
    if not sample:
        raise UserError(f"the inputs hold no usable document ({', '.join(cfg.inputs)}); check them, or pass "
                        "reader.error_log=FILE to see why each one was skipped")
    return sample, n


def _chunks(docs: Iterator, size: int) -> Iterator[tuple[int, list[str]]]:
    chunk: list[str] = []
    index = 0
    for doc in docs:
        chunk.append(doc.text)
        if len(chunk) == size:
            yield index, chunk
            index, chunk = index + 1, []
    if chunk:
        yield index, chunk


def _finished(out: Path, index: int, n_docs: int, sha256: str) -> dict[str, Any] | None:
    """The stats of shard ``index`` if it is complete and belongs to this run, else None."""
    path = out / shard_io.shard_name(index)
    stats_path = path.with_suffix(".stats.json")
    if not (path.exists() and stats_path.exists()):
        return None
    try:
        header = shard_io.read_header(path)
        stats = json.loads(stats_path.read_text())
    except (UserError, json.JSONDecodeError):
        return None
    if header.tokenizer_sha256 != sha256 or header.n_docs != n_docs or stats.get("documents") != n_docs:
        return None
    return stats


def _collect(pool: ShardPool, done_stats: dict[int, dict[str, Any]]) -> int:
    """Wait (showing progress) until a shard finishes; record it; return its token count."""
    finished = pool.wait()  # re-raises a worker's exception here
    done_stats.update(finished)
    return sum(stats["tokens"] for _, stats in finished)


def _remove_stale(out: Path, n_shards: int) -> None:
    """Shards numbered past this run's last one (left by an interrupted run of other sizes)."""
    for path in shard_io.shard_paths(out):
        if int(shard_io.SHARD_RE.match(path.name).group(1)) >= n_shards:
            path.unlink()
            path.with_suffix(".stats.json").unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------
# Worker processes
# ----------------------------------------------------------------------------------------

_labeler = None
_events = None
def _init_worker(label_cfg, tokenizer_path: str, events: Any, parent: int) -> None:
    global _labeler, _events
    die_with_parent(parent)
    from lacy_fast.data.labeling import single_threaded

    single_threaded()  # before spaCy brings in numpy's thread pools
    from lacy_fast.data.labeling import FactLabeler
    from lacy_fast.data.tokenizer import Tokenizer

    _labeler = FactLabeler(label_cfg, Tokenizer.load(tokenizer_path))
    _events = events


def _label_shard(index: int, texts: list[str], out: str, sha256: str, vocab_size: int) -> dict[str, Any]:
    """Tokenize + label one shard's documents and write it; returns its stats."""
    from lacy_fast.data.labeling import LabelStats

    stats = LabelStats()
    docs = []
    step = _labeler.cfg.batch_size
    cpu = wall = 0.0
    for lo in range(0, len(texts), step):
        exit_if_orphaned()
        before = stats.tokens
        c0, w0 = time.process_time(), time.perf_counter()
        docs += _labeler.label_batch(texts[lo:lo + step], stats)
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        _events.put((min(step, len(texts) - lo), stats.tokens - before))
    path = Path(out) / shard_io.shard_name(index)
    result = {**stats.to_dict(), "label_cpu_seconds": cpu, "label_seconds": wall}
    exit_if_orphaned()
    # Stats first, shard last: the shard's existence is what marks it done.
    write_json(path.with_suffix(".stats.json"), result)
    shard_io.write_shard(path, docs, sha256, vocab_size)
    return result
