"""The training engine on a GPU, step by step from the engine as it was to the engine as it is.

Per role (the PVTv2-B2 teacher alone; the PVTv2-B0 student distilled with KDAS from its
frozen B2 teacher), in one run, each in a fresh process:

    V0  the engine at REV (`--before`), fp32, as it ran then
    V1  V0 + TF32 matmuls
    V2  V0 with its bf16 autocast on (how the old engine ran AMP)
    V3  this tree as it runs by default (bf16 forward, fp32 losses, no host sync per step,
        fused AdamW, channels_last, cudnn.benchmark, inference-mode teacher)
    V4  V3 + train.compile

Batches run at the paper's three scales {0.75, 1, 1.25} (three passes per image). Each
variant warms up on its own (its first steps, cuDNN autotuning and compilation, are
reported apart), then times an epoch of `--steps` batches between two device
synchronisations. Prints ms/step, images/s, passes/s, peak GB and the projected wall time
of the paper's recipe (1450 images, 100 epochs, teacher then student).

    python benchmarks/bench_cuda.py --before 74dded5 [--size 352] [--batch 16] [--steps 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench_training import ROOT, measure_in, remove_worktree, worktree

PAPER_IMAGES, PAPER_EPOCHS, PAPER_SCALES = 1450, 100, ("0.75", "1.0", "1.25")
VARIANTS = {  # name: (tree, measurement flags)
    "V0 as it was": ("before", ["--amp", "off"]),
    "V1 + TF32": ("before", ["--amp", "off", "--tf32"]),
    "V2 + its bf16": ("before", ["--amp", "on"]),
    "V3 this engine": ("after", []),
    "V4 + compile": ("after", ["--compile"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", metavar="REV", help="the commit of kdas that V0-V2 run (needed by those)")
    parser.add_argument("--size", type=int, default=352)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="batches in the timed epoch")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script with --tiny")
    parser.add_argument("--tiny", action="store_true", help="tiny models instead of PVTv2-B2/B0")
    args = parser.parse_args()
    if args.before is None and any(VARIANTS[name][0] == "before" for name in args.variants):
        parser.error("V0-V2 run the engine as it was: name its commit with --before REV")

    common = ["--device", args.device, "--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps),
              "--warmup-steps", str(args.warmup_steps), "--workers", str(args.workers), "--bare-steps", "0", "--val-images",
              str(args.batch), "--no-phases", "--multiscale", *PAPER_SCALES, *(["--tiny"] if args.tiny else ["--paper-models"])]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": worktree(args.before, Path(tmp)) if args.before else None, "after": ROOT}
        try:
            for setting in ("teacher-none", "student-kdas"):
                for name in args.variants:
                    tree, flags = VARIANTS[name]
                    rows.append((name, measure_in(trees[tree], setting, [*common, *flags])))
                    print(f"{setting} {name}: done", file=sys.stderr, flush=True)
        finally:
            if trees["before"] is not None:
                remove_worktree(trees["before"])

    print(f"\n{rows[0][1]['device']}, {args.size} px, batch {args.batch}, {args.steps} timed steps after {args.warmup_steps} warm-up steps")
    print("| role | variant | ms/batch | images/s | passes/s | first steps s | peak GB | paper recipe, this role |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    projected: dict[str, float] = {}
    for name, r in rows:
        minutes = PAPER_IMAGES * PAPER_EPOCHS / r["images_per_s"] / 60
        projected[name] = projected.get(name, 0.0) + minutes
        peak = f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else "-"
        print(f"| {r['setting']} | {name} | {r['ms_per_batch']:.1f} | {r['images_per_s']:.0f} | {r['passes_per_s']:.0f} "
              f"| {r['first_steps_s']:.1f} | {peak} | {minutes:.1f} min |")
    print("\npaper recipe, teacher then KDAS student: " + ", ".join(f"{k} {v:.0f} min" for k, v in projected.items()))


if __name__ == "__main__":
    main()
