"""Data-parallel training from the same command: with train.nproc_per_node > 1, `kdas train`
runs itself again under torchrun, one copy per process (NCCL on GPUs, gloo on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def relaunch_under_torchrun(nproc_per_node: int) -> int:
    """This command line again under torchrun; its exit status."""
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
                            "-m", "kdas", *sys.argv[1:]])
