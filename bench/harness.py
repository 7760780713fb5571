"""Shared benchmark harness: timing, peak memory, environment, result rows.

Every script in bench/ measures its providers side by side in one run with ``measure`` and
appends one row per (provider, shape, pass) to ``bench/results/<name>.jsonl`` with the
environment (device, library versions, commit), so a number is never separated from where
it was measured. Compare ratios from one run; absolute times only from a GPU.

Timing: warm-up calls first (compilation and autotuning stay out of the timed region),
then ``reps`` timed calls, each bracketed by a device synchronisation (CUDA events on a
GPU). Reported: median with 20th / 80th percentiles, in milliseconds.

Peak memory: on CUDA, ``max_memory_allocated`` above what was allocated before the call.
On CPU, the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above
its resident set before the call: it counts every allocation, torch's and numpy's alike.
Pin glibc's mmap threshold first (``set_mmap_threshold(PINNED_MMAP_THRESHOLD)``) for peaks
that follow the live buffers.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or platform.machine()
    return f"CPU {model} ({os.cpu_count()} cores)"


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device | str, *, warmup: int = 3, reps: int = 20) -> Timing:
    """Median / p20 / p80 wall time of ``fn()`` in ms, synchronised around every call."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return Timing(statistics.median(times), q[0], q[3], reps)


def _rss_kib() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    return hwm, rss


M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)
GLIBC_MMAP_THRESHOLD = 128 << 10  # glibc's default
PINNED_MMAP_THRESHOLD = 64 << 10


def set_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap threshold; False where there is no glibc.

    glibc raises its threshold on the fly as large blocks are freed, so freed buffers stay
    resident in the heap and hide or inflate a CPU peak; a fixed 64 KiB threshold makes
    every large buffer its own mapping, returned on free, so VmHWM follows the live buffers.
    Setting it also turns the dynamic adjustment off until the process ends.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, nbytes)
    except (OSError, AttributeError):
        return False
    return True


def peak_memory(fn: Callable[[], Any], device: torch.device | str) -> int | None:
    """Bytes allocated at the peak of ``fn()`` beyond what was live before it (None if unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        _, base = _rss_kib()
        fn()
        hwm, _ = _rss_kib()
        return (hwm - base) * 1024
    except (OSError, AttributeError):
        return None


def env_info(device: torch.device | str) -> dict[str, Any]:
    """Where a number was measured: device, versions, commit."""
    info: dict[str, Any] = {
        "device": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": _git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for name in ("triton", "deepspeed", "spacy", "liger_kernel", "cut_cross_entropy", "flash_attn"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = getattr(module, "__version__", "?")
    return info


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        # Rows appended by an earlier run of the same session do not make the code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=root, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(name: str, rows: list[dict[str, Any]], env: dict[str, Any], out: Path | None = None) -> Path:
    """Append rows (each merged with ``env``) to ``bench/results/<name>.jsonl``."""
    path = out or RESULTS / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps({"bench": name, **row, **env}) + "\n")
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A plain aligned table of ``columns`` from ``rows`` on stdout."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    table = [columns] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    for i, r in enumerate(table):
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
