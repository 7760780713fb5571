"""A GPT-style decoder, as in the LaCy paper: learned positions, pre-LayerNorm blocks, GELU
MLP, tied input / output embeddings.

``forward`` returns the final hidden states, never logits: in training the LM head is
applied by the fused LaCy loss (``lacy_fast.kernels.lacy_linear_cross_entropy``) with
``model.head_weight``, so no (tokens x vocabulary) tensor is ever materialised. Generation
asks for logits of the last positions only, through ``model.logits``.

The model is a plain ``nn.Module``: no rank checks, no distributed imports. The training
entry point alone wraps it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lacy_fast.config import ModelConfig
from lacy_fast.errors import UserError
from lacy_fast.model.attention import causal_attention, flash_available, masked_attention

# The embedding / head rows are padded to a multiple of 64: tensor-core tiles and Triton
# blocks divide the vocabulary evenly (nanoGPT's 50257 -> 50304 trick). The padded rows are
# never targets; generation never sees them (``logits`` drops them).
VOCAB_MULTIPLE = 64


def padded_vocab_size(vocab_size: int) -> int:
    return math.ceil(vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


class KVCache:
    """Keys and values of past positions for decoding, preallocated to ``max_len``.

    ``valid`` marks cached positions that hold real tokens (False for left padding), and
    ``n_real`` counts them per row: a row's next position id is its count of real tokens,
    so left-padded rows of a batch see the same positions as they would alone.
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, H, S, hd)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, H, S, hd)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # (B, S)
        self.n_real = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)
        self.length = 0  # positions filled (host int: decoding loops are host-driven anyway)
        self.max_len = max_len

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (e.g. to drop finished sequences from a batch)."""
        self.k, self.v = self.k[:, index], self.v[:, index]
        self.valid, self.n_real = self.valid[index], self.n_real[index]

    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` more positions, at least doubling when it grows.

        Decoding with handoffs of several tokens makes the length hard to bound up front;
        preallocating tight and doubling keeps ``reorder`` (which copies the buffers) cheap.
        """
        need = self.length + extra
        if need <= self.max_len:
            return
        self.max_len = max(2 * self.max_len, need)
        n = self.length
        k = self.k.new_zeros(*self.k.shape[:3], self.max_len, self.k.shape[4])  # (L, B, H, S, hd)
        v = torch.zeros_like(k)
        valid = self.valid.new_zeros(self.valid.shape[0], self.max_len)  # (B, S)
        k[:, :, :, :n], v[:, :, :, :n], valid[:, :n] = self.k[:, :, :, :n], self.v[:, :, :, :n], self.valid[:, :n]
        self.k, self.v, self.valid = k, v, valid


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.backend = cfg.attention

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int, key_valid: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, hd)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, hd)
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            y = masked_attention(q, cache.k[layer, :, :, :start + T], cache.v[layer, :, :, :start + T],
                                 cache.valid[:, :start + T], start)
        elif key_valid is not None:
            y = masked_attention(q, k, v, key_valid, 0)
        else:
            y = causal_attention(q, k, v, backend=self.backend, dropout=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return F.dropout(self.proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # tanh-approximate GELU, as GPT-2.
        return F.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int, key_valid: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, key_valid)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise UserError("model.vocab_size is unset; build the model from a tokenizer (its vocab_size) or set it")
        if cfg.attention == "flash" and not flash_available():
            raise UserError("model.attention=flash but flash-attn is not installed; install lacy-fast[gpu] or use auto")
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.padded_vocab_size = padded_vocab_size(cfg.vocab_size)
        self.wte = nn.Embedding(self.padded_vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def head_weight(self) -> torch.Tensor:
        """The output head, (padded_vocab_size, d_model): the tied token embedding."""
        return self.wte.weight

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, d_model) of tokens ``idx`` (B, T).

        ``cache``: continue from (and extend) a KV cache. ``valid`` (B, T) bool marks real
        tokens (False: left padding); positions count real tokens only.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {start + T} needed")
        if valid is None and cache is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens is longer than max_seq_len={self.cfg.max_seq_len}")
            pos = torch.arange(T, device=idx.device)[None]  # (1, T)
        else:
            valid = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid
            base = cache.n_real[:, None] if cache is not None else 0
            pos = (base + valid.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
            if int(pos.max()) >= self.cfg.max_seq_len:
                raise ValueError(f"position {int(pos.max())} exceeds max_seq_len={self.cfg.max_seq_len}")
            if cache is not None:
                cache.valid[:, start:start + T] = valid
                cache.n_real += valid.sum(1)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        key_valid = valid if cache is None else None
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, key_valid)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)  # (B, T, C)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the real vocabulary (padding rows dropped): (..., vocab_size). Inference only."""
        return F.linear(hidden, self.wte.weight[: self.vocab_size])

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        p = self.wte.weight
        return KVCache(self.cfg.n_layer, batch, self.cfg.n_head, self.cfg.d_model // self.cfg.n_head,
                       max_len or self.cfg.max_seq_len, dtype or p.dtype, p.device)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n

    def estimate_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token, for MFU.

        PaLM (Chowdhery et al. 2022, appendix B): 6 N + 12 L H Q T, with N the parameters
        that multiply activations, L layers, H heads, Q head size, T sequence length. The
        first term is 2 FLOPs per multiply-accumulate, x3 for forward + backward; the second
        counts the attention scores and weighted values (QK^T and AV, not halved for the
        causal mask). Here N = non-embedding parameters + the LM head (tied with the token
        embedding: the lookup costs nothing, the head matmul costs 6 V d per token). The
        LaCy selection and <CALL> terms add O(1) per token and are left out.
        """
        cfg = self.cfg
        n = self.num_params(non_embedding=True) + self.padded_vocab_size * cfg.d_model
        return 6.0 * n + 12.0 * cfg.n_layer * cfg.d_model * seq_len
