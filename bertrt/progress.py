"""A one-line progress bar for long command-line runs.

tqdm would do, but the runtime keeps its dependencies to onnxruntime, tokenizers and numpy.
"""

from __future__ import annotations

import time
from typing import TextIO

WIDTH = 24


class Progress:
    """Redraw `done/total` (bytes of input, say) and a text count on one line of `stream`."""

    def __init__(
        self, stream: TextIO, total: int | None, enabled: bool = True, interval: float = 0.5
    ) -> None:
        self.stream = stream
        self.total = total
        self.enabled = enabled
        self.interval = interval
        self.started = time.monotonic()
        self.last_drawn = float("-inf")
        self.done = 0
        self.texts = 0

    def update(self, done: int, texts: int) -> None:
        """Add `done` units of work and `texts` texts; redraw at most once per interval."""
        self.done += done
        self.texts += texts
        now = time.monotonic()
        if self.enabled and now - self.last_drawn >= self.interval:
            self.last_drawn = now
            self.stream.write("\r" + self.render(now))
            self.stream.flush()

    def render(self, now: float) -> str:
        """The bar as text, e.g. ` 42% |##########              | 4200 texts, 812 texts/s`."""
        elapsed = max(now - self.started, 1e-9)
        counts = f"{self.texts} texts, {self.texts / elapsed:.0f} texts/s"
        if not self.total:
            return counts
        fraction = min(self.done / self.total, 1.0)
        filled = round(fraction * WIDTH)
        return f"{fraction:4.0%} |{'#' * filled}{' ' * (WIDTH - filled)}| {counts}"

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self.enabled:
            self.stream.write("\r" + self.render(time.monotonic()) + "\n")
            self.stream.flush()
