"""The CUDA paths on a GPU: training steps of the real engine (AMP on and off, channels_last)
and evaluation, for the paper's models and the real-cpu profile's, on synthetic frames.

    python benchmarks/bench_cuda.py [--size 352] [--steps 20]

Prints a table: images/s of training (teacher alone and student distilled with KDAS),
evaluation images/s and latency, peak GPU memory. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from kdas.checkpoint import save_model
from kdas.config import DistillParams, RoleModel, SplitParams, SynthParams, TrainParams
from kdas.data.manifest import build_manifest
from kdas.data.synth import write_synth
from kdas.evaluation import measure_efficiency
from kdas.inference import Segmenter
from kdas.models import create_model
from kdas.training import TrainJob, train

PAIRS = {  # teacher, student
    "paper (PVTv2-B2 -> B0)": (RoleModel("polyp_pvt", "pvt_v2_b2", "none", 0.1), RoleModel("polyp_pvt", "pvt_v2_b0", "none", 0.1)),
    "real-cpu (Lite2 -> Lite0)": (RoleModel("polyp_pvt", "tf_efficientnet_lite2", "none", 0.1),
                                  RoleModel("polyp_pvt", "tf_efficientnet_lite0", "none", 0.1)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=352)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="training batches per measurement")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    tmp = Path(tempfile.mkdtemp())
    write_synth(tmp / "raw" / "synth", SynthParams(n_images=args.batch * (args.steps + 2), size=args.size, empty_fraction=0.1, seed=0))
    manifest = build_manifest(tmp / "raw", ["synth"], SplitParams(val_fraction=0.05, test_fraction=0.0, seed=0), near_duplicate_distance=0)
    base = TrainParams(image_size=args.size, batch_size=args.batch, epochs=1, lr=1e-4, weight_decay=1e-4, grad_clip=0.5, multiscale=[1.0],
                       lr_decay=1.0, decay_epochs=50, patience=20, seed=0, workers=8, nproc_per_node=1, amp=True, augment=True, weighted_bce=True)
    kdas = DistillParams(method="kdas", attention="spatial", alpha=0.3, tau=2.0, pool_stride=8, seed=0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.size} px, batch {args.batch}, {args.steps} steps")
    print(f"{'models':<28} {'run':<22} {'amp':<5} {'train img/s':>11} {'data wait':>9} {'peak GB':>8}")
    for label, (teacher_spec, student_spec) in PAIRS.items():
        teacher_file = save_model(tmp / "teacher.pt", create_model(teacher_spec.arch, backbone=teacher_spec.backbone), image_size=args.size)
        for amp in (None, True, False):  # None: a warm-up run (cudnn autotune, lazy init), not printed
            for role, spec, distill, teacher in (("teacher", teacher_spec, dataclasses.replace(kdas, method="none"), None),
                                                 ("student kdas", student_spec, kdas, teacher_file)):
                torch.cuda.reset_peak_memory_stats()
                job = TrainJob(role=role.split()[0], model=spec, manifest=manifest, out_dir=tmp / f"{role}-{amp}",
                               train=dataclasses.replace(base, amp=bool(amp)), distill=distill, teacher=teacher, max_steps=args.steps)
                started = time.perf_counter()
                result = train(job)
                if amp is None:
                    continue
                h = result.history[0]
                print(f"{label:<28} {role:<22} {str(amp):<5} {h['images_per_s']:>11.1f} {h['data_wait_share']:>9.0%} "
                      f"{torch.cuda.max_memory_allocated() / 2**30:>8.2f}"
                      f"   ({time.perf_counter() - started:.0f} s with validation)")
        seg = Segmenter.load(tmp / "student kdas-True" / "best.pt", "cuda")
        e = measure_efficiency(seg, args.batch, repeats=20)
        print(f"{label:<28} {'evaluate student (fp32)':<22} {'-':<5} {e.throughput:>11.1f} {'':>9} {e.peak_memory_mb / 1024:>8.2f}"
              f"   latency {e.latency_ms:.2f} ms at batch 1, {e.params_m:.2f}M params, {e.gmacs:.2f} GMACs")


if __name__ == "__main__":
    main()
