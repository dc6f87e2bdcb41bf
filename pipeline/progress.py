"""Progress of long commands: a tqdm bar on a terminal, a plain line now and then in a log file."""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class PlainBar:
    """The part of tqdm's interface the commands use, printing one line every `seconds` and at the end
    (unless the last line already gave the final count)."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", seconds: float = 30.0,
                 stream=None):
        self.total, self.desc, self.unit, self.seconds = total, desc, unit, seconds
        self.stream = stream or sys.stderr
        self.n, self.start = 0, time.monotonic()
        self.last, self.shown = self.start, None  # the count the last line showed

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.seconds:
            self.print()

    def print(self) -> None:
        self.last, self.shown = time.monotonic(), self.n
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        print(f"{self.desc}: {done} {self.unit}s, {self.last - self.start:.0f} s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.shown != self.n:  # the last update's line already said it all
            self.print()


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False):
    """tqdm on a terminal; otherwise a `PlainBar` (or nothing to show at all when `disable`)."""
    if disable:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit)
    return PlainBar(total, desc, unit)
