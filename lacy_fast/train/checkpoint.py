"""Checkpoints for exact resume, written so that a kill never leaves a broken one.

Layout under ``OUT/checkpoints``::

    step_00000200/          a DeepSpeed checkpoint (model, optimizer, scheduler; ZeRO
                            shards per rank) plus, ours:
        rank{r}.pt          each rank's RNG states (torch, CUDA, numpy, python) and data
                            position (for sources whose position is not the step)
        lacy.json           step, token counts, and the run identity checked on
                            resume (identity.py)
    latest                  the tag of the newest complete checkpoint

Atomicity: every rank writes into the tag directory, then all ranks meet at a barrier, and
only then does rank 0 replace ``latest`` (temporary file + rename). A checkpoint cut short
by a kill is never pointed to; it is deleted when the run resumes. ``latest`` has the
format DeepSpeed's own tools (zero_to_fp32.py) read.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lacy_fast.errors import UserError
from lacy_fast.fileio import write_json, write_text

TAG = re.compile(r"^step_(\d{8})$")


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

    def latest(self) -> str | None:
        pointer = self.dir / "latest"
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        if not TAG.match(tag) or not (self.dir / tag / "lacy.json").is_file():
            raise UserError(f"{pointer} names '{tag}', which is not a complete checkpoint; "
                            f"delete {pointer} to start over or restore the checkpoint directory")
        return tag

    def meta(self, tag: str) -> dict[str, Any]:
        """The lacy.json of checkpoint ``tag``: step, token count, run identity."""
        return json.loads((self.dir / tag / "lacy.json").read_text())

    def save(self, engine, step: int, state: dict[str, Any], rank_state: Any = None) -> str:
        """Collective: every rank calls it at the same step. ``state`` (rank 0's) goes to
        lacy.json; ``rank_state`` is each rank's own (its data position)."""
        tag = f"step_{step:08d}"
        target = self.dir / tag
        if self.rank == 0 and target.exists():  # a leftover of a run killed mid-save
            shutil.rmtree(target)
        _barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
        torch.save({"rng": rng_state(), "data": rank_state}, target / f"rank{self.rank}.pt")
        _barrier()
        if self.rank == 0:
            write_json(target / "lacy.json", {"step": step, **state})
            write_text(self.dir / "latest", tag)
            self._prune(keep=tag)
        _barrier()
        return tag

    def load(self, engine, tag: str) -> tuple[dict[str, Any], Any]:
        """Restore ``engine`` and this rank's RNG; returns (lacy.json, this rank's rank_state)."""
        path, _ = engine.load_checkpoint(str(self.dir), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise UserError(f"DeepSpeed could not load checkpoint {self.dir / tag}; it is damaged, "
                            f"point {self.dir / 'latest'} at an older step or start a new out_dir")
        rank_file = self.dir / tag / f"rank{self.rank}.pt"
        meta = self.meta(tag)
        if not rank_file.is_file():
            raise UserError(f"{self.dir / tag} was written by {meta.get('world_size', '?')} rank(s), which this "
                            "run does not match; resume with the same number of ranks")
        saved = torch.load(rank_file, weights_only=False)
        set_rng_state(saved["rng"])
        return meta, saved["data"]

    def _prune(self, keep: str) -> None:
        tags = sorted(p.name for p in self.dir.iterdir() if p.is_dir() and TAG.match(p.name))
        newest = int(TAG.match(keep).group(1))
        complete = [t for t in tags if (self.dir / t / "lacy.json").is_file() and int(TAG.match(t).group(1)) <= newest]
        for tag in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(self.dir / tag, ignore_errors=True)
        for tag in tags:  # incomplete leftovers of killed saves
            if not (self.dir / tag / "lacy.json").is_file():
                shutil.rmtree(self.dir / tag, ignore_errors=True)
