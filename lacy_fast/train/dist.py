"""The run's processes: a DeepSpeed world (of one without a launcher), the accelerator it
uses, and host-side sums over ranks on a gloo group (no device synchronisation)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

_SINGLE_PROCESS_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    control: Any = None  # gloo group for host-side scalars (None: single process)
    # A plain `lacy-fast train` (no launcher) makes a world of one itself; it owns that
    # process group and the environment it set, and gives both back at the end, so a
    # process that trains several times (the demo) or starts other runs stays clean.
    owned_env: dict[str, str | None] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def teardown(self) -> None:
        if self.owned_env is None:
            return
        import deepspeed.comm
        import torch.distributed as dist

        if dist.is_initialized():  # DeepSpeed's own cached groups go with it
            deepspeed.comm.destroy_process_group()
        for key, value in self.owned_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _select_accelerator() -> None:
    """DeepSpeed picks its accelerator once, at its first ``get_accelerator()`` (which
    importing it runs): ``DS_ACCELERATOR`` if set, else CUDA when there is a device, else
    the CPU with a warning that a GPU may have gone undetected. Without CUDA the CPU is
    chosen explicitly here, when a run starts (never at import), and the environment is
    given back as it was: DeepSpeed keeps its choice for the process."""
    if "DS_ACCELERATOR" in os.environ or torch.cuda.is_available():
        return
    os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        from deepspeed.accelerator import get_accelerator

        get_accelerator()
    finally:
        os.environ.pop("DS_ACCELERATOR", None)


def _skip_cpu_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op when it first
    initialises (about 45 s on a fresh machine). Gloo does that job for the CPU runs this
    project has (tests, the demo), so the op is marked unavailable unless LACY_FAST_DS_SHM=1.

    This writes DeepSpeed's own table of compatible ops because no public switch exists:
    in DeepSpeed 0.19.8 ``comm.torch.build_shm_op`` consults only
    ``deepspeed.ops.__compatible_ops__``; ``DS_BUILD_SHM_COMM`` governs ahead-of-time
    builds at install time, not this JIT build, and ``init_distributed`` takes no option.
    """
    if os.environ.get("LACY_FAST_DS_SHM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def setup_distributed() -> Dist:
    """This process's rank of the run (a world of one without a launcher), with DeepSpeed's
    accelerator chosen and its logging quietened first."""
    _select_accelerator()
    _quiet_deepspeed()
    import deepspeed
    import torch.distributed as dist

    owned_env = None
    if "RANK" not in os.environ:  # a plain `lacy-fast train`: a world of one
        owned_env = {key: os.environ.get(key) for key in _SINGLE_PROCESS_ENV}
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        _skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    control = None
    if world > 1:
        control = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    return Dist(rank, world, local_rank, device, control, owned_env)


def reduce_host(values: list[int], d: Dist, op: str = "sum") -> list[int]:
    """Sum (or min, max) small host integers over ranks (gloo, no device sync)."""
    if d.control is None:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op],
                    group=d.control)
    return tensor.tolist()


def _quiet_deepspeed() -> None:
    import logging

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    if _lr_warning_filter not in ds_logger.filters:
        ds_logger.addFilter(_lr_warning_filter)


def _lr_warning_filter(record) -> bool:
    # WarmupCosineLR asks itself for a learning rate while it is being built; not a problem.
    return "before it has started" not in record.getMessage()

