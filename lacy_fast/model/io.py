"""The consolidated model export: what `lacy-fast generate` / `eval` load, and what a
training run writes next to its DeepSpeed checkpoints.

An export is a directory::

    model.safetensors    weights (tied head stored once, as wte.weight)
    config.json          {"format": "lacy-fast-export", "version": 1, "model": ModelConfig,
                          "tokenizer_sha256": ..., "call_id": ..., ...extra}
    tokenizer.model      the SentencePiece model the weights were trained with
    train_config.json    the full training config (optional)

It is written atomically (a temporary directory renamed into place), so a reader never
sees a half-written export.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lacy_fast.config import ModelConfig, from_dict, to_dict
from lacy_fast.errors import ConfigError, UserError
from lacy_fast.fileio import atomic_path
from lacy_fast.model.gpt import GPT

FORMAT = "lacy-fast-export"
VERSION = 1


def save_export(
    path: str | Path,
    model: GPT,
    *,
    tokenizer_path: str | Path | None = None,
    tokenizer_sha256: str | None = None,
    call_id: int | None = None,
    train_config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` (or an already gathered ``state_dict`` of it) as an export directory."""
    path = Path(path)
    state = state_dict if state_dict is not None else model.state_dict()
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": to_dict(model.cfg),
        "tokenizer_sha256": tokenizer_sha256,
        "call_id": call_id,
        "params": model.num_params(),
        **(extra or {}),
    }
    with atomic_path(path, is_dir=True) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        if train_config is not None:
            (tmp / "train_config.json").write_text(json.dumps(train_config, indent=2) + "\n")
    return path


def read_export_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    config = path / "config.json"
    if path.is_file():
        inside = (path.parent / "config.json").is_file() and path.parent != path
        raise UserError(f"{path} is a file, not a model export; pass the export directory"
                        + (f" {path.parent}" if inside else " written by `lacy-fast train` (OUT/export)"))
    if not path.is_dir():
        raise UserError(f"model export {path} does not exist; pass a directory written by `lacy-fast train` (OUT/export)")
    if not config.is_file():
        raise UserError(f"{path} has no config.json; it is not a lacy-fast model export (OUT/export of a training run)")
    try:
        meta = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config} is not valid JSON ({err.msg}); the export is damaged, export it again")
    if meta.get("format") != FORMAT and "format" not in meta and ("out_dir" in meta or (path / "checkpoints").is_dir()):
        raise UserError(f"{path} is a training run that has no export yet (OUT/export is written with each "
                        "checkpoint); let it train until it saves one, or pass another run")
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a lacy-fast model export (format {meta.get('format')!r}); pass OUT/export of a run")
    if meta.get("version") != VERSION:
        raise UserError(f"{path} is export version {meta.get('version')}, this lacy-fast reads version {VERSION}; "
                        "re-export it with a matching lacy-fast")
    return meta


def load_export(path: str | Path, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> tuple[GPT, dict[str, Any]]:
    """The model of an export (in eval mode) and its config.json."""
    path = Path(path)
    meta = read_export_meta(path)
    try:
        cfg = from_dict(ModelConfig, meta["model"])
    except ConfigError as err:
        raise UserError(f"{path}/config.json has a bad model config ({err}); the export is damaged")
    model = GPT(cfg)
    try:
        state = load_file(str(path / "model.safetensors"))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise UserError(f"cannot read {path}/model.safetensors ({err}); the export is incomplete, export it again")
    expected = model.state_dict()
    bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    if bad or set(state) - set(expected):
        raise UserError(f"{path}/model.safetensors does not match its config.json (first mismatch: "
                        f"{(bad or sorted(set(state) - set(expected)))[0]}); the export is damaged")
    bad = first_non_finite(state)
    if bad is not None:
        raise UserError(f"{path}/model.safetensors holds NaN or infinite weights ({bad}): the run that wrote it "
                        "diverged; use an export written before that, or retrain from a finite checkpoint")
    model.load_state_dict(state)
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), meta


def first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of ``state`` holding a NaN or an inf, else None."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None
