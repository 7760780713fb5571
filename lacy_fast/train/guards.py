"""What stops a run between steps: a step whose loss or gradient norm is not finite (noticed
on the device, read at log and save time; docs/design.md says why the run stops rather than
skipping the step), and SIGTERM / SIGINT (a checkpoint, then a clean exit)."""
from __future__ import annotations

import math
import signal
from pathlib import Path

import torch

from lacy_fast.errors import UserError
from lacy_fast.train.dist import Dist, reduce_host


class FiniteGuard:
    """The first step whose loss or gradient norm was NaN or infinite, kept on the device.

    ``record`` is a few device ops per step and never synchronises; ``first_bad`` reads it
    (one synchronisation, done where the loop synchronises anyway: at log and save time)
    and agrees on it across ranks.
    """

    def __init__(self, device: torch.device):
        self._first = torch.zeros((), dtype=torch.int64, device=device)  # 0: every step finite so far

    def record(self, step: int, loss: torch.Tensor, grad_norm: float | torch.Tensor | None) -> None:
        finite = torch.isfinite(loss.detach())
        if isinstance(grad_norm, torch.Tensor):
            finite = finite & torch.isfinite(grad_norm.detach().to(finite.device))
        elif grad_norm is not None and not math.isfinite(grad_norm):
            finite = torch.zeros_like(finite)
        self._first = torch.where((self._first == 0) & ~finite, step, self._first)

    def first_bad(self, d: Dist) -> int | None:
        first = int(self._first)
        first = reduce_host([first if first else 1 << 62], d, "min")[0]
        return None if first == 1 << 62 else first


class Signals:
    """SIGTERM / SIGINT ask for a checkpoint and a clean exit at the next step boundary."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def diverged(step: int, last_saved: int | None, out: Path, what: str = "the loss or the gradient norm") -> UserError:
    """The sentence that stops a run whose ``what`` is not finite at ``step``."""
    if last_saved is None:
        kept = ("no checkpoint was saved before it, so start again with a lower train.lr (or more "
                "train.warmup_steps)")
    else:
        kept = (f"{out}/checkpoints/step_{last_saved:08d} and {out}/export hold the last finite "
                f"state (step {last_saved}), and rerunning with a lower train.lr (or more "
                "train.warmup_steps) resumes from it")
    return UserError(f"training diverged: {what} is not finite at step {step}, and nothing from that step on was "
                     f"saved; {kept}")
