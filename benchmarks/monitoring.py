"""Drift monitoring on real frames: does `kdas monitor` tell a model's own kind of frames from
another hospital's, with how many frames, how fast, and what does logging served frames cost?

The reference is the profile a model file carries (kdas.monitoring.profile.attach_reference, as
training writes it) of Kvasir-SEG frames of the PraNet *train* split; then, with frames drawn
at random (10 draws per size):
- held-out Kvasir-SEG frames (its PraNet test list: never in the reference): no drift wanted;
- CVC-ClinicDB and CVC-ColonDB frames (other hospitals, other endoscopes): drift wanted;
- `kdas monitor`'s own path (kdas.monitoring.watch) on a folder of 500 frames, timed;
- the served pyfunc, frame log off and on, in one process, interleaved: the cost of logging.

    python benchmarks/monitoring.py                       # ~5 min on 2 cores; writes benchmarks/results/monitoring.md
    python benchmarks/monitoring.py --model models/student/best.pt
    python benchmarks/monitoring.py --smoke               # a few frames, a tiny model: the code runs

The model: --model (a trained kdas model file), else Polyp-PVT on tf_efficientnet_lite0 with
its ImageNet backbone from ../shared/weights and an untrained decoder (its embedding is the
ImageNet backbone's; its prediction statistics mean little), at 224 px.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
DATASETS = SHARED / "datasets"
FOLDERS = {"kvasir-seg": DATASETS / "kvasir-seg" / "Kvasir-SEG" / "images",
           "cvc-clinicdb": DATASETS / "cvc-clinicdb" / "CVC-ClinicDB" / "PNG" / "Original",
           "cvc-colondb": DATASETS / "cvc-colondb" / "CVC-ColonDB" / "images"}
KVASIR_TEST = DATASETS / "splits" / "pranet" / "kvasir_test.txt"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
OUT = ROOT / "benchmarks" / "results" / "monitoring.md"

from kdas.checkpoint import load_model, save_model  # noqa: E402
from kdas.config import ReferenceParams, load_params  # noqa: E402
from kdas.models import create_model  # noqa: E402
from kdas.monitoring.drift import compare  # noqa: E402
from kdas.monitoring.profile import Reference, attach_reference, profile_files  # noqa: E402
from kdas.monitoring.watch import watch  # noqa: E402
from kdas.serving.inference import Segmenter  # noqa: E402


def frames(name: str) -> list[Path]:
    return sorted(p for p in FOLDERS[name].iterdir() if p.suffix.lower() in (".jpg", ".png", ".tif", ".tiff"))


def build_model(args, work: Path) -> tuple[Path, str]:
    if args.model:
        path = work / "model.pt"
        shutil.copy(args.model, path)
        return path, f"{args.model} (trained)"
    torch.manual_seed(0)  # the untrained decoder: the same one every run
    if args.smoke:
        return save_model(work / "model.pt", create_model("polyp_pvt_tiny"), image_size=64), "polyp_pvt_tiny, random init (smoke)"
    model = create_model("polyp_pvt", backbone="tf_efficientnet_lite0", pretrained=str(WEIGHTS))
    return save_model(work / "model.pt", model, image_size=224), "Polyp-PVT on tf_efficientnet_lite0, ImageNet backbone, untrained decoder, 224 px"


def separation(reference: Reference, tables: dict[str, pd.DataFrame], sizes: list[int], draws: int, share: float) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for name, table in tables.items():
        for n in sizes:
            if n > len(table):
                continue
            verdicts = [compare(reference.table, table.iloc[rng.choice(len(table), n, replace=False)].reset_index(drop=True), share)
                        for _ in range(draws)]
            scores = [v.score for v in verdicts]
            rows.append({"frames": name, "n": n, "score_mean": statistics.mean(scores), "score_min": min(scores), "score_max": max(scores),
                         "drift_rate": sum(v.drift for v in verdicts) / draws})
    return rows


def served_overhead(model: Path, images: list[np.ndarray], repeats: int, log_dir: Path) -> dict[str, float]:
    """Seconds per request of 8 frames through the served pyfunc, log off and on, interleaved."""
    from kdas.config import serving_limits
    from kdas.monitoring.frame_log import FrameLog
    from kdas.serving.codec import encode_image
    from kdas.tracking.served import SegmenterModel

    served = SegmenterModel()
    params = load_params(ROOT / "params.yaml")
    served.config = {**serving_limits(params.serve, 4096), "device": "cpu", "batch_size": 8, "runtime": "torch"}
    served.segmenter = Segmenter(load_model(model), torch.device("cpu"))
    reference = Reference.from_payload(served.segmenter.reference, str(model))
    log = FrameLog(log_dir, served.segmenter.image_size, served.config["threshold"], reference)
    batches = [pd.DataFrame({"image": [encode_image(im) for im in images[i : i + 8]]}) for i in range(0, len(images) - 7, 8)]
    times = {"off": [], "on": []}
    served.frame_log = None
    served.predict(None, batches[0])  # warm-up
    for _ in range(repeats):
        for mode in ("off", "on"):
            served.frame_log = log if mode == "on" else None
            start = time.perf_counter()
            for batch in batches:
                served.predict(None, batch)
            times[mode].append((time.perf_counter() - start) / len(batches))
    return {mode: statistics.median(t) for mode, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a trained kdas model file (default: ImageNet lite0, untrained decoder)")
    parser.add_argument("--reference", type=int, default=200, help="Kvasir-SEG train frames in the reference")
    parser.add_argument("--sizes", default="5,10,20,50,100", help="frames per decision")
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--folder", type=int, default=500, help="frames in the timed `kdas monitor` folder")
    parser.add_argument("--repeats", type=int, default=5, help="served-log timing repeats")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and a few frames: the code runs, nothing is measured")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if not all(f.is_dir() for f in FOLDERS.values()):
        sys.exit(f"needs the real datasets in {DATASETS} (Kvasir-SEG, CVC-ClinicDB, CVC-ColonDB)")
    if args.smoke:
        args.reference, args.sizes, args.draws, args.folder, args.repeats = 12, "5", 2, 8, 1
    torch.set_num_threads(os.cpu_count() or 1)
    share = load_params(ROOT / "params.yaml").monitor.drift_share
    held_out = set(KVASIR_TEST.read_text().split())
    kvasir = frames("kvasir-seg")
    train = [p for p in kvasir if p.stem not in held_out]
    test = [p for p in kvasir if p.stem in held_out]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, described = build_model(args, work)
        start = time.perf_counter()
        params = ReferenceParams(frames=args.reference, components=8, thumbnails=6)
        reference = attach_reference(model, train, params, torch.device("cpu"))
        reference_s = time.perf_counter() - start
        segmenter = Segmenter(load_model(model), torch.device("cpu"))
        limit = 12 if args.smoke else None
        tables = {}
        for name, paths in (("kvasir-seg held out", test), ("cvc-clinicdb", frames("cvc-clinicdb")), ("cvc-colondb", frames("cvc-colondb"))):
            table, embeddings = profile_files(segmenter, paths[:limit])
            tables[name] = pd.concat([table, reference.project(embeddings)], axis=1)
        rows = separation(reference, tables, [int(s) for s in args.sizes.split(",")], args.draws, share)

        folder = work / "frames"
        folder.mkdir()
        pool = test + frames("cvc-colondb") + frames("cvc-clinicdb")
        for p in pool[: args.folder]:
            (folder / f"{p.parent.parent.name}-{p.name}").symlink_to(p)
        start = time.perf_counter()
        verdict = watch(folder, model, work / "out", max_frames=args.folder, device="cpu", drift_share=share)
        watch_s = time.perf_counter() - start

        from kdas.io import read_rgb

        served = served_overhead(model, [read_rgb(p) for p in test[:48 if not args.smoke else 8]], args.repeats, work / "served")

    table = pd.DataFrame(rows)
    right = table.assign(right=[rate == (0.0 if name.startswith("kvasir") else 1.0) for name, rate in zip(table["frames"], table["drift_rate"])])
    enough = right.groupby("n")["right"].all()
    needed = next((int(n) for n in enough.index if enough.loc[n:].all()), None)
    gap = table[~table["frames"].str.startswith("kvasir")]["score_min"].min() - table[table["frames"].str.startswith("kvasir")]["score_max"].max()
    lines = [
        "# Drift monitoring on real frames",
        "",
        f"`python benchmarks/monitoring.py{' --model ' + str(args.model) if args.model else ''}{' --smoke' if args.smoke else ''}` on "
        f"{platform.node()} ({os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}). Model: {described}. "
        f"Reference: {reference.source} (PraNet train split), profiled in {reference_s:.0f} s. Drift when at least "
        f"monitor.drift_share = {share} of the {len(verdict.features)} features drift (Evidently's test per feature).",
        "",
        f"## Separation: the score (share of drifted features) over {args.draws} random draws of n frames",
        "",
        table.to_markdown(index=False, floatfmt=".2f"),
        "",
        f"Frames per decision: from n = {needed} on, every draw decided right on all three sets (no drift on held-out "
        f"Kvasir-SEG, drift on both other hospitals'); over all n the lowest other-hospital score is {gap:+.2f} above the "
        f"highest held-out one." if needed else "Frames per decision: no n in this run decided every draw right.",
        "",
        "## Speed",
        "",
        f"- `kdas monitor`'s path (kdas.monitoring.watch) on a folder of {verdict.frames} frames (Kvasir-SEG test, CVC-ColonDB, "
        f"CVC-ClinicDB): {watch_s:.1f} s, reports included (verdict: {'drift' if verdict.drift else 'no drift'}, score {verdict.score:.2f}).",
        f"- The served pyfunc, requests of 8 Kvasir-SEG frames: {served['off'] * 1000:.0f} ms with the frame log off, "
        f"{served['on'] * 1000:.0f} ms on: {100 * (served['on'] / served['off'] - 1):+.1f}% (median of {args.repeats}, interleaved, one process).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.smoke:
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
