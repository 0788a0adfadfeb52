"""Inference on this CPU: torch eager vs onnxruntime fp32 vs onnxruntime int8, teacher and student.

For each model and runtime (each measured in a fresh process, so that its peak memory is
its own): ms/image and images/s at batch 1 and batch 8 at the model's input size (the
network alone, on preprocessed input), peak RSS of the process, file size; then the
student's meanDic (masks at 0.5) on Kvasir test images for each runtime, and the change
int8 - fp32. int8 is calibrated on Kvasir frames of the PraNet *train* split (never the
test list); synthetic frames where ../shared/datasets is absent.

    python benchmarks/bench_inference.py                 # about 2-3 minutes on 2 cores
    python benchmarks/bench_inference.py --repeats 20 --dice-images 100
    python benchmarks/bench_inference.py --tiny --size 64 --repeats 1    # smoke run

Models: the teacher is Polyp-PVT on tf_efficientnet_lite2 (random init: speed only), the
student Polyp-PVT on tf_efficientnet_lite0 with its ImageNet backbone from
../shared/weights, at 224 px; a trained student model file (--student-file, default
/work/bench/models/student/best.pt) is used instead when it exists.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
KVASIR = SHARED / "datasets" / "kvasir-seg" / "Kvasir-SEG"
KVASIR_TEST = SHARED / "datasets" / "splits" / "pranet" / "kvasir_test.txt"
WEIGHTS = SHARED / "weights"
RUNTIMES = ("torch", "ort-fp32", "ort-int8")


# --------------------------------------------------------------------------- one runtime, one process


def worker(spec: dict) -> dict:
    """Time one runtime on one model file; runs in its own process."""
    size, repeats = spec["image_size"], spec["repeats"]
    if spec["runtime"] == "torch":
        import torch

        from kdas.checkpoint import load_model

        torch.set_num_threads(spec["threads"])
        model = load_model(spec["path"]).model.eval()

        def run(x: np.ndarray) -> None:
            with torch.inference_mode():
                model(torch.from_numpy(x))
    else:
        from kdas.serving.onnx_runtime import OnnxSegmenter

        seg = OnnxSegmenter(spec["path"], device="cpu", threads=spec["threads"])

        def run(x: np.ndarray) -> None:
            seg.run(x)
    out = {}
    for batch in (1, 8):
        x = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
        run(x)  # warm-up
        n = repeats if batch == 1 else max(2, repeats // 4)
        start = time.perf_counter()
        for _ in range(n):
            run(x)
        seconds = (time.perf_counter() - start) / n
        out[f"b{batch}_ms"] = 1000 * seconds / batch
        out[f"b{batch}_ips"] = batch / seconds
    out["peak_mb"] = peak_rss_mb()
    return out


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: reset by exec, unlike ru_maxrss, which a child
    inherits from the parent it was forked from)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(runtime: str, path: Path, image_size: int, repeats: int, threads: int) -> dict:
    spec = {"runtime": runtime, "path": str(path), "image_size": image_size, "repeats": repeats, "threads": threads}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{runtime} on {path.name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- data


def kvasir_split() -> tuple[list[Path], list[Path]]:
    """(train images, test images) of Kvasir-SEG by the PraNet split; empty where absent."""
    if not (KVASIR / "images").is_dir() or not KVASIR_TEST.is_file():
        return [], []
    test = {line.strip().rsplit(".", 1)[0] for line in KVASIR_TEST.read_text().splitlines() if line.strip()}
    images = sorted((KVASIR / "images").glob("*.jpg"))
    return [p for p in images if p.stem not in test], [p for p in images if p.stem in test]


def synthetic(n: int, seed: int) -> list[np.ndarray]:
    """The project's synthetic colonoscopy frames (kdas.data.synth), at assorted sizes."""
    from kdas.data.synth import synth_frame

    rng = np.random.default_rng(seed)
    return [cv2.resize(synth_frame(seed, k, 256, 0.0)[0], tuple(int(v) for v in rng.integers(200, 400, 2))) for k in range(n)]


# --------------------------------------------------------------------------- main


def build_models(tmp: Path, size: int, student_file: Path, tiny: bool) -> dict[str, tuple[Path, str]]:
    import torch

    from kdas.checkpoint import load_model, save_model
    from kdas.models import create_model

    torch.manual_seed(0)  # the random parts (teacher, student decoder) the same in every run
    if tiny:
        return {role: (save_model(tmp / f"{role}.pt", create_model("polyp_pvt_tiny").eval(), image_size=size), "tiny, random init")
                for role in ("teacher", "student")}
    teacher = create_model("polyp_pvt", backbone="tf_efficientnet_lite2", pretrained="none").eval()
    files = {"teacher": (save_model(tmp / "teacher.pt", teacher, image_size=size), "lite2, random init")}
    if student_file.is_file():
        load_model(student_file)  # a clear error now if it is no kdas model
        files["student"] = (student_file, f"trained: {student_file}")
    else:
        weights = WEIGHTS / "tf_efficientnet_lite0.in1k.safetensors"
        pretrained = str(weights) if weights.is_file() else "none"
        student = create_model("polyp_pvt", backbone="tf_efficientnet_lite0", pretrained=pretrained).eval()
        what = "lite0, ImageNet backbone, untrained decoder" if pretrained != "none" else "lite0, random init"
        files["student"] = (save_model(tmp / "student.pt", student, image_size=size), what)
    return files


def dice_of(seg, images: list[np.ndarray], masks: list[np.ndarray], names: list[str]) -> float:
    from kdas.evaluation.metrics import Evaluator

    ev = Evaluator()
    for name, prob, gt in zip(names, seg.predict(images, batch_size=8), masks):
        ev.add(name, (prob >= 0.5).astype(np.float32), gt)
    return ev.summary()["meanDic"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="input size of the models built here")
    parser.add_argument("--repeats", type=int, default=8, help="timed runs at batch 1 (batch 8: a quarter, at least 2)")
    parser.add_argument("--calibration-images", type=int, default=16)
    parser.add_argument("--dice-images", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="intra-op threads of torch and onnxruntime alike (use 1 beside another busy job: "
                             "torch's OpenMP threads collapse when the cores are taken)")
    parser.add_argument("--student-file", type=Path, default=Path("/work/bench/models/student/best.pt"))
    parser.add_argument("--tiny", action="store_true", help="tiny random models for teacher and student (a smoke run of this script)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from kdas.checkpoint import load_model
    from kdas.io import binarise, read_mask, read_rgb
    from kdas.serving import export, onnx_runtime
    from kdas.serving.inference import Segmenter

    t0 = time.perf_counter()
    train, test = kvasir_split()
    rng = np.random.default_rng(0)
    if train:
        calib = [read_rgb(p) for p in rng.choice(np.array(train, dtype=object), args.calibration_images, replace=False)]
        test = test[: args.dice_images]
        images, masks = [read_rgb(p) for p in test], [binarise(read_mask(KVASIR / "masks" / p.name)) for p in test]
        names, data = [p.stem for p in test], f"Kvasir-SEG: {len(calib)} train frames to calibrate, {len(test)} test frames for Dice"
    else:
        calib, images, names = synthetic(args.calibration_images, 1), [], []
        masks, data = [], "synthetic calibration frames (no ../shared/datasets): no Dice"

    rows, dice = [], {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for role, (model_file, what) in build_models(tmp, args.size, args.student_file, args.tiny).items():
            size = load_model(model_file).image_size
            fp32 = export.export_onnx(model_file, tmp / f"{role}.onnx")
            int8 = export.quantize_int8(fp32, tmp / f"{role}-int8.onnx", calib)
            paths = {"torch": model_file, "ort-fp32": fp32, "ort-int8": int8}
            for runtime in RUNTIMES:
                m = measure(runtime, paths[runtime], size, args.repeats, args.threads)
                rows.append({"model": role, "what": what, "size": size, "runtime": runtime,
                             "file_mb": paths[runtime].stat().st_size / 1e6, **m})
            if role == "student" and images:
                dice = {"torch": dice_of(Segmenter.load(model_file, "cpu"), images, masks, names),
                        "ort-fp32": dice_of(onnx_runtime.OnnxSegmenter(fp32, "cpu"), images, masks, names),
                        "ort-int8": dice_of(onnx_runtime.OnnxSegmenter(int8, "cpu"), images, masks, names)}

    print(f"CPU: {os.cpu_count()} cores, {args.threads} intra-op thread(s) for every runtime; {data}; "
          f"{args.repeats} timed runs at batch 1")
    header = (f"{'model':<8} {'runtime':<9} {'px':>4} {'b1 ms/img':>9} {'b1 img/s':>8} {'b8 ms/img':>9} {'b8 img/s':>8} "
              f"{'vs torch b1':>11} {'peak MB':>8} {'file MB':>7} {'meanDic':>8}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["runtime"] == "torch")
        d = dice.get(r["runtime"]) if r["model"] == "student" else None
        print(f"{r['model']:<8} {r['runtime']:<9} {r['size']:>4} {r['b1_ms']:>9.1f} {r['b1_ips']:>8.1f} {r['b8_ms']:>9.1f} "
              f"{r['b8_ips']:>8.1f} {base['b1_ms'] / r['b1_ms']:>10.2f}x {r['peak_mb']:>8.0f} {r['file_mb']:>7.1f} "
              f"{'' if d is None else f'{d:.4f}':>8}")
    for role in ("teacher", "student"):
        print(f"{role}: {next(r['what'] for r in rows if r['model'] == role)}")
    if dice:
        print(f"Dice change (masks at 0.5, student): int8 - fp32 = {dice['ort-int8'] - dice['ort-fp32']:+.4f}, "
              f"fp32 - torch = {dice['ort-fp32'] - dice['torch']:+.4f}")
    print(f"peak MB: the measuring process's peak RSS (interpreter and libraries included); {time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
