"""The consolidated model export: what `lacy-fast generate` / `eval` load, what a training
run writes next to its DeepSpeed checkpoints, and a Hugging Face model directory that
transformers opens as it is (GPT-2 weights and config, the tokenizer for both, a manifest
written last). Written atomically; ``load_export`` checks every file against the manifest.
docs/export.md lists the files and the versions that still load.
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
from lacy_fast.fileio import MANIFEST, atomic_path, manifest_problem, write_manifest
from lacy_fast.model.gpt import GPT
from lacy_fast.model.hf import from_gpt2, gpt2_config, to_gpt2

FORMAT = "lacy-fast-export"
VERSION = 2
LEGACY_VERSION = 1  # lacy-fast's own weight layout, config.json holding only lacy-fast's fields


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
    eos_id, tokenizer_files = None, {}
    if tokenizer_path is not None:
        import sentencepiece as spm

        from lacy_fast.data.hf_tokenizer import hf_tokenizer_files

        try:
            sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
        except (OSError, RuntimeError) as err:
            raise UserError(f"tokenizer {tokenizer_path} is not a SentencePiece model ({err}); export with the "
                            "tokenizer.model the model was trained with")
        eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        call_piece = sp.id_to_piece(call_id) if call_id is not None else "<CALL>"
        tokenizer_files = hf_tokenizer_files(tokenizer_path, call_piece, model.cfg.max_seq_len)
    dtype = state["wte.weight"].dtype
    config = {**gpt2_config(model.cfg, model.padded_vocab_size, eos_id=eos_id, dtype=dtype), "lacy_fast": meta}
    suppress = ([call_id] if call_id is not None else []) + list(range(model.vocab_size, model.padded_vocab_size))
    generation = {"bos_token_id": eos_id, "eos_token_id": eos_id, "suppress_tokens": suppress}
    with atomic_path(path, is_dir=True) as tmp:
        # transformers refuses safetensors files whose metadata does not say format "pt"
        save_file(to_gpt2(state, model.cfg.n_layer), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        for name, text in tokenizer_files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        if train_config is not None:
            (tmp / "train_config.json").write_text(json.dumps(train_config, indent=2) + "\n")
        write_manifest(tmp)
    return path


def export_meta(config: dict[str, Any]) -> dict[str, Any] | None:
    """lacy-fast's fields of an export's parsed config.json (None: not a lacy-fast export)."""
    inner = config.get("lacy_fast")
    if isinstance(inner, dict) and inner.get("format") == FORMAT:
        return inner
    if config.get("format") == FORMAT:  # version 1: lacy-fast's fields at the top level
        return config
    return None


def read_export_meta(path: str | Path) -> dict[str, Any]:
    """lacy-fast's fields of an export's config.json ("format", "version", "model", ...)."""
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
        raw = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config} is not valid JSON ({err.msg}); the export is damaged, export it again")
    meta = export_meta(raw) if isinstance(raw, dict) else None
    if meta is None and isinstance(raw, dict) and ("out_dir" in raw or (path / "checkpoints").is_dir()):
        raise UserError(f"{path} is a training run without an export (OUT/export is written with each checkpoint); "
                        "rerun its `lacy-fast train` command, which writes the export from its newest checkpoint (or "
                        "trains until it saves one), or pass another run")
    if meta is None:
        raise UserError(f"{path} is not a lacy-fast model export (its config.json has no lacy-fast fields); pass "
                        "OUT/export of a run")
    if meta.get("version") not in (VERSION, LEGACY_VERSION):
        raise UserError(f"{path} is export version {meta.get('version')}, this lacy-fast reads versions "
                        f"{LEGACY_VERSION} and {VERSION}; re-export it with a matching lacy-fast")
    return meta


def load_export(path: str | Path, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> tuple[GPT, dict[str, Any]]:
    """The model of an export (in eval mode) and lacy-fast's fields of its config.json."""
    path = Path(path)
    meta = read_export_meta(path)
    problem = export_integrity(path)
    if problem is not None:
        raise UserError(f"model export {path} is damaged: {problem}; rerun the `lacy-fast train` command of its run, "
                        "which rewrites OUT/export from the newest checkpoint, or export it again")
    try:
        model_fields = dict(meta["model"])
        if "preset" in model_fields:  # exports written before model.preset was renamed model.shape
            model_fields["shape"] = model_fields.pop("preset")
        cfg = from_dict(ModelConfig, model_fields)
    except (ConfigError, KeyError, TypeError) as err:
        raise UserError(f"{path}/config.json has a bad model config ({err}); the export is damaged")
    model = GPT(cfg)
    weights = path / "model.safetensors"
    try:
        state = load_file(str(weights))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise UserError(f"cannot read {weights} ({err}); the export is incomplete, export it again")
    if meta["version"] == VERSION:
        state = from_gpt2(state, cfg, str(weights))
    expected = model.state_dict()
    bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    if bad or set(state) - set(expected):
        raise UserError(f"{weights} does not match its config.json (first mismatch: "
                        f"{(bad or sorted(set(state) - set(expected)))[0]}); the export is damaged")
    bad = first_non_finite(state)
    if bad is not None:
        raise UserError(f"{path}/model.safetensors holds NaN or infinite weights ({bad}): the run that wrote it "
                        "diverged; use an export written before that, or retrain from a finite checkpoint")
    model.load_state_dict(state)
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), meta


def export_integrity(path: str | Path, required: bool = False) -> str | None:
    """None when every file of export ``path`` matches its manifest (or it has none and
    ``required`` is false); else what is wrong, naming the file."""
    path = Path(path)
    if required or (path / MANIFEST).is_file():
        return manifest_problem(path)
    return None


def first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of ``state`` holding a NaN or an inf, else None."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None
