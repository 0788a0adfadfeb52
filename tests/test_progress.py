"""Progress inside an epoch when the output is not a terminal (a pipe, the flow's log)."""

import logging

from kdas import progress as progress_mod
from kdas.progress import Progress


def test_periodic_line_off_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="kdas.progress")
    progress = Progress(range(4), "teacher epoch 1/2", every=0.0)  # pytest's stderr is no terminal
    for _ in progress:
        progress.step(8, lambda: {"loss": 0.5})
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    assert lines[0].startswith("teacher epoch 1/2: batch 1/4, ")
    assert "images/s" in lines[0] and "loss 0.5000" in lines[0] and "ETA " in lines[0]


def test_figures_are_read_only_when_shown(monkeypatch):
    """Reading a loss off a GPU waits for it: between two lines nothing is read."""
    monkeypatch.setattr(progress_mod, "EVERY_S", 3600.0)
    reads = []
    progress = Progress(range(5), "student epoch 1/1")
    for _ in progress:
        progress.step(8, lambda: reads.append(1) or {"loss": 0.5})
    assert reads == []


def test_quiet_between_periods_and_on_other_ranks(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="kdas.progress")
    monkeypatch.setattr(progress_mod, "EVERY_S", 3600.0)
    for enabled in (True, False):
        progress = Progress([1, 2, 3], "val", enabled=enabled)
        for _ in progress:
            progress.step(1)
    assert caplog.records == []
    assert progress_mod.clock(3725) == "1:02:05" and progress_mod.clock(65) == "1:05"
