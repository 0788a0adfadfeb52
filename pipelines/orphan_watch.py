"""The flow's watcher (pipelines.retrain.children_die_with_this_process): a SIGKILL runs no code
of the flow's, so this process of its own notes what the flow has started (its descendants,
every half second) and, once the flow is gone, stops them as the flow would (the stages'
process groups and Prefect's temporary server: SIGTERM, then SIGKILL after the grace).

    python -m pipelines.orphan_watch FLOW_PID FLOW_GROUP GRACE_S
"""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil


def send(procs: list[psutil.Process], sig: int, flow_group: int) -> None:
    for p in procs:
        try:
            group = os.getpgid(p.pid)
            if group != flow_group:  # a stage's own group: what it started since the last look too
                os.killpg(group, sig)
            p.send_signal(sig)
        except (OSError, psutil.Error):
            pass


def main(argv: list[str]) -> None:
    flow, flow_group, grace = int(argv[0]), int(argv[1]), float(argv[2])
    seen: list[psutil.Process] = []
    while os.getppid() == flow:
        try:
            seen = [p for p in psutil.Process(flow).children(recursive=True) if p.pid != os.getpid()]
        except psutil.NoSuchProcess:
            break
        time.sleep(0.5)
    left = [p for p in seen if p.is_running()]  # (by pid and start time: a pid used again is not ours)
    send(left, signal.SIGTERM, flow_group)
    send(psutil.wait_procs(left, timeout=grace)[1], signal.SIGKILL, flow_group)


if __name__ == "__main__":
    main(sys.argv[1:])
