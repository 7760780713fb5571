"""Will the model fit? An estimate made before any weight is allocated, so that a model too
large for the machine is one sentence instead of an allocator traceback.

Training with Adam holds, per parameter, the weights, their gradients and two moments (16
bytes in fp32; in bf16, 2 + 2 bytes plus an fp32 master copy and the moments: 16 too).
ZeRO splits the optimizer state over ranks from stage 1 on, the gradients from stage 2 and
the weights at stage 3. Activations come on top, so the estimate is a lower bound: it
refuses what cannot fit, it does not promise what can. The model is built on the host
first (fp32), so the host needs its weights too when training runs on a GPU.
"""
from __future__ import annotations

import math
import os

import torch

from lacy_fast.config import ModelConfig
from lacy_fast.errors import UserError
from lacy_fast.progress import human

GIB = 2**30


def estimate_params(cfg: ModelConfig) -> int:
    """Parameters of ``GPT(cfg)`` without building it (the formula of gpt.py's layers)."""
    from lacy_fast.model.gpt import padded_vocab_size

    d, bias = cfg.d_model, int(cfg.bias)
    block = 12 * d * d + bias * 9 * d + (2 + 2 * bias) * d  # qkv, proj, fc, proj (+ biases), two LayerNorms
    return (padded_vocab_size(cfg.vocab_size) + cfg.max_seq_len) * d + cfg.n_layer * block + (1 + bias) * d


def training_bytes(params: int, zero_stage: int, world: int) -> int:
    """Bytes a rank holds for weights, gradients and Adam's state (activations not counted)."""
    weights, grads, optim = 4.0, 4.0, 8.0
    if zero_stage >= 1:
        optim /= world
    if zero_stage >= 2:
        grads /= world
    if zero_stage >= 3:
        weights /= world
    return math.ceil(params * (weights + grads + optim))


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` (the host's available memory for the CPU); None: unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(cfg: ModelConfig, zero_stage: int, world: int, device: torch.device) -> None:
    """Refuse in one sentence a model whose training state cannot fit this rank's memory."""
    params = estimate_params(cfg)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # ranks sharing this host
    needs = [(device, training_bytes(params, zero_stage, world) * (local if device.type == "cpu" else 1))]
    if device.type != "cpu":
        needs.append((torch.device("cpu"), 4 * params * local))  # built on the host first
    for where, need in needs:
        free = available_bytes(where)
        if free is not None and need > free:
            what = "host" if where.type == "cpu" else f"{where} GPU"
            raise UserError(
                f"a model of {human(params)} parameters (model.d_model={cfg.d_model}, model.n_layer={cfg.n_layer}) "
                f"needs at least {need / GIB:,.1f} GiB of {what} memory to train, before activations, but "
                f"{free / GIB:,.1f} GiB is free; use a smaller model.d_model or model.n_layer, or more ranks with "
                "zero_stage=3")
