"""How far a long copy has come, for people: bytes done of the total, the rate and the time left, as one
log line at intervals (the master's shipping and the worker's fetching each show their own)."""

from __future__ import annotations

import time
from collections.abc import Callable

from cake.memory import gb


def progress_line(done: int, total: int, seconds: float) -> str:
    """'12.0 MB of 48.0 MB (25%), 95.1 MB/s, about 0.4 s left'."""
    rate = done / seconds if seconds > 0 else 0.0
    share = 100 * done / total if total else 100.0
    left = f"about {duration((total - done) / rate)} left" if rate > 0 else "time left unknown"
    return f"{gb(done)} of {gb(total)} ({share:.0f}%), {rate / 1e6:.1f} MB/s, {left}"


def duration(seconds: float) -> str:
    """'0.4 s', '42 s', '3 min 20 s', '1 h 05 min'."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class Progress:
    """Counts bytes towards `total` and says `progress_line` through `say` at most every `every` seconds
    (the first time once a second has passed: a copy done sooner needs no progress, only its summary)."""

    def __init__(self, total: int, say: Callable[[str], None], every: float = 2.0):
        self.total, self.say, self.every = total, say, every
        self.done = 0
        self.t0 = self.shown = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.shown >= self.every and self.done < self.total:
            self.shown = now
            self.say(progress_line(self.done, self.total, now - self.t0))

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.t0

    def summary(self) -> str:
        """'48.0 MB in 0.5 s (96.0 MB/s)'."""
        s = self.seconds
        return f"{gb(self.done)} in {duration(s)} ({self.done / max(s, 1e-9) / 1e6:.1f} MB/s)"
