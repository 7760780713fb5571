"""The relabeling step of ``lacy-fast prepare``: every shard's bit 1 (``FLAG_JUDGE``) brought in
line with the judge (``judge.py`` holds the judges).

It runs after the spaCy labels: it reads each finished shard, decodes its documents (the
tokenizer is lossless, so this is the original text), clears bit 1, sets it from the judge
and rewrites the shard atomically, then writes ``shard_NNNNN.judge.json`` (the judge's
identity, a checksum of the flags it wrote, its counts and cost). A shard whose marker
names the same judge and whose flags still match the checksum is done, so the step resumes
per shard; a rerun with another judge (or ``none``, which clears bit 1) relabels bit 1 only,
without redoing spaCy, so the judge is not part of ``prepare.json``. While any shard is being
relabeled ``stats.json`` is removed: a directory whose shards mix two judges is not
complete, and training refuses it.
"""
from __future__ import annotations

import hashlib
import json
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from lacy_fast.config import JudgeConfig, PrepareConfig
from lacy_fast.data import shards as shard_io
from lacy_fast.data.judge import describe, judge_documents, load_judge, parse_spec
from lacy_fast.method import FLAG_JUDGE
from lacy_fast.data.tokenizer import Tokenizer
from lacy_fast.data.workers import ShardPool, die_with_parent, exit_if_orphaned
from lacy_fast.errors import UserError
from lacy_fast.fileio import write_json
from lacy_fast.progress import Progress

MARKER = ".judge.json"  # shard_NNNNN.judge.json beside shard_NNNNN.bin


def marker_path(shard_path: Path) -> Path:
    return shard_path.with_suffix(MARKER)


def judge_id(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _flags_crc(flags: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(flags).view(np.uint8).data)


def _done(path: Path, jid: str, sha256: str) -> dict[str, Any] | None:
    """The marker of shard ``path`` if it is judged by ``jid`` and its flags are still the judged ones."""
    try:
        marker = json.loads(marker_path(path).read_text())
        shard = shard_io.Shard(path, sha256)
    except (OSError, json.JSONDecodeError, UserError):
        return None
    if marker.get("judge_id") != jid or marker.get("tokens") != shard.n_tokens:
        return None
    return marker if marker.get("flags_crc32") == _flags_crc(shard.flags) else None


def run_judge(cfg: PrepareConfig, out: Path, tok: Tokenizer, progress: bool = True) -> dict[str, Any]:
    """Bring bit 1 of every shard in ``out`` in line with ``cfg.judge``; returns the stats.json entries."""
    start = time.perf_counter()
    paths = shard_io.shard_paths(out)
    for stale in out.glob(f"shard_*{MARKER}"):  # markers of shards that are gone
        if not stale.with_name(stale.name[: -len(MARKER)] + ".bin").exists():
            stale.unlink()
    if cfg.judge.spec == "none":
        return _clear(out, paths, tok)
    identity = describe(cfg.judge, cfg.label.subwords)
    jid = judge_id(identity)
    markers: dict[int, dict[str, Any]] = {}
    todo = []
    for i, path in enumerate(paths):
        marker = _done(path, jid, tok.sha256)
        if marker is None:
            todo.append(i)
        else:
            markers[i] = marker
    if todo:
        (out / "stats.json").unlink(missing_ok=True)  # incomplete until every shard has this judge's bit 1
        markers.update(_judge_shards(cfg, jid, [paths[i] for i in todo], todo, tok, progress))
    total_tokens = sum(m["tokens"] for m in markers.values())
    judged = sum(m["judge_tokens"] for m in markers.values())
    cpu = sum(m["cpu_seconds"] for m in markers.values())
    return {
        "judge": cfg.judge.spec,
        "judge_identity": identity,
        "judge_tokens": judged,
        "judge_fraction": judged / total_tokens if total_tokens else 0.0,
        "judge_seconds": round(sum(m["seconds"] for m in markers.values()), 3),
        "judge_cpu_seconds": round(cpu, 3),
        "judge_tokens_per_core_s": round(total_tokens / cpu, 1) if cpu > 0 else None,
        "judge_core_hours_per_billion_tokens": round(cpu / 3600 / total_tokens * 1e9, 2) if total_tokens else None,
        "judge_questions": sum(m["questions"] for m in markers.values()),
        "judge_forward_tokens": sum(m["forward_tokens"] for m in markers.values()),
        "judge_shards_this_run": len(todo),
        "judge_step_seconds": round(time.perf_counter() - start, 3),
    }


def _clear(out: Path, paths: list[Path], tok: Tokenizer) -> dict[str, Any]:
    """``judge.spec=none``: no shard keeps bit 1."""
    cleared = 0
    for path in paths:
        marker_path(path).unlink(missing_ok=True)
        shard = shard_io.Shard(path, tok.sha256)
        if shard.n_tokens and np.any(shard.flags & FLAG_JUDGE):
            (out / "stats.json").unlink(missing_ok=True)
            del shard
            tokens, flags, offsets, vocab_size = _read_cleared(path, tok.sha256)
            _rewrite(path, tokens, flags, offsets, tok.sha256, vocab_size)
            cleared += 1
    return {"judge": "none", "judge_tokens": 0, "judge_fraction": 0.0, "judge_cleared_shards": cleared}


def _read_cleared(path: Path, sha256: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A shard's tokens, flags with bit 1 cleared, document offsets and vocabulary size, in memory."""
    shard = shard_io.Shard(path, sha256)
    tokens, flags, offsets = np.array(shard.tokens), np.array(shard.flags), np.array(shard.doc_offsets)
    vocab_size = shard.header.vocab_size
    del shard  # the map is closed before the shard is rewritten
    return tokens, flags & np.uint8(0xFF ^ FLAG_JUDGE), offsets, vocab_size


def _rewrite(path: Path, tokens: np.ndarray, flags: np.ndarray, offsets: np.ndarray, sha256: str,
             vocab_size: int) -> None:
    docs = [(tokens[a:b], flags[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    shard_io.write_shard(path, docs, sha256, vocab_size)


def _judge_shards(cfg: PrepareConfig, jid: str, paths: list[Path], indices: list[int], tok: Tokenizer,
                  progress: bool) -> dict[int, dict[str, Any]]:
    n_docs = sum(shard_io.read_header(p).n_docs for p in paths)
    bar = Progress(f"judge {parse_spec(cfg.judge.spec)[0]}", total=n_docs, unit="docs", enabled=progress)
    done: dict[int, dict[str, Any]] = {}
    with ShardPool(min(cfg.workers, len(paths)), _init_worker, (cfg.judge, cfg.label.subwords, str(tok.path)), bar,
                   doing="judging", kept="judged") as pool:
        for path, index in zip(paths, indices):
            pool.submit(index, _judge_shard, str(path), jid)
        while pool.pending:
            done.update(pool.wait())  # re-raises a worker's UserError here
    bar.close()
    return done


# ----------------------------------------------------------------------------------------
# Worker processes
# ----------------------------------------------------------------------------------------

_worker: dict[str, Any] = {}


def _init_worker(judge_cfg: JudgeConfig, subwords: str, tokenizer_path: str, events: Any, parent: int) -> None:
    die_with_parent(parent)  # never outlive the run (workers.py)
    from lacy_fast.data.labeling import single_threaded

    single_threaded()  # one thread per worker: workers are the unit of parallelism
    _worker.update(cfg=judge_cfg, subwords=subwords, tokenizer=Tokenizer.load(tokenizer_path), events=events,
                   judge=None)


def _judge_shard(path_str: str, jid: str) -> dict[str, Any]:
    """Relabel bit 1 of one shard and rewrite it; then write its marker. Returns the marker."""
    if _worker["judge"] is None:  # loaded here, not in the initializer, so a load error is a UserError
        if parse_spec(_worker["cfg"].spec)[0] == "hf":
            import torch

            torch.set_num_threads(1)
        _worker["judge"] = load_judge(_worker["cfg"])
    judge, tok, events = _worker["judge"], _worker["tokenizer"], _worker["events"]
    path = Path(path_str)
    tokens, flags, offsets, vocab_size = _read_cleared(path, tok.sha256)
    questions, forward = judge.questions, judge.forward_tokens
    cpu = wall = 0.0
    step = 256 if judge.kind == "oracle" else 4  # documents per progress event
    for lo in range(0, len(offsets) - 1, step):
        bounds = list(zip(offsets[lo:lo + step], offsets[lo + 1:lo + step + 1]))
        ids = [tokens[a:b - 1] for a, b in bounds]  # without the EOS
        texts = [tok.decode(i) for i in ids]
        c0, w0 = time.process_time(), time.perf_counter()
        flagged = judge_documents(judge, tok, texts, ids, [flags[a:b - 1] for a, b in bounds], _worker["subwords"])
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        for (a, b), f in zip(bounds, flagged):
            flags[a:b - 1][f] |= np.uint8(FLAG_JUDGE)
        events.put((len(bounds), int(offsets[lo + len(bounds)] - offsets[lo])))
    exit_if_orphaned()
    _rewrite(path, tokens, flags, offsets, tok.sha256, vocab_size)
    marker = {
        "judge_id": jid,
        "tokens": int(len(tokens)),
        "flags_crc32": _flags_crc(flags),
        "judge_tokens": int(np.count_nonzero(flags & FLAG_JUDGE)),
        "cpu_seconds": cpu,
        "seconds": wall,
        "questions": judge.questions - questions,
        "forward_tokens": judge.forward_tokens - forward,
    }
    write_json(marker_path(path), marker)  # after the shard: a marker always describes the flags on disk
    return marker
