"""Progress of long work on one stderr line: counts, rates, ETA.

    bar = Progress("prepare", total=n_docs, unit="docs")
    for doc in docs:
        ...
        bar.update(1, tokens=len(ids))
    bar.close()

prints ``prepare  1.2k/20k docs (6%) | 512 docs/s | 301k tokens/s | ETA 0:00:36``. On a
terminal the line is redrawn in place; in a log (not a tty) a line is written every
``log_interval`` seconds, so CI logs and `nohup` files stay readable.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def human(x: float) -> str:
    """1234 -> '1.2k', 3.4e6 -> '3.4M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}" if float(x).is_integer() or abs(x) >= 10 else f"{x:.1f}"


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(
        self,
        label: str,
        total: float | None = None,
        unit: str = "items",
        *,
        initial: float = 0,
        stream: TextIO | None = None,
        enabled: bool = True,
        tty_interval: float = 0.25,
        log_interval: float = 10.0,
    ):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.count = initial
        self._start_count = initial  # resumed work is not counted in the rate
        self.extra: dict[str, float] = {}
        self.note = ""
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = tty_interval if self.tty else log_interval
        self.start = self._last = time.perf_counter()

    def update(self, n: float = 1, **extra: float) -> None:
        self.count += n
        for key, value in extra.items():
            self.extra[key] = self.extra.get(key, 0) + value
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def set_note(self, note: str) -> None:
        """A short free-form suffix (e.g. the current loss)."""
        self.note = note

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return (self.count - self._start_count) / elapsed if elapsed > 0 else 0.0

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        done = self.count - self._start_count
        parts = [f"{self.label}  {human(self.count)}"]
        if self.total:
            parts[0] += f"/{human(self.total)} {self.unit} ({100 * self.count / self.total:.0f}%)"
        else:
            parts[0] += f" {self.unit}"
        parts.append(f"{human(done / elapsed)} {self.unit}/s")
        parts += [f"{human(v / elapsed)} {k}/s" for k, v in self.extra.items()]
        if self.total and done > 0:
            parts.append(f"ETA {duration((self.total - self.count) * elapsed / done)}")
        else:
            parts.append(f"elapsed {duration(elapsed)}")
        if self.note:
            parts.append(self.note)
        return " | ".join(parts)

    def _draw(self, now: float) -> None:
        if not self.enabled:
            return
        text = self.line(now)
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        text = self.line(now).replace(" | ETA 0:00:00", "")
        self.stream.write(("\r\033[K" if self.tty else "") + text + f" | done in {duration(now - self.start)}\n")
        self.stream.flush()
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
