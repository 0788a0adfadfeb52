"""Training throughput of teacher and student, and the share of time spent waiting for data.

Runs the real engine (kdas.training) on synthetic frames for a few steps per setting and
prints a table. Example:

    python benchmarks/bench_training.py --sizes 128 224 --steps 6
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
from pathlib import Path

import torch

from kdas.checkpoint import save_model
from kdas.config import SplitParams, SynthParams, load_params
from kdas.data.manifest import build_manifest
from kdas.data.synth import write_synth
from kdas.models import create_model
from kdas.training import TrainJob, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--steps", type=int, default=6, help="batches per measurement (after one warm-up epoch step)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = args.batch_size * (args.steps + 1) * 2
        write_synth(tmp / "raw" / "synth", SynthParams(n_images=n, size=max(args.sizes), empty_fraction=0.1, seed=0))
        manifest = build_manifest(tmp / "raw", ["synth"], SplitParams(val_fraction=0.05, test_fraction=0.0, seed=0), near_duplicate_distance=params.validation.near_duplicate_distance)
        for size in args.sizes:
            teacher_file = save_model(tmp / f"teacher{size}.pt", create_model(params.model.teacher), arch=params.model.teacher, image_size=size)
            settings = [("teacher", params.model.teacher, "none", None), ("student", params.model.student, "none", None),
                        ("student", params.model.student, "kdas", teacher_file)]
            for role, arch, method, teacher in settings:
                tp = dataclasses.replace(params.train, image_size=size, batch_size=args.batch_size, epochs=2, workers=args.workers, multiscale=[1.0])
                job = TrainJob(role=role, arch=arch, manifest=manifest, out_dir=tmp / f"{role}-{method}-{size}", train=tp,
                               distill=dataclasses.replace(params.distill, method=method), teacher=teacher, device=args.device, max_steps=args.steps)
                last = train(job).history[-1]  # epoch 2: warm caches and allocator
                rows.append((role, arch, method, size, last["images_per_s"], 1000 / last["images_per_s"], last["data_wait_share"]))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\ntraining throughput on {device}, batch {args.batch_size}, {args.workers} loader workers, {args.steps} steps")
    print(f"{'role':<8} {'model':<14} {'loss':<5} {'px':>4} {'images/s':>9} {'ms/image':>9} {'data wait':>10}")
    for role, arch, method, size, ips, ms, wait in rows:
        print(f"{role:<8} {arch:<14} {method:<5} {size:>4} {ips:>9.2f} {ms:>9.1f} {wait:>9.1%}")


if __name__ == "__main__":
    main()
