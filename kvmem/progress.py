"""Progress of long commands: a bar with rate and ETA on a terminal (tqdm), plain lines otherwise.

Plain lines (logs, CI, pipes) carry the same facts: ``[3/10] message (0.42/s, ETA 17s)``.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class Progress:
    def __init__(self, total: int, unit: str = "item", stream: TextIO | None = None, bar: bool | None = None, clock=time.monotonic):
        """bar: None = a bar only when ``stream`` is a terminal."""
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.clock = clock
        self.started = clock()
        use_bar = self.stream.isatty() if bar is None else bar
        self._bar = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit, file=self.stream, dynamic_ncols=True)

    def rate_and_eta(self) -> tuple[float, float | None]:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.done / elapsed
        return rate, ((self.total - self.done) / rate if rate > 0 else None)

    def step(self, message: str) -> None:
        """One item finished; ``message`` says how."""
        self.done += 1
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
            self._bar.update(1)
            return
        rate, eta = self.rate_and_eta()
        remaining = f", ETA {_duration(eta)}" if eta is not None and self.done < self.total else ""
        print(f"[{self.done}/{self.total}] {message} ({rate:.2f}/s{remaining})", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
