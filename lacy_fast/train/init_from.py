"""``train.init_from``: start a new run from trained weights (fine-tuning), not from random ones.

    lacy-fast train --config tiny data.path=new-data out_dir=runs/ft train.init_from=runs/lacy

PATH is a model export (``OUT/export``), a run's out_dir (its export), or a checkpoint
directory (``OUT/checkpoints/step_N`` of a ZeRO 0-2 run). Only the weights are taken: the
optimizer, the schedule, the step and the data position start fresh, as fine-tuning users
expect (resuming a run is rerunning it on its own out_dir). The model shape and the
tokenizer must be the ones of this run; a difference is refused naming the key. A run that
resumes from its own checkpoint ignores ``init_from``: its checkpoint has the weights.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lacy_fast.errors import UserError

SHAPE_KEYS = ("n_layer", "n_head", "d_model", "max_seq_len", "vocab_size", "bias")
HINT = "pass a model export (OUT/export), a run's out_dir or a checkpoint directory (OUT/checkpoints/step_N)"


def load_initial_weights(model: torch.nn.Module, path: str, tokenizer_sha256: str) -> str:
    """Copy the weights at ``path`` into ``model``; returns what was loaded, for the banner."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"train.init_from {p} does not exist; {HINT}")
    if (p / "lacy.json").is_file():
        state, shape, sha, step = _checkpoint(p)
    else:
        state, shape, sha, step = _export(p / "export" if (p / "export").is_dir() else p)
    if sha is not None and sha != tokenizer_sha256:
        raise UserError(f"train.init_from {p} was trained with another tokenizer than data.path's; initialise from "
                        "a model of the same tokenizer (prepare the new data with --tokenizer OLD/tokenizer.model)")
    now = {k: getattr(model.cfg, k) for k in SHAPE_KEYS}
    for key in SHAPE_KEYS:
        if key in shape and shape[key] != now[key]:
            raise UserError(f"train.init_from {p} has model.{key}={shape[key]!r} but this run has "
                            f"model.{key}={now[key]!r}; set the model keys (or model.shape) to the model's")
    expected = model.state_dict()
    bad = [k for k in expected if k not in state or tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise UserError(f"train.init_from {p} does not hold this model's weight {bad[0]}; {HINT} of the same shape")
    model.load_state_dict({k: state[k] for k in expected})
    return f"initialised from {p}" + (f" (its step {step})" if step is not None else "") + ", fresh optimizer"


def _export(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str | None, int | None]:
    from lacy_fast.model.io import load_export

    model, meta = load_export(p)
    return model.state_dict(), {k: getattr(model.cfg, k) for k in SHAPE_KEYS}, meta.get("tokenizer_sha256"), \
        meta.get("step")


def _checkpoint(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str | None, int | None]:
    meta = json.loads((p / "lacy.json").read_text())
    identity = meta.get("identity") or {}
    if identity.get("zero_stage") == 3:
        raise UserError(f"train.init_from {p} is a checkpoint of a ZeRO-3 run, whose weights are sharded; pass "
                        "that run's export (OUT/export) instead")
    states = p / "mp_rank_00_model_states.pt"
    try:
        module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    except (OSError, KeyError, RuntimeError) as err:
        raise UserError(f"train.init_from: cannot read {states} ({err}); pass the run's export (OUT/export)")
    state = {k.removeprefix("model."): v for k, v in module.items()}
    shape = {k: identity[f"model.{k}"] for k in SHAPE_KEYS if f"model.{k}" in identity}
    return state, shape, identity.get("tokenizer.sha256"), meta.get("step")
