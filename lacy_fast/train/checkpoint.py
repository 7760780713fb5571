"""Checkpoints for exact resume, written so that a kill never leaves a broken one.

Layout under ``OUT/checkpoints``::

    step_00000200/          a DeepSpeed checkpoint (model, optimizer, scheduler; ZeRO
                            shards per rank) plus, ours:
        rank{r}.pt          each rank's RNG states (torch, CUDA, numpy, python) and data
                            position (for sources whose position is not the step)
        lacy.json           step, token counts, and the run identity checked on
                            resume (identity.py)
        manifest.json       size and sha256 of every file above, written last
    latest                  the tag of the newest complete checkpoint
    damaged-step_00000400/  a checkpoint that failed verification, set aside (never read)

Atomicity: every rank writes into the tag directory, then all ranks meet at a barrier; rank
0 writes lacy.json, then the manifest, then OUT/export (so the export is never older than
``latest``), and only then replaces ``latest`` (temporary file + rename) and prunes. A
checkpoint cut short by a kill is never pointed to; it is deleted when the run resumes.
``latest`` has the format DeepSpeed's own tools (zero_to_fp32.py) read. Rank 0 hashes the
files of every rank, so the checkpoint directory must be one shared file system (as
``latest`` already assumes).

Verification: on resume rank 0 checks every file of the checkpoint ``latest`` names against
its manifest (a missing, truncated or changed file fails). A checkpoint that fails is set
aside as ``damaged-step_N`` and the run resumes from the newest older one that verifies,
saying so; when none does, the run stops with one sentence naming the damaged file.
Pruning (``keep_last``) runs only after a new checkpoint's manifest is written, so the
newest checkpoint that verified is never deleted before a newer one exists. Checkpoints
written before manifests existed load without verification.

Starting over is explicit: a folder with checkpoints but no ``latest`` is refused (it would
mix two runs); ``lacy-fast train --fresh`` deletes the earlier run's files (``start_over``).
"""
from __future__ import annotations

import json
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from lacy_fast.errors import UserError
from lacy_fast.fileio import MANIFEST, manifest_problem, write_json, write_manifest, write_text

TAG = re.compile(r"^step_(\d{8})$")
DAMAGED = "damaged-"
# What a run writes into its out_dir, deleted by --fresh (the lock file stays: it is held).
RUN_FILES = ("checkpoints", "export", "metrics.jsonl", "config.json", "tensorboard", "profile")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    def __init__(self, out_dir: Path, keep_last: int, rank: int):
        self.dir = out_dir / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.verified: str | None = None  # the newest checkpoint that verified (on load, or once written)

    def tags(self) -> list[str]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir() and TAG.match(p.name) and _complete(p))

    def latest(self) -> str | None:
        """The tag ``latest`` names (None: a new run). A folder of checkpoints without it is refused."""
        pointer = self.dir / "latest"
        if not pointer.is_file():
            tags = self.tags()
            if tags:
                raise UserError(f"{self.dir} holds checkpoints of an earlier run (newest {tags[-1]}) but no {pointer}; "
                                f"write {tags[-1]} into {pointer} to resume from it, or rerun with --fresh to start "
                                "over (which deletes that run's checkpoints, export and metrics)")
            return None
        tag = pointer.read_text(errors="replace").strip()
        if not TAG.match(tag):
            raise UserError(f"{pointer} names '{tag}', which is not a checkpoint; write the tag of one of "
                            f"{self.dir}'s step_N folders into it, or rerun with --fresh to start over")
        return tag

    def problem(self, tag: str) -> str | None:
        """Why checkpoint ``tag`` cannot be trusted (naming the file), or None when it verifies."""
        target = self.dir / tag
        if not target.is_dir():
            return f"{target} is missing"
        if (target / MANIFEST).is_file():
            return manifest_problem(target)
        try:
            meta = json.loads((target / "lacy.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return f"{target / 'lacy.json'} is missing or damaged"
        if isinstance(meta, dict) and meta.get("manifest"):
            return f"{target / MANIFEST} is missing"
        return None  # written before manifests existed: nothing to verify against

    def resume_tag(self, group: Any = None) -> str | None:
        """The checkpoint to resume from: ``latest`` if it verifies, else the newest older one
        that does (rank 0 decides, saying so; every rank gets its answer)."""
        chosen: list[Any] = [None, None]
        if self.rank == 0:
            try:
                chosen[0] = self._choose()
            except UserError as err:
                chosen[1] = str(err)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(chosen, src=0, group=group)
        if chosen[1] is not None:
            raise UserError(chosen[1] if self.rank == 0 else f"{self.dir}: rank 0 found no checkpoint to resume "
                            "from (its message says why)")
        self.verified = chosen[0]
        return chosen[0]

    def _choose(self) -> str | None:
        tag = self.latest()
        if tag is None:
            return None
        problem = self.problem(tag)
        if problem is None:
            return tag
        older = [t for t in self.tags() if t < tag]
        good = next((t for t in reversed(older) if self.problem(t) is None), None)
        if good is None:
            raise UserError(f"checkpoint {tag} cannot be resumed: {problem}, and no older checkpoint in {self.dir} "
                            "verifies; restore that file, or rerun with --fresh to start over")
        kept = ""
        bad_tags = sorted({t for t in self.tags() if good < t < tag} | ({tag} if (self.dir / tag).is_dir() else set()))
        for bad in bad_tags:  # set aside: never resumed, never pruned
            aside = self.dir / f"{DAMAGED}{bad}"
            shutil.rmtree(aside, ignore_errors=True)
            (self.dir / bad).rename(aside)
            kept = f" (the damaged one is kept as {self.dir / (DAMAGED + tag)} until you delete it)" \
                if bad == tag else kept
        write_text(self.dir / "latest", good)
        print(f"checkpoint {tag} cannot be resumed: {problem}; resuming from {good}, the newest checkpoint that "
              f"verifies{kept}", file=sys.stderr)
        return good

    def meta(self, tag: str) -> dict[str, Any]:
        """The lacy.json of checkpoint ``tag``: step, token count, run identity."""
        return json.loads((self.dir / tag / "lacy.json").read_text())

    def save(self, engine, step: int, state: dict[str, Any], rank_state: Any = None,
             before_latest: Callable[[], None] | None = None) -> str:
        """Collective: every rank calls it at the same step. ``state`` (rank 0's) goes to
        lacy.json; ``rank_state`` is each rank's own (its data position); ``before_latest``
        runs on rank 0 once the checkpoint is complete, before ``latest`` names it (the export)."""
        tag = f"step_{step:08d}"
        target = self.dir / tag
        if self.rank == 0 and target.exists():  # a leftover of a run killed mid-save
            shutil.rmtree(target)
        _barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
        torch.save({"rng": rng_state(), "data": rank_state}, target / f"rank{self.rank}.pt")
        _barrier()
        if self.rank == 0:
            write_json(target / "lacy.json", {"step": step, **state, "manifest": MANIFEST})
            write_manifest(target)
            if before_latest is not None:
                before_latest()
            write_text(self.dir / "latest", tag)
            self.verified = tag
            self._prune(keep=tag)
        _barrier()
        return tag

    def load(self, engine, tag: str) -> tuple[dict[str, Any], Any]:
        """Restore ``engine`` and this rank's RNG; returns (lacy.json, this rank's rank_state)."""
        target = self.dir / tag
        try:
            path, _ = engine.load_checkpoint(str(self.dir), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
        except (RuntimeError, EOFError, AssertionError, OSError, ValueError, KeyError) as err:
            path = None
            detail = f" ({type(err).__name__}: {str(err)[:200]})"
        else:
            detail = ""
        if path is None:
            raise UserError(f"DeepSpeed could not load checkpoint {target}{detail}; it is damaged, move it aside and "
                            f"write an older step's tag into {self.dir / 'latest'}, or rerun with --fresh")
        rank_file = target / f"rank{self.rank}.pt"
        meta = self.meta(tag)
        if not rank_file.is_file():
            raise UserError(f"{target} was written by {meta.get('world_size', '?')} rank(s), which this "
                            "run does not match; resume with the same number of ranks")
        try:
            saved = torch.load(rank_file, weights_only=False)
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise UserError(f"{rank_file} cannot be read ({type(err).__name__}); the checkpoint is damaged, move it "
                            f"aside and write an older step's tag into {self.dir / 'latest'}, or rerun with --fresh")
        set_rng_state(saved["rng"])
        return meta, saved["data"]

    def _prune(self, keep: str) -> None:
        """Delete all but the ``keep_last`` newest complete checkpoints up to ``keep`` (the
        one just written and verified, never deleted), and leftovers of killed saves."""
        tags = sorted(p.name for p in self.dir.iterdir() if p.is_dir() and TAG.match(p.name))
        complete = [t for t in self.tags() if t <= keep]
        for tag in complete[: max(0, len(complete) - max(1, self.keep_last))]:
            if tag not in (keep, self.verified):
                shutil.rmtree(self.dir / tag, ignore_errors=True)
        for tag in tags:  # incomplete leftovers of killed saves
            if not _complete(self.dir / tag):
                shutil.rmtree(self.dir / tag, ignore_errors=True)


def _complete(target: Path) -> bool:
    """Whether a save of ``target`` finished: its manifest is written (or, for a checkpoint of a
    version before manifests, its lacy.json). Whether its files are intact is ``problem``'s job."""
    if (target / MANIFEST).is_file():
        return True
    try:
        return "manifest" not in json.loads((target / "lacy.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return False


def start_over(out_dir: Path) -> list[str]:
    """``--fresh``: delete what an earlier run wrote into ``out_dir`` (checkpoints, export,
    metrics, config, leftovers of killed exports); returns the names deleted. The caller
    holds the out_dir lock."""
    deleted = []
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        deleted.append(name)
    clean_export_leftovers(out_dir)
    return deleted


def clean_export_leftovers(out_dir: Path) -> None:
    """Temporary exports of a run killed while it wrote OUT/export (``.export.tmp-PID``,
    ``.export.old-PID``): the rerun rewrites the export from its checkpoint instead."""
    if out_dir.is_dir():
        for path in out_dir.glob(".export.*-*"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def export_problem(export_dir: Path, step: int) -> str | None:
    """Why ``export_dir`` is not the export of checkpoint step ``step`` (None: it is)."""
    from lacy_fast.model.io import export_integrity, read_export_meta

    if not export_dir.exists():
        return "is missing"
    try:
        meta = read_export_meta(export_dir)
    except UserError as err:
        return f"cannot be read ({err})"
    if meta.get("step") != step:
        return f"holds step {meta.get('step')}, not the checkpoint's step {step}"
    problem = export_integrity(export_dir, required=True)  # a run's own export always has a manifest
    return None if problem is None else f"is damaged: {problem}"


def lock_out_dir(out_dir: Path, fresh: bool, d) -> Any:
    """Rank 0 locks out_dir for the run (``--fresh``: then deletes an earlier run's files) and
    returns the held lock; every rank learns whether it could (None on the other ranks)."""
    from lacy_fast.lock import DirLock
    from lacy_fast.train.dist import reduce_host

    error, held = None, None
    if d.is_main:
        lock = DirLock(out_dir, "training run")
        try:
            lock.acquire()
            held = lock
            if fresh:
                deleted = start_over(out_dir)
                print(f"--fresh: deleted the earlier run's {', '.join(deleted)} in {out_dir}" if deleted else
                      f"--fresh: {out_dir} holds no earlier run", file=sys.stderr)
        except UserError as err:
            error = err
    if reduce_host([int(error is not None)], d)[0]:
        if held is not None:
            held.release()
        raise error or UserError(f"{out_dir} is in use by another training run (rank 0 names it); wait for it "
                                 "to finish or stop it, or use another out_dir")
    return held


def gather_weights(model: torch.nn.Module, zero_stage: int, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The model's full state dict on rank 0 (gathered from ZeRO-3 shards), None elsewhere."""
    import deepspeed

    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()} if is_main else None
    return model.state_dict() if is_main else None
