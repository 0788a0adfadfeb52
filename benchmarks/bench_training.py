"""Where a training epoch goes: the real engine on real frames, beside the bare model.

For each setting (role and distillation method, the real-cpu profile's models: a
tf_efficientnet_lite2 teacher, a lite0 student) it measures, in a fresh process:

- the whole epoch of the engine (`Trainer.train_epoch`, after a warm-up): images/s and
  passes/s (one image at three scales is three passes), and the share spent waiting for data;
- the bare forward+backward of the same model on one batch, NCHW and channels_last, fp32
  (plus the frozen teacher's forward for sgm/kdas): what the epoch would cost with no
  overhead at all; the ratio epoch / bare-NCHW is the headline;
- validation (ms per val image) and one checkpoint (s);
- a per-phase split of an epoch under torch.profiler (data wait, copy to device, forward,
  teacher forward, loss, backward, optimiser step), from the engine's named ranges.

`--before REV` runs the same measurements on another commit of kdas (checked out in a git
worktree), interleaved with this tree's, so that both share the machine's state. Examples:

    python benchmarks/bench_training.py --before 74dded5
    python benchmarks/bench_training.py --settings student-none --workers 0 1 2   # loader workers
    python benchmarks/bench_training.py --size 64 --steps 1 --settings student-none --tiny   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PHASES = ("data", "copy", "forward", "teacher", "loss", "backward", "step")
SETTINGS = ("student-none", "teacher-none", "student-kdas", "student-sgm")
MODELS = {"teacher": "tf_efficientnet_lite2", "student": "tf_efficientnet_lite0"}
PAPER_MODELS = {"teacher": "pvt_v2_b2", "student": "pvt_v2_b0"}


# ---------------------------------------------------------------------------- one measurement


def _frames(n_train: int, n_val: int, tmp: Path):
    """A manifest of real Kvasir-SEG frames (synthetic ones where ../shared is absent)."""
    import pandas as pd

    root = SHARED / "datasets" / "kvasir-seg" / "Kvasir-SEG"
    if root.exists():
        images = sorted((root / "images").glob("*.jpg"))[: n_train + n_val]
        rows = [{"dataset": "kvasir-seg", "id": p.stem, "image_path": str(p), "mask_path": str(root / "masks" / p.name)} for p in images]
    else:
        from kdas.config import SynthParams
        from kdas.data.synth import write_synth

        out = write_synth(tmp / "synth", SynthParams(n_images=n_train + n_val, size=256, empty_fraction=0.0, seed=0))
        rows = [{"dataset": "synth", "id": p.stem, "image_path": str(p), "mask_path": str(out / "masks" / p.name)}
                for p in sorted((out / "images").iterdir())]
    frame = pd.DataFrame(rows)
    frame["split"] = ["train"] * n_train + ["val"] * (len(frame) - n_train)
    frame["error"] = ""
    return frame, root.exists()


def _role_model(role: str, tiny: bool, paper: bool = False):
    """The real-cpu profile's models (with the ImageNet weights of ../shared where present),
    the paper's PVTv2-B2 / B0, or tiny ones."""
    from kdas.config import RoleModel

    if tiny:
        return RoleModel("polyp_pvt_tiny", None, "none", 0.0)
    if paper:
        return RoleModel("polyp_pvt", PAPER_MODELS[role], "none", 0.1)
    backbone = MODELS[role]
    weights = SHARED / "weights" / f"{backbone}.in1k.safetensors"
    return RoleModel("polyp_pvt", backbone, str(weights) if weights.exists() else "none", 0.1)


def _bare(model, teacher, batch: int, size: int, steps: int, channels_last: bool) -> float:
    """images/s of forward+backward alone (fp32), plus the teacher's forward when given."""
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    device = next(model.parameters()).device
    model = model.to(memory_format=fmt).train()
    teacher = teacher.to(memory_format=fmt) if teacher is not None else None
    x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        if teacher is not None:
            with torch.no_grad():
                teacher(x)
        p1, p2 = model(x)
        (p1.mean() + p2.mean()).backward()
        _synchronize(device)
        times.append(time.perf_counter() - started)
    return batch / (sum(times[1:]) / steps)


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device, work) -> float:
    """Seconds `work()` keeps the device busy: CUDA events on a GPU, the host clock on a CPU."""
    import torch

    if device.type != "cuda":
        started = time.perf_counter()
        work()
        return time.perf_counter() - started
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    work()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def measure(args) -> dict:
    """One setting in this process, with whichever kdas is importable (this tree or a worktree)."""
    import torch

    import kdas
    from kdas.checkpoint import save_model
    from kdas.config import load_params
    from kdas.models import create_model
    from kdas.training import TrainJob, engine

    if args.tf32:  # what an older engine did not set
        torch.set_float32_matmul_precision("high")
    role, method = args.setting.split("-")
    tree = Path(kdas.__file__).resolve().parents[1]
    params = load_params(tree / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest, real = _frames(args.batch * max(args.steps, args.warmup_steps), args.val_images, tmp)
        spec, teacher_spec = args.models[role], args.models["teacher"]
        teacher_file = None
        if method != "none":
            teacher_file = save_model(tmp / "teacher.pt", create_model(teacher_spec.arch, backbone=teacher_spec.backbone), image_size=args.size)
        overrides = {"amp": args.amp == "on"} if args.amp != "default" else {}
        if args.compile:
            overrides["compile"] = True
        train = dataclasses.replace(params.train, image_size=args.size, batch_size=args.batch, epochs=3, workers=args.workers,
                                    multiscale=args.multiscale, **overrides)
        distill = dataclasses.replace(params.distill, method=method)
        job = TrainJob(role=role, model=spec, manifest=manifest, out_dir=tmp / "out", train=train,
                       distill=distill if method != "none" else None, teacher=teacher_file, device=args.device, max_steps=args.warmup_steps)
        trainer = engine.Trainer(job)
        device = trainer.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # warm-up: oneDNN/cuDNN choices, compilation, allocator, loader workers
        first_steps_s = _timed(device, lambda: trainer.train_epoch(0))
        trainer.job.max_steps = args.steps
        epoch = {}
        seconds = _timed(device, lambda: epoch.update(trainer.train_epoch(1)))
        images = args.batch * args.steps

        phases = {}
        if args.phases and hasattr(engine, "record_function"):  # this tree names its phases; older ones may not
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                trainer.train_epoch(2)
            totals = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in PHASES}
            whole = sum(totals.values())
            phases = {k: totals.get(k, 0.0) / whole for k in PHASES} if whole else {}

        val_dice = getattr(engine, "val_dice", None) or engine.validate  # its name before issue 22
        kwargs = {"amp": train.amp} if "amp" in inspect.signature(val_dice).parameters else {}
        started = time.perf_counter()
        val_dice(trainer.model, trainer.val_data, device, args.batch, **kwargs)
        val_ms = (time.perf_counter() - started) / len(trainer.val_data) * 1000
        started = time.perf_counter()
        trainer.save_last(0)
        checkpoint_s = time.perf_counter() - started
        peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

        bare = {}
        if args.bare_steps:
            model = create_model(spec.arch, backbone=spec.backbone).to(device)
            teacher = create_model(teacher_spec.arch, backbone=teacher_spec.backbone).to(device).eval() if method != "none" else None
            bare = {fmt: _bare(model, teacher, args.batch, args.size, args.bare_steps, fmt == "channels_last") for fmt in ("nchw", "channels_last")}
    return {
        "setting": args.setting, "workers": args.workers, "threads": torch.get_num_threads(), "real_frames": real,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "images_per_s": images / seconds, "passes_per_s": images * len(args.multiscale) / seconds, "ms_per_batch": seconds / args.steps * 1000,
        "first_steps_s": first_steps_s, "peak_gb": peak_gb,
        "data_wait": epoch["data_wait_share"], "val_ms_per_image": val_ms, "checkpoint_s": checkpoint_s,
        "bare_nchw": bare.get("nchw"), "bare_channels_last": bare.get("channels_last"), "phases": phases,
    }


# ---------------------------------------------------------------------------- the driver


def measure_in(tree: Path, setting: str, options: list[str]) -> dict:
    """One measurement in a fresh process, importing kdas from `tree`; `options` are this
    script's measurement flags."""
    cmd = [sys.executable, __file__, "--measure", setting, *options]
    out = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{setting} at {tree}: failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _options(args, workers: int) -> list[str]:
    return ["--workers", str(workers), "--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps),
            "--bare-steps", str(args.bare_steps), "--val-images", str(args.val_images), "--multiscale", *map(str, args.multiscale),
            "--amp", args.amp, *(["--compile"] if args.compile else []), *(["--tiny"] if args.tiny else [])]


def worktree(rev: str, tmp: Path) -> Path:
    """`rev` of this repository checked out under `tmp` (undo with remove_worktree)."""
    path = tmp / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True, capture_output=True)
    return path


def remove_worktree(path: Path) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)


def _print(rows: list[tuple[str, dict]], args) -> None:
    import torch

    print(f"\ntraining on the CPU ({torch.get_num_threads()} threads), {args.size} px, batch {args.batch}, {args.steps} steps an epoch, "
          f"{'real Kvasir-SEG frames' if rows and rows[0][1]['real_frames'] else 'synthetic frames'}")
    print("| tree | setting | workers | bare NCHW img/s | bare channels_last img/s | epoch img/s | passes/s | epoch / bare NCHW "
          "| data wait | val ms/img | checkpoint s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tree, r in rows:
        print(f"| {tree} | {r['setting']} | {r['workers']} | {r['bare_nchw']:.2f} | {r['bare_channels_last']:.2f} | {r['images_per_s']:.2f} "
              f"| {r['passes_per_s']:.2f} | {r['images_per_s'] / r['bare_nchw']:.2f}x | {r['data_wait']:.1%} | {r['val_ms_per_image']:.1f} "
              f"| {r['checkpoint_s']:.2f} |")
    split = [(tree, r) for tree, r in rows if r["phases"]]
    if split:
        print("\nwhere an epoch goes (share of the profiled epoch, torch.profiler):")
        print("| tree | setting | workers | " + " | ".join(PHASES) + " |")
        print("|---|---|---:|" + "---:|" * len(PHASES))
        for tree, r in split:
            print(f"| {tree} | {r['setting']} | {r['workers']} | " + " | ".join(f"{r['phases'][k]:.1%}" for k in PHASES) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS[:3]), choices=SETTINGS, help="role-method pairs")
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="loader workers (several: a sweep)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=15, help="batches in the measured epoch")
    parser.add_argument("--bare-steps", type=int, default=4, help="batches of the bare forward+backward")
    parser.add_argument("--val-images", type=int, default=32)
    parser.add_argument("--multiscale", type=float, nargs="+", default=[1.0], help="scales of each batch (each one a pass)")
    parser.add_argument("--before", metavar="REV", help="also measure this commit of kdas, from a git worktree")
    parser.add_argument("--tiny", action="store_true", help="tiny models (a smoke run of this script)")
    parser.add_argument("--amp", choices=("default", "on", "off"), default="default",
                        help="train.amp as params.yaml says, or forced (it acts on CUDA only: kdas.device)")
    parser.add_argument("--compile", action="store_true", help="train.compile on (torch.compile of model and loss)")
    # internal: one measurement in this process, JSON out (also what bench_cuda.py runs)
    parser.add_argument("--measure", metavar="SETTING", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--tf32", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warmup-steps", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--paper-models", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-phases", dest="phases", action="store_false", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        args.setting, args.workers = args.measure, args.workers[0]
        args.models = {role: _role_model(role, args.tiny, args.paper_models) for role in MODELS}
        print(json.dumps(measure(args)))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        before = worktree(args.before, Path(tmp)) if args.before else None
        try:
            for setting in args.settings:
                for workers in args.workers:
                    if before is not None:
                        rows.append((f"before ({args.before})", measure_in(before, setting, _options(args, workers))))
                    rows.append(("after", measure_in(ROOT, setting, _options(args, workers))))
                    print(f"{setting}, {workers} workers: done", file=sys.stderr, flush=True)
        finally:
            if before is not None:
                remove_worktree(before)
    _print(rows, args)


if __name__ == "__main__":
    main()
