"""Training metrics: the per-step rows of metrics.jsonl (one device read per logging
interval; the interval's throughput, MFU, data wait and peak memory on its last row), MFU,
TensorBoard when installed, W&B when asked, and the profiler's trace window.

MFU (model FLOPs utilisation, PaLM appendix B) = achieved model FLOP/s / peak FLOP/s, with
the model's FLOPs from ``GPT.estimate_flops_per_token`` (6N + 12LHQT per token, forward +
backward) and the peak of the device's dense tensor-core throughput in the training
precision, looked up below (or ``train.peak_tflops``). Recomputation and padding are not
credited: it is model FLOPs, not hardware FLOPs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lacy_fast.errors import UserError
from lacy_fast.fileio import write_text
from lacy_fast.method import Targets
from lacy_fast.train.dist import Dist

# Dense (no 2:4 sparsity) peak TFLOP/s from the vendors' data sheets: (bf16, fp32).
# Matched by substring of torch.cuda.get_device_name, first match wins (more specific
# names first). fp32 is the non-tensor-core rate: PyTorch does not use TF32 for matmuls
# unless asked.
PEAK_TFLOPS: list[tuple[str, tuple[float, float]]] = [
    ("H100 PCIe", (756.0, 51.0)),
    ("H100 NVL", (835.0, 60.0)),
    ("H100", (989.4, 67.0)),  # SXM5; also GH200
    ("H200", (989.4, 67.0)),
    ("H800", (989.4, 67.0)),
    ("B200", (2250.0, 80.0)),
    ("A100", (312.0, 19.5)),
    ("A800", (312.0, 19.5)),
    ("L40S", (362.0, 91.6)),
    ("L4", (121.0, 30.3)),
    ("A10G", (70.0, 31.2)),
    ("A10", (125.0, 31.2)),
    ("RTX 4090", (165.2, 82.6)),
    ("RTX 3090", (71.0, 35.6)),
]


def peak_tflops(device: torch.device, precision: str, configured: float = 0.0) -> float | None:
    """Peak TFLOP/s of one device in ``precision`` ('bf16' | 'fp32'); None when unknown (CPU)."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, fp32) in PEAK_TFLOPS:
        if key in name:
            return bf16 if precision == "bf16" else fp32
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None, world_size: int) -> float | None:
    if peak is None or tokens_per_s <= 0:
        return None
    return flops_per_token * tokens_per_s / (peak * 1e12 * world_size)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: CUDA allocator peak, else the resident-set peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class StepStats:
    """Device-side sums of one optimizer step (read at log time)."""

    sums: torch.Tensor  # (6,) loss, loss_gt*n, n_gt, loss_call*n, n_call, n_valid
    n_facts: int = 0
    gt_tokens: int = 0
    lr: float = 0.0
    grad_norm: float | torch.Tensor | None = None  # DeepSpeed's (host or device), or ours (device)


def micro_sums(loss: torch.Tensor, stats: dict[str, torch.Tensor], targets: torch.Tensor, strategy: str,
               rule: Targets, renormalize: bool = True) -> torch.Tensor:
    """(6,) device sums of a micro-batch: loss, gt loss sum, n_gt, CALL loss sum, n_call, n_valid.
    The gt loss is the one the objective trained on: the renormalised nll, or plain
    cross-entropy for strategy none and for objective.renormalize=false."""
    with torch.no_grad():
        valid = rule.valid(targets.flatten())  # (N,) the op's valid targets
        is_call = stats["is_call"] & valid
        gt = valid & ~is_call
        p_call = stats["p_call"].float()
        gt_loss = stats["nll"].float()
        if strategy == "none" or not renormalize:  # plain CE over the full vocabulary: -log p(y)
            gt_loss = gt_loss - torch.log1p(-p_call.clamp(max=1 - 1e-7))
        call_loss = -torch.log(p_call.clamp(min=1e-30))
        return torch.stack([
            loss.detach().float(),
            torch.where(gt, gt_loss, 0).sum(), gt.sum().float(),
            torch.where(is_call, call_loss, 0).sum(), is_call.sum().float(),
            valid.sum().float(),
        ])


def step_rows(pending: list[StepStats], last_step: int, grad_accum: int, d: Dist,
              precision: str) -> list[dict[str, Any]]:
    """metrics.jsonl rows of the steps in ``pending`` (the last is ``last_step``): one device
    read for the interval."""
    import torch.distributed as dist

    sums = torch.stack([p.sums for p in pending])  # (S, 6)
    if d.world > 1:
        sums = sums.clone()
        dist.all_reduce(sums)
        sums[:, 0] /= d.world  # loss: mean of the ranks' means
    values = sums.tolist()
    norms = [p.grad_norm for p in pending]
    on_device = [i for i, x in enumerate(norms) if isinstance(x, torch.Tensor)]
    if on_device:
        for i, value in zip(on_device, torch.stack([norms[i].float() for i in on_device]).tolist()):
            norms[i] = value
    first = last_step - len(pending) + 1
    rows = []
    for i, (p, v, norm) in enumerate(zip(pending, values, norms)):
        loss, gt_sum, n_gt, call_sum, n_call, n_valid = v
        rows.append({
            "step": first + i,
            "loss": loss / grad_accum,
            "loss_gt": gt_sum / n_gt if n_gt else None,
            "loss_call": call_sum / n_call if n_call else None,
            "call_rate": n_call / n_valid if n_valid else 0.0,
            "fact_fraction": p.n_facts / n_valid if n_valid else 0.0,
            "gt_tokens": p.gt_tokens,
            "lr": p.lr,
            "grad_norm": norm,
            "precision": precision,
        })
    return rows


def interval_measures(tokens: int, elapsed: float, wait: float, flops_per_token: float, peak: float | None,
                      d: Dist) -> dict[str, Any]:
    """Throughput, MFU, data-wait share and peak memory of one logging interval (``tokens``
    trained in ``elapsed`` seconds, ``wait`` of them waiting for data), for its last row."""
    tokens_per_s = tokens / max(elapsed, 1e-9)
    return {"tokens_per_s": tokens_per_s, "mfu": mfu(flops_per_token, tokens_per_s, peak, d.world),
            "data_wait": wait / max(elapsed, 1e-9), "peak_mem_gb": peak_memory_bytes(d.device) / 2**30}


def profiler(first_step: int, out: Path, d: Dist):
    """A torch profiler whose trace is written to OUT/profile when its window ends."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if d.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    trace_dir = out / "profile"
    trace_dir.mkdir(parents=True, exist_ok=True)

    def on_ready(prof) -> None:
        prof.export_chrome_trace(str(trace_dir / f"trace_rank{d.rank}_step{first_step}.json"))

    return torch.profiler.profile(activities=activities, record_shapes=True, with_stack=False,
                                  on_trace_ready=on_ready)


class MetricsWriter:
    """Appends one JSON object per step to ``metrics.jsonl`` (and TensorBoard scalars).

    Only rank 0 writes. A resumed run first drops rows at or past the resume step (left by
    the part of a killed run that was never checkpointed), so the file never holds a step
    twice.
    """

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int, tensorboard: bool = True,
                 wandb: tuple[str, dict[str, Any]] | None = None):
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self.tb_state = "off (train.tensorboard=false)" if not tensorboard else "on"
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                self.tb_state = "off (not installed: pip install lacy-fast[tensorboard])"
            else:
                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step or None)
                self.tb_state = f"on ({out_dir / 'tensorboard'})"
        if wandb is not None:
            self.wandb = _start_wandb(out_dir, *wandb)

    def describe(self) -> str:
        """The loggers, for the banner: TensorBoard on, off or not installed; W&B on or off."""
        if not self.enabled:
            return ""
        return f"TensorBoard {self.tb_state}; W&B " + (f"on ({self.wandb.name})" if self.wandb is not None else
                                                         "off (train.wandb=true to log there)")

    def _truncate(self, resume_step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= resume_step:
                    kept.append(line)
            except json.JSONDecodeError:
                break  # a torn last line from a kill
        write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not self.enabled or not rows:
            return
        text = "".join(json.dumps(_finite(row)) + "\n" for row in rows)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(text)
        if self.tb is not None:
            for row in rows:
                for key, value in row.items():
                    if key != "step" and isinstance(value, (int, float)) and value is not None:
                        self.tb.add_scalar(f"train/{key}", value, row["step"])
            self.tb.flush()
        if self.wandb is not None:
            for row in rows:
                self.wandb.log({f"train/{k}": v for k, v in row.items()
                                if k != "step" and isinstance(v, (int, float)) and v is not None}, step=row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _start_wandb(out_dir: Path, project: str, config: dict[str, Any]):
    """A Weights & Biases run named after out_dir (imported only when train.wandb is set)."""
    try:
        import wandb
    except ImportError:
        raise UserError("train.wandb=true needs the wandb package; pip install wandb (and wandb login), or set "
                        "train.wandb=false")
    return wandb.init(project=project, name=out_dir.name, dir=str(out_dir), config=config, resume="allow",
                      id=_wandb_id(out_dir))


def _wandb_id(out_dir: Path) -> str:
    """A W&B run id fixed by out_dir, so a resumed run continues the same W&B run."""
    import hashlib

    return hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:16]


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: write them as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
