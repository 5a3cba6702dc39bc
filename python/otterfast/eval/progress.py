"""A tiny progress bar with rate and ETA on stderr (no tqdm dependency)."""

from __future__ import annotations

import sys
import time


def _fmt(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, total: int, desc: str = "", stream=None, min_interval: float = 0.2, width: int = 24):
        self.total, self.desc, self.n = max(int(total), 0), desc, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        # Off a terminal, redraws become lines; throttle them harder so logs stay readable.
        self.min_interval = min_interval if self.tty else max(min_interval, 10.0)
        self.width = width
        self.t0 = self._last = time.monotonic()

    def line(self) -> str:
        el = time.monotonic() - self.t0
        rate = self.n / el if el > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        frac = self.n / self.total if self.total else 1.0
        filled = int(self.width * frac)
        bar = "#" * filled + "-" * (self.width - filled)
        eta_s = _fmt(eta) if eta == eta else "?"
        return (f"{self.desc} [{bar}] {self.n}/{self.total} {100 * frac:3.0f}% "
                f"{rate:.2f} it/s elapsed {_fmt(el)} ETA {eta_s}")

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if now - self._last >= self.min_interval or self.n >= self.total:
            self._last = now
            self._draw()

    def _draw(self, end: str = "") -> None:
        if self.tty:
            self.stream.write("\r" + self.line() + end)
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self._draw("\n")
        elif self.n < self.total or self.total == 0:
            self._draw()
