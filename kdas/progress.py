"""Progress of long work (a training epoch, validation, evaluation, decoding a dataset): a
tqdm bar on a terminal; elsewhere (a pipe, the Prefect flow's log, CI) one log line every
EVERY_S seconds with the rate, the running figures (a loss) and the ETA, so that slow can be
told from hung."""

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
    """Wraps an iterable of steps: `for batch in progress: ...; progress.step(n_images, lambda: {"loss": ...})`.
    `step_name` names a step in the log line ("batch 3/40"), `unit` what `step` counts ("12.5 images/s").
    The figures are a callable, called only when they are shown: reading a loss off a GPU
    waits for it, so a training step must not do it every batch. `enabled=False` (other
    ranks of a distributed run) shows nothing."""

    def __init__(self, iterable: Iterable, desc: str, *, total: int | None = None, enabled: bool = True, every: float | None = None,
                 step_name: str = "batch", unit: str = "images"):
        self.desc, self.enabled, self.step_name, self.unit = desc, enabled, step_name, unit
        self.every = EVERY_S if every is None else every
        self.terminal = enabled and sys.stderr.isatty()
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.bar = tqdm(iterable, desc=desc, total=total, unit=step_name, leave=False, disable=not self.terminal)
        self.steps = self.count = 0
        self.started = self.last = time.monotonic()

    def __iter__(self) -> Iterator:
        return iter(self.bar)

    def step(self, count: int = 1, figures: Callable[[], dict[str, float]] | None = None) -> None:
        """One step done, of `count` units (images); `figures()` (e.g. the running loss) when shown."""
        self.steps += 1
        self.count += count
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
        done = f"{self.step_name} {self.steps}/{self.total}" if self.total else f"{self.step_name} {self.steps}"
        parts = [done, f"{self.count / elapsed:.1f} {self.unit}/s"]
        parts += [f"{k} {v:.4f}" for k, v in (figures() if figures else {}).items()]
        if self.total:
            parts.append(f"ETA {clock(elapsed / self.steps * (self.total - self.steps))}")
        log.info("%s: %s", self.desc, ", ".join(parts))

    def close(self) -> None:
        self.bar.close()
