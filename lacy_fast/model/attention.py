"""Attention backends: flash-attn when importable and applicable, PyTorch SDPA otherwise.

Two call shapes:
- training (no cache, no padding): causal self-attention over the whole sequence, the fast
  path: flash-attn on CUDA in bf16/fp16, else SDPA with ``is_causal=True`` (which itself
  dispatches to a flash / memory-efficient kernel where it can).
- decoding (KV cache and/or padded rows): queries at absolute positions
  ``start .. start+T-1`` attend to cached keys ``0 .. start+T-1`` that are real tokens,
  through SDPA with an explicit boolean mask.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

_FLASH_AVAILABLE = importlib.util.find_spec("flash_attn") is not None
_flash_attn_func = None


def flash_available() -> bool:
    return _FLASH_AVAILABLE


def _flash():
    global _flash_attn_func
    if _flash_attn_func is None:
        from flash_attn import flash_attn_func

        _flash_attn_func = flash_attn_func
    return _flash_attn_func


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str, dropout: float) -> torch.Tensor:
    """Causal self-attention. q, k, v: (B, H, T, hd) -> (B, H, T, hd)."""
    use_flash = (
        backend in ("auto", "flash")
        and _FLASH_AVAILABLE
        and q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)
    )
    if use_flash:
        # flash-attn takes (B, T, H, hd).
        out = _flash()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout, causal=True)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor, start: int) -> torch.Tensor:
    """Decoding attention. q: (B, H, T, hd) at positions start..start+T-1; k, v: (B, H, S, hd)
    with S = start + T; key_valid: (B, S) bool, False for padding."""
    T, S = q.shape[2], k.shape[2]
    q_pos = torch.arange(start, start + T, device=q.device)  # (T,)
    k_pos = torch.arange(S, device=q.device)  # (S,)
    causal = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    mask = causal[None] & key_valid[:, None, :]  # (B, T, S)
    # A padding query may see no real key at all; let every query see itself so its
    # softmax is defined (its output is never used).
    mask = mask | (k_pos[None, :] == q_pos[:, None])[None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])  # (B, H, T, hd)
