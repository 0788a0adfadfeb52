"""The paper's input size on a lent GPU, in one prepared run of about 12 minutes with setup:
on the PraNet split at 352 px, the EfficientNet-Lite2 teacher, the Lite0 student alone and
the Lite0 student distilled (METHOD), each selected on val, scored by the standard protocol on
the three test sets; model files, metrics.json and gpu.md are written to OUT.

    python benchmarks/real_gpu.py OUT                   # on the GPU machine, from the project root
    python benchmarks/real_gpu.py OUT --smoke           # the same code on the CPU: tiny data and models, seconds

Everything runs in process through the kdas library (no MLflow, no DVC: the device machine
reaches nothing), bf16 autocast on CUDA (params.yaml's train.amp). The time budget is split
by EPOCHS; each phase's seconds are in gpu.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"
DATASETS = ("kvasir-seg", "cvc-clinicdb", "cvc-colondb")
SIZE = 352
# the arms: the teacher, the student alone, the student distilled with METHOD (its settings
# from params.yaml); epochs sized so that the three fit in ~12 minutes on one H100/H200
EPOCHS = {"teacher": 30, "student": 30, "distilled": 30}
METHOD = "kd"


def data(out: Path, smoke: bool):
    """The manifest of the PraNet split (smoke: 24 synthetic frames), built under `out`."""
    from kdas.config import SplitParams, SynthParams, load_params
    from kdas.data.manifest import build_manifest

    params = load_params(ROOT / "params.yaml")
    raw = out / "data" / "raw"
    if smoke:
        from kdas.data.synth import write_synth

        write_synth(raw / "synth", SynthParams(n_images=24, size=64, empty_fraction=0.1, seed=0))
        names = ["synth"]
    else:
        from kdas.data.importer import import_dataset

        for name in DATASETS:
            if not (raw / name).exists():
                import_dataset(SHARED / "datasets" / name, raw, max_nonbinary=params.validation.max_nonbinary_fraction, track=False)
        names = list(DATASETS)
    split = SplitParams(0.25, 0.25, 0) if smoke else params.data.split
    return build_manifest(raw, names, split, near_duplicate_distance=params.validation.near_duplicate_distance)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the model files, metrics.json and gpu.md")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic data and models on the CPU (the slow tier runs this)")
    args = parser.parse_args()

    import torch

    from kdas.config import RoleModel, load_params
    from kdas.evaluation.evaluate import evaluate_model
    from kdas.serving.inference import Segmenter
    from kdas.training import TrainJob, train

    params = load_params(ROOT / "params.yaml")
    profile = params.profiles["real-cpu"]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --smoke, or on the GPU machine")
    started = time.perf_counter()
    manifest = data(out, args.smoke)
    setup_s = time.perf_counter() - started

    def role(name: str) -> RoleModel:
        if args.smoke:
            return RoleModel("polyp_pvt_tiny", None, "none", 0.0)
        return RoleModel("polyp_pvt", profile[f"model.{name}.backbone"], str((ROOT / profile[f"model.{name}.weights"]).resolve()), 0.1)

    size, batch = (64, 4) if args.smoke else (SIZE, 16)
    base = dataclasses.replace(params.train, image_size=size, batch_size=batch, workers=0 if args.smoke else 8,
                               decay_epochs=max(1, EPOCHS["student"] * 2 // 3))
    distill = dataclasses.replace(params.distill, method=METHOD)
    arms = {"teacher": ("teacher", None), "student": ("student", None), "distilled": ("student", distill)}
    results, phases = {}, {"setup": setup_s}
    for arm, (model_role, method) in arms.items():
        tick = time.perf_counter()
        epochs = 1 if args.smoke else EPOCHS[arm]
        job = TrainJob(role=model_role, model=role(model_role), manifest=manifest, out_dir=out / arm, device=device,
                       train=dataclasses.replace(base, epochs=epochs), distill=method,
                       teacher=out / "teacher" / "best.pt" if method else None, max_steps=2 if args.smoke else None)
        trained = train(job)
        report = evaluate_model(Segmenter.load(trained.best_path, device), manifest, out / arm / "evaluate", batch_size=16, grid_size=2)
        phases[arm] = time.perf_counter() - tick
        results[arm] = {"best_val_meanDic": trained.best_val_dice, "best_epoch": trained.best_epoch, "epochs_run": trained.epochs_run,
                        "published": {d: m["meanDic"] for d, m in report["published"].items()}, "seconds": phases[arm]}
    (out / "metrics.json").write_text(json.dumps({"results": results, "phases": phases, "device": torch.cuda.get_device_name() if device == "cuda"
                                                  else "cpu", "method": METHOD, "image_size": size}, indent=2))
    sets = [d for d in results["teacher"]["published"] if d != "mean"]
    lines = [f"# {METHOD} at {size} px on {'the CPU (smoke)' if args.smoke else torch.cuda.get_device_name()}", "",
             "Measured by `python benchmarks/real_gpu.py OUT`: published meanDic per test set, selected on val.", "",
             "| arm | " + " | ".join(sets) + " | mean | best val | epoch / run | seconds |", "|---|" + "---|" * (len(sets) + 4)]
    for arm, r in results.items():
        lines.append(f"| {arm} | " + " | ".join(f"{r['published'][d]:.4f}" for d in sets) + f" | {r['published']['mean']:.4f} | "
                     f"{r['best_val_meanDic']:.4f} | {r['best_epoch']} / {r['epochs_run']} | {r['seconds']:.0f} |")
    lines += ["", f"Setup (import, manifest) {setup_s:.0f} s; total {time.perf_counter() - started:.0f} s.", ""]
    (out / "gpu.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
