"""Progress as plain lines, for logs without a terminal: done/total, elapsed time, rate and ETA.

Bars redraw a line with carriage returns, which a pod's log keeps as one endless line; these lines
come at each tenth of the work and at least every ``every`` seconds, whichever is first.
"""

from __future__ import annotations

import time


class Progress:
    def __init__(self, what: str, total: int, unit: str = "rows", every: float = 30.0, start: int = 0):
        # Nothing time-dependent until the first update: datasets hashes a map function's closure for its cache.
        self.what, self.total, self.unit, self.every, self.start = what, total, unit, every, start
        self.started: float | None = None
        self.last_shown = 0.0
        self.next_tenth = 1

    def begin(self) -> None:
        self.started = self.last_shown = time.time()

    def update(self, done: int, extra: str = "") -> str | None:
        """Prints (and returns) a line when one is due."""
        now = time.time()
        if self.started is None:
            self.begin()
        tenth = done * 10 // max(self.total, 1)
        if done < self.total and tenth < self.next_tenth and now - self.last_shown < self.every:
            return None
        self.next_tenth, self.last_shown = tenth + 1, now
        clock = timing(now - self.started, done - self.start, self.total - done, self.unit)
        line = f"{self.what}: {done}/{self.total} {self.unit}{extra}, {clock}"
        print(line, flush=True)
        return line


def timing(elapsed: float, done: int, left: int, unit: str) -> str:
    """'12s elapsed, 3.4 rows/s, ETA 1m05s' (a slow rate as seconds per unit)."""
    if done <= 0 or elapsed <= 0:
        return f"{duration(elapsed)} elapsed"
    rate = done / elapsed
    if rate >= 1:
        shown = f"{rate:,.0f} {unit}/s" if rate >= 100 else f"{rate:.3g} {unit}/s"
    else:
        shown = f"{1 / rate:.3g} s/{unit.rstrip('s')}"
    eta = f", ETA {duration(left / rate)}" if left > 0 else ""
    return f"{duration(elapsed)} elapsed, {shown}{eta}"


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
