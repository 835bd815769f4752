"""A dependency-free progress bar for long loads: redrawn in place on a terminal, a few log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


class Progress:
    """Counts items and bytes (``unit`` names the items where no bytes are counted); ``update`` after each item,
    ``close`` at the end."""

    def __init__(self, total: int, label: str, enabled: bool = True, unit: str | None = None):
        self.unit = unit
        self.total = max(total, 1)
        self.label = label
        self.done = 0
        self.bytes = 0
        self.enabled = enabled
        self._tty = enabled and sys.stderr.isatty()
        self._t0 = time.perf_counter()
        self._next_log = 0.25

    def update(self, nbytes: int = 0, n: int = 1) -> None:
        self.done += n
        self.bytes += nbytes
        if not self.enabled:
            return
        frac = self.done / self.total
        if self._tty:
            width = 30
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            tail = self.unit or f"{self.bytes / 2**20:,.0f} MiB"
            sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {tail}")
            sys.stderr.flush()
        elif frac >= self._next_log:
            log.info("%s: %d/%d %s", self.label, self.done, self.total, self.unit or f"({self.bytes / 2**20:.0f} MiB)")
            self._next_log += 0.25

    def close(self) -> None:
        if self._tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
        if self.enabled:
            what = f"{self.done} {self.unit}" if self.unit else f"{self.done} items, {self.bytes / 2**20:.1f} MiB"
            log.info("%s: %s in %.2fs", self.label, what, time.perf_counter() - self._t0)
