"""What a run prints: a header per stage and a progress bar per long stage, in our words.

A bar on a terminal (tqdm); plain lines where there is none (`ray job logs`, CI, a file), so that a
submitted job tells the same story. Ray's own INFO lines are off unless `--verbose` (boneage.distributed.ray_env).
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def line_buffered() -> None:
    """Each printed line out at once, also into a pipe or a file (`ray job logs`, CI), in order with
    stderr: Python buffers a non-terminal stdout by blocks."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)


def interactive() -> bool:
    return sys.stderr.isatty()


def stage(title: str) -> None:
    """A stage's header line."""
    print(f"\n== {title} ==", flush=True)


def fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


class Progress:
    """done/total with elapsed time and ETA: a tqdm bar on a terminal, else a plain line per step
    (at most one every `every` seconds, and always the last)."""

    def __init__(self, total: int, desc: str, unit: str = "it", every: float = 10.0):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done, self.started, self.last_line = 0, time.time(), 0.0
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) if interactive() else None

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)
            return
        now = time.time()
        if self.done >= self.total or now - self.last_line >= self.every:
            self.last_line = now
            elapsed = now - self.started
            eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
            tail = f", ETA {fmt_seconds(eta)}" if self.done < self.total and self.done else ""
            print(f"  {self.desc}: {self.done}/{self.total} {self.unit} ({fmt_seconds(elapsed)}{tail})"
                  + (f"; {note}" if note else ""), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def track(items: Iterable[T], total: int, desc: str, unit: str = "it") -> Iterable[T]:
    """Iterate with a Progress."""
    progress = Progress(total, desc, unit)
    try:
        for item in items:
            yield item
            progress.update()
    finally:
        progress.close()
