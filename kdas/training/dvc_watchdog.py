"""A training under `dvc repro` stops when that dvc is gone: a SIGKILLed dvc runs no cleanup and
forwards nothing, and its training ran on as an orphan, outside any DVC run."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


def stop_with_dvc(poll_s: float = 2.0) -> None:
    """Under `dvc repro` (DVC sets DVC_STAGE): SIGTERM this process once that dvc is gone,
    looked at every `poll_s` seconds from a thread (the training ends through its cleanups)."""
    if "DVC_STAGE" not in os.environ:
        return
    dvc = next((p for p in psutil.Process().parents() if any(Path(arg).name == "dvc" for arg in cmdline(p))), None)
    if dvc is None:
        return

    def watch() -> None:
        while True:
            try:
                if not dvc.is_running() or dvc.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(poll_s)
        log.warning("dvc (pid %d) that ran this stage is gone: stopping", dvc.pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="dvc-watch", daemon=True).start()


def cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return []
