"""Progress inside an epoch: a tqdm bar on a terminal; elsewhere (a pipe, the Prefect flow's
log, CI) one log line every EVERY_S seconds with images/s, the running loss and the epoch's ETA,
so that slow can be told from hung."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator

from tqdm import tqdm

log = logging.getLogger(__name__)

EVERY_S = 30.0  # seconds between two progress lines when the output is not a terminal
REFRESH_S = 1.0  # seconds between two updates of the figures on a terminal bar


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Wraps a loader: `for batch in progress: ...; progress.step(n_images, lambda: {"loss": ...})`.
    The figures are a callable, called only when they are shown: reading a loss off a GPU
    waits for it, so a training step must not do it every batch. `enabled=False` (other
    ranks of a distributed run) shows nothing."""

    def __init__(self, iterable: Iterable, desc: str, *, total: int | None = None, enabled: bool = True, every: float | None = None):
        self.desc, self.enabled = desc, enabled
        self.every = EVERY_S if every is None else every
        self.terminal = enabled and sys.stderr.isatty()
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.bar = tqdm(iterable, desc=desc, total=total, unit="batch", leave=False, disable=not self.terminal)
        self.steps = self.images = 0
        self.started = self.last = time.monotonic()

    def __iter__(self) -> Iterator:
        return iter(self.bar)

    def step(self, images: int, figures: Callable[[], dict[str, float]] | None = None) -> None:
        """One batch done: `images` in it; `figures()` (e.g. the running loss) when shown."""
        self.steps += 1
        self.images += images
        now = time.monotonic()
        if self.terminal:
            if figures is not None and now - self.last >= REFRESH_S:
                self.last = now
                self.bar.set_postfix({k: f"{v:.3f}" for k, v in figures().items()})
            return
        if not self.enabled or now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.started
        parts = [f"batch {self.steps}/{self.total}" if self.total else f"batch {self.steps}", f"{self.images / elapsed:.1f} images/s"]
        parts += [f"{k} {v:.4f}" for k, v in (figures() if figures else {}).items()]
        if self.total:
            parts.append(f"ETA {clock(elapsed / self.steps * (self.total - self.steps))}")
        log.info("%s: %s", self.desc, ", ".join(parts))

    def close(self) -> None:
        self.bar.close()
