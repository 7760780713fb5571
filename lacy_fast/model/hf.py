"""lacy-fast's GPT as Hugging Face transformers' ``GPT2LMHeadModel``: config and weights.

The two are the same network, term by term:

    lacy-fast (gpt.py)                        GPT2LMHeadModel (config)
    learned positions wpe, max_seq_len        n_positions = max_seq_len
    pre-LayerNorm blocks, eps 1e-5            layer_norm_epsilon = 1e-5 (nn.LayerNorm's default)
    GELU, tanh approximation (F.gelu)         activation_function = "gelu_pytorch_tanh" (the same F.gelu
                                              call; "gelu_new" is the same formula in Python ops)
    attention scores / sqrt(head_dim) (SDPA)  scale_attn_weights = True, no per-layer scaling,
                                              no reordered upcast
    MLP width 4 d_model                       n_inner = None (4 n_embd)
    tied head = wte (padded rows included)    tie_word_embeddings = True, vocab_size = padded size
    nn.Linear weight (out, in)                Conv1D weight (in, out): transposed
    bias=False (Linear and LayerNorm)         GPT-2 always has biases: written as zeros, which
                                              computes the same thing
    dropout p                                 resid / embd / attn_pdrop = p

The vocabulary is padded to a multiple of 64 (``gpt.padded_vocab_size``); the padding rows
stay in the exported embedding, so the matrix the training loss saw is kept whole (a rho
reference scores with it) and transformers sees ``vocab_size`` = the padded size, as for
many hub models whose embedding is larger than their tokenizer. The padding ids are never
produced by the tokenizer; ``generation_config.json`` suppresses them (and <CALL>) in
``generate``, so the exported model generates like ``lacy-fast generate --big none``.
"""
from __future__ import annotations

from typing import Any

import torch

from lacy_fast.config import ModelConfig
from lacy_fast.errors import UserError

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which gpt.py uses
PREFIX = "transformer."  # GPT2LMHeadModel's name for its GPT2Model

# lacy-fast name -> GPT-2 name, per block and outside the blocks; True: transposed (Conv1D)
_BLOCK = {
    "ln_1.weight": ("ln_1.weight", False), "ln_1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True), "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True), "attn.proj.bias": ("attn.c_proj.bias", False),
    "ln_2.weight": ("ln_2.weight", False), "ln_2.bias": ("ln_2.bias", False),
    "mlp.fc.weight": ("mlp.c_fc.weight", True), "mlp.fc.bias": ("mlp.c_fc.bias", False),
    "mlp.proj.weight": ("mlp.c_proj.weight", True), "mlp.proj.bias": ("mlp.c_proj.bias", False),
}
_TOP = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight", "ln_f.weight": "ln_f.weight",
        "ln_f.bias": "ln_f.bias"}
# Biases GPT-2 has and a bias=False lacy-fast model lacks: name -> the weight it goes with.
_BIAS_OF = {"ln_1.bias": "ln_1.weight", "attn.qkv.bias": "attn.qkv.weight", "attn.proj.bias": "attn.proj.weight",
            "ln_2.bias": "ln_2.weight", "mlp.fc.bias": "mlp.fc.weight", "mlp.proj.bias": "mlp.proj.weight"}


def gpt2_config(cfg: ModelConfig, padded_vocab: int, *, eos_id: int, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` of the equivalent ``GPT2LMHeadModel`` (transformers' GPT2Config fields)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": padded_vocab,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_pytorch_tanh",
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "tie_word_embeddings": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "dtype": str(dtype).removeprefix("torch."),
    }


def to_gpt2(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """lacy-fast state dict -> GPT2LMHeadModel's (the tied head stored once, as wte)."""
    out = {PREFIX + hf: state[ours] for ours, hf in _TOP.items() if ours in state}
    for i in range(n_layer):
        for ours, (hf, transpose) in _BLOCK.items():
            key = f"blocks.{i}.{ours}"
            if key in state:
                t = state[key]
                out[f"{PREFIX}h.{i}.{hf}"] = t.t().contiguous() if transpose else t
            elif ours in _BIAS_OF:  # bias=False: GPT-2's bias is zero
                weight = state[f"blocks.{i}.{_BIAS_OF[ours]}"]
                out[f"{PREFIX}h.{i}.{hf}"] = weight.new_zeros(weight.shape[0])
    if "ln_f.bias" not in state:
        out[PREFIX + "ln_f.bias"] = torch.zeros_like(state["ln_f.weight"])
    return out


def from_gpt2(state: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict -> lacy-fast's, for a model of ``cfg``.

    Accepts what transformers itself writes too: keys with or without the ``transformer.``
    prefix, an ``lm_head.weight`` equal to the embedding (tied). With ``bias=False`` the
    GPT-2 biases must be zero (a model fine-tuned with biases is not a bias-free model).
    ``where``: the file, for errors.
    """
    plain = {k.removeprefix(PREFIX): v for k, v in state.items()}
    head = plain.pop("lm_head.weight", None)
    out: dict[str, torch.Tensor] = {}
    missing = []
    for ours, hf in _TOP.items():
        if hf in plain:
            out[ours] = plain.pop(hf)
        else:
            missing.append(hf)
    for i in range(cfg.n_layer):
        for ours, (hf, transpose) in _BLOCK.items():
            t = plain.pop(f"h.{i}.{hf}", None)
            if t is None:
                missing.append(f"h.{i}.{hf}")
            elif transpose:
                out[f"blocks.{i}.{ours}"] = t.t().contiguous()
            else:
                out[f"blocks.{i}.{ours}"] = t
    if missing:
        raise UserError(f"{where} lacks {PREFIX}{missing[0]} (and {len(missing) - 1} more weights); the export is "
                        "incomplete, export it again")
    if head is not None and not (head.shape == out["wte.weight"].shape and torch.equal(head, out["wte.weight"])):
        raise UserError(f"{where} has an lm_head.weight that differs from the token embedding; lacy-fast models tie "
                        "them, so this model cannot be loaded as one")
    if not cfg.bias:
        biases = [k for k in out if k.endswith(".bias")]
        if any(bool(out[k].any()) for k in biases):
            raise UserError(f"{where} has non-zero biases but its model config says bias=false; the export is "
                            "damaged or was trained with biases elsewhere")
        for k in biases:
            del out[k]
    # Buffers older transformers versions stored (the causal mask); anything else is unexpected.
    rest = [k for k in plain if not (k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"))]
    if rest:
        raise UserError(f"{where} holds a weight {rest[0]} that a GPT-2 of its config.json has not; the export is "
                        "damaged")
    return out
