"""A run's identity: the settings a resumed run must share with its checkpoint.

A checkpoint records, in ``lacy.json``, every setting that changes what a training step
computes from the state it holds. Resuming compares them key by key and refuses the first
that differs, naming it: a ``lacy`` run resumed with ``objective.strategy=none`` would
otherwise continue as another experiment under the first one's name.

The rule is by exclusion, so that a new config field is safe by default: every leaf key of
``RunConfig`` is part of the identity unless ``MAY_CHANGE`` lists it, with the reason. Some
keys are compared through what they resolve to, not as written:

- ``model.*``: the resolved shape (a shape name and the same shape spelled out match);
  ``model.vocab_size`` is the tokenizer's.
- ``train.precision``: the precision the run resolved (``auto`` is bf16 or fp32).
- ``data.path``: for prepared shards, the data's content (a digest of its ``prepare.json``
  settings and its document and token counts), not where it lies, so a moved dataset
  resumes; for ``data.source=online`` it is only a cache and may change. The settings of
  online labeling (``data.inputs``, ``data.reader.*``, ``data.label.*``) count only for
  ``data.source=online``, and ``data.tokenizer`` as the tokenizer's sha256.
- ``objective.call_rate``: the number it resolved to (``auto`` depends on the data);
  ``objective.ref_checkpoint``: a digest of the reference export's metadata. Settings a
  strategy does not read are recorded as None (``call_fraction`` under ``spacy``...), so
  changing them is allowed.

Beside the config: the tokenizer (sha256 and <CALL> id) and the number of ranks (the data
order and the per-rank checkpoint files depend on it).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lacy_fast.config import ModelConfig, RunConfig, to_dict
from lacy_fast.errors import UserError
from lacy_fast.method import RANK_ALL, RANK_FACTS

# Settings a resumed run may change, and why each changes nothing a step computes (or is
# meant to be changed between the parts of one run).
MAY_CHANGE: dict[str, str] = {
    "out_dir": "where the run lives: a copied run directory resumes in its new place",
    "train.max_steps": "the run's length: raise it to continue a finished run",
    "train.max_gt_tokens": "the run's length in ground-truth tokens",
    "train.lr": "the schedule is rebuilt from the config on resume; lowering the peak rate is the recovery from a "
                "divergence",
    "train.min_lr_ratio": "the schedule's shape (rebuilt on resume)",
    "train.warmup_steps": "the schedule's shape (rebuilt on resume)",
    "train.lr_decay_steps": "the schedule's length (rebuilt on resume)",
    "train.grad_clip": "read from the config at every step",
    "train.seed": "only draws the initial weights; the RNG states come from the checkpoint",
    "train.log_every": "logging cadence",
    "train.ckpt_every": "checkpoint cadence",
    "train.keep_last": "how many checkpoints are kept",
    "train.peak_tflops": "only the MFU column",
    "train.compile": "speed: the compiled model computes the same function",
    "train.profile_start": "profiling",
    "train.profile_steps": "profiling",
    "train.probe": "a measurement: the probe never changes a step",
    "train.probe_every": "a measurement's cadence",
    "train.track_selection": "a measurement: persistence is read from the selection, never fed back",
    "model.shape": "compared through the resolved shape (model.n_layer, ...)",
    "train.tensorboard": "logging",
    "train.wandb": "logging",
    "train.wandb_project": "logging",
    "train.init_from": "only the weights a new run starts from; a resumed run loads its checkpoint's",
    "model.attention": "speed: flash-attn and SDPA compute the same attention",
    "objective.impl": "speed: every implementation computes the same loss",
    "data.workers": "speed: prefetch worker processes",
    "data.queue_depth": "speed: batches held ready",
}

# Settings only data.source=online reads.
_ONLINE_ONLY = ("data.inputs", "data.tokenizer", "data.reader.", "data.label.")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_keys() -> list[str]:
    """Every leaf key of RunConfig, dotted."""
    return list(flatten(to_dict(RunConfig())))


def data_fingerprint(path: str | Path) -> str:
    """A digest of a `lacy-fast prepare` output's content: its settings (prepare.json) and
    its document and token counts (stats.json). Independent of where the directory lies."""
    path = Path(path)
    content: dict[str, Any] = {}
    for name, keys in (("prepare.json", None), ("stats.json", ("documents", "tokens", "fact_tokens"))):
        try:
            saved = json.loads((path / name).read_text())
        except (OSError, json.JSONDecodeError):
            saved = None
        if isinstance(saved, dict) and keys is not None:
            saved = {k: saved.get(k) for k in keys}
        content[name] = saved
    return _digest(content)


def export_fingerprint(meta: dict[str, Any]) -> str:
    """A digest of a model export's metadata (its config.json: shape, tokenizer, step, ...)."""
    return _digest(meta)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(cfg: RunConfig, *, model: ModelConfig, precision: str, call_rate: float | None,
                 tokenizer_sha256: str, call_id: int, world_size: int, data: str | None,
                 ref: str | None) -> dict[str, Any]:
    """The identity of a run (see the module doc): dotted key -> value, JSON-serialisable.

    ``model``, ``precision`` and ``call_rate`` are the resolved settings; ``data`` the data
    fingerprint (None for online data); ``ref`` the reference export's fingerprint (rho).
    """
    o = cfg.objective
    values = flatten(to_dict(cfg))
    values.update(flatten(to_dict(model), "model."))
    values["train.precision"] = precision
    values["objective.call_rate"] = call_rate if o.strategy in RANK_ALL else None
    if o.strategy not in RANK_FACTS:
        values["objective.call_fraction"] = None  # unused, or folded into the resolved call_rate
    values["objective.ref_checkpoint"] = ref if o.strategy == "rho" else None
    if cfg.data.source == "shards":
        values["data.path"] = data
        for key in values:
            if key.startswith(_ONLINE_ONLY):
                values[key] = None
    else:
        values["data.path"] = None  # the online cache: labels equal to labeling again
        values["data.tokenizer"] = tokenizer_sha256
    identity = {k: v for k, v in values.items() if k not in MAY_CHANGE}
    identity.update({"tokenizer.sha256": tokenizer_sha256, "tokenizer.call_id": call_id,
                     "world_size": world_size})
    return json.loads(json.dumps(identity))  # tuples as lists, as they come back from lacy.json


# Keys compared through a digest of what a path holds: a refusal names the paths instead.
_BY_CONTENT = {"data.path": "the prepared data (its prepare.json settings or its token counts)",
               "objective.ref_checkpoint": "the reference model (its export's config.json)"}


def check_resume(saved: dict[str, Any] | None, now: dict[str, Any], checkpoint: Path, out_dir: Path,
                 paths: dict[str, str | None] | None = None) -> None:
    """Refuse to resume ``checkpoint`` when a setting of its identity differs, naming the key.

    ``paths``: this run's path of each key compared by content (``data.path``...); the
    checkpoint's comes from ``out_dir/config.json``, which the run that wrote it left."""
    if saved is None:
        raise UserError(f"{checkpoint} was written by an older lacy-fast that did not record the run's settings, so "
                        "it cannot be resumed safely; start a new out_dir")
    for key in sorted(set(saved) | set(now), key=_order(now)):
        if saved.get(key) != now.get(key):
            if key in _BY_CONTENT and paths is not None and key in paths:
                raise _content_differs(key, _saved_path(out_dir, key), paths[key], out_dir)
            raise UserError(
                f"{out_dir} holds a checkpoint trained with {key}={_show(saved.get(key))}, but this run has "
                f"{key}={_show(now.get(key))}; resume with the settings it was trained with ({out_dir}/config.json), "
                "or use a new out_dir")


def _order(now: dict[str, Any]):
    keys = list(now)
    return lambda k: (keys.index(k) if k in now else len(keys), k)


def _show(value: Any) -> str:
    return "unset" if value is None else repr(value)


def _saved_path(out_dir: Path, key: str) -> str | None:
    """The path ``key`` had in the run that wrote out_dir's config.json (None: unknown)."""
    try:
        node: Any = json.loads((out_dir / "config.json").read_text())
        for part in key.split("."):
            node = node[part]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return node if isinstance(node, str) else None


def _content_differs(key: str, before: str | None, now: str | None, out_dir: Path) -> UserError:
    what = _BY_CONTENT[key]
    if before is not None and now is not None and Path(before).resolve() == Path(now).resolve():
        return UserError(f"{out_dir} holds a checkpoint trained on {key}={before}, but {before} now holds other "
                         f"content ({what} changed since); resume on the data it was trained on, or use a new out_dir")
    was = f"{key}={before}" if before is not None else f"another {key}"
    return UserError(f"{out_dir} holds a checkpoint trained on {was}, but this run has {key}={now if now is not None else 'unset'}, which "
                     f"holds other content ({what} differ); resume with {key}={before or 'the one it was trained on'}"
                     f" ({out_dir}/config.json), or use a new out_dir")
