"""`kdas evaluate`: a model on every test set of the manifest, scored by the standard
protocol, plus its efficiency on the device used, plots and a picture grid.

Maps are scored under both preparations of kdas.inference: `calibrated` (what the model
outputs when deployed: metrics.json's "datasets", the plots and the promotion gate) and
`published` (as the official test scripts prepare them: metrics.json's "published", the
one to compare with papers).

Outputs (reports/evaluate/ by default):
  metrics.json    per test set + their mean, both preparations (DVC metrics)
  per_image.csv   every image's own figures
  curves.csv      Dice and IoU against threshold: per test set and their mean (DVC plots)
  datasets.csv    one row per test set (DVC bar plot)
  curves.png, datasets.png, grid.png (worst and best cases: image, truth, prediction)
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from kdas.data.manifest import data_id  # noqa: E402
from kdas.inference import PREPARATIONS, Segmenter, prepare  # noqa: E402
from kdas.io import atomic_path, binarise, read_mask, read_rgb, write_text  # noqa: E402
from kdas.metrics import Evaluator  # noqa: E402
from kdas.models import count_macs, count_parameters  # noqa: E402

log = logging.getLogger(__name__)

HEADLINE = ["meanDic", "meanIoU", "wFm", "Sm", "meanEm", "mae", "maxDic", "maxIoU", "maxEm", "meanSen", "meanSpe"]


@dataclass
class Efficiency:
    device: str
    params_m: float
    gmacs: float
    image_size: int
    latency_ms: float        # one image, batch 1
    throughput: float        # images/s at the evaluation batch size
    peak_memory_mb: float    # GPU: max allocated; CPU: the process's peak resident set


def to_8bit(prob: np.ndarray) -> np.ndarray:
    """Published numbers score maps saved as 8-bit PNGs: quantise the same way."""
    return np.round(prob * 255.0) / 255.0


@torch.no_grad()
def measure_efficiency(seg: Segmenter, batch_size: int, repeats: int = 5) -> Efficiency:
    model, size, device = seg.model, seg.image_size, seg.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def timed(batch: int) -> float:
        x = torch.randn(batch, 3, size, size, device=device)
        model(x)  # warm-up (cudnn autotune, lazy init)
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
        sync()
        return (time.perf_counter() - start) / repeats

    latency = timed(1)
    per_batch = timed(batch_size)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Efficiency(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        params_m=count_parameters(model) / 1e6, gmacs=count_macs(model, size) / 1e9, image_size=size,
        latency_ms=latency * 1000, throughput=batch_size / per_batch, peak_memory_mb=peak,
    )


def evaluate_model(seg: Segmenter, manifest: pd.DataFrame, out_dir: str | Path, *, batch_size: int, grid_size: int) -> dict:
    """Score `seg` on every dataset's test split; returns the metrics written to metrics.json.
    `batch_size`, `grid_size`: params.yaml `evaluate`."""
    out_dir = Path(out_dir)
    tests = manifest[(manifest["split"] == "test") & (manifest["error"].fillna("") == "")]
    if tests.empty:
        raise ValueError("the manifest has no test images; check data.datasets and data.split in params.yaml")
    metrics: dict[str, dict] = {}
    published: dict[str, dict] = {}
    per_image, curves, cases = [], [], []
    for dataset, rows in tests.groupby("dataset", sort=True):
        evaluator, paper = Evaluator(), Evaluator()
        records = list(rows.itertuples())
        for start in tqdm(range(0, len(records), batch_size), desc=f"evaluate {dataset}", unit="batch", disable=None):
            chunk = records[start : start + batch_size]
            images = [read_rgb(r.image_path) for r in chunk]
            for r, image, logits in zip(chunk, images, seg.logits(images, batch_size)):
                truth = binarise(read_mask(r.mask_path))
                pred = to_8bit(prepare(logits, "calibrated"))
                scores = evaluator.add(str(r.id), pred, truth)
                paper.add(str(r.id), to_8bit(prepare(logits, "published")), truth)
                cases.append((float(scores.dice.mean()), str(dataset), r.image_path, truth, pred))
        summary = evaluator.summary()
        metrics[str(dataset)] = {k: summary[k] for k in HEADLINE} | {"images": len(evaluator)}
        published[str(dataset)] = {k: paper.summary()[k] for k in HEADLINE} | {"images": len(paper)}
        per_image.append(evaluator.per_image().assign(dataset=dataset))
        curves.append(evaluator.curves()[["threshold", "dice", "iou"]].assign(dataset=dataset))
        log.info("%s: meanDic %.4f (published maps %.4f), meanIoU %.4f, MAE %.4f (%d images)", dataset, summary["meanDic"],
                 published[str(dataset)]["meanDic"], summary["meanIoU"], summary["mae"], len(evaluator))
    for table in (metrics, published):
        table["mean"] = {k: float(np.mean([m[k] for m in table.values()])) for k in HEADLINE}
    efficiency = measure_efficiency(seg, batch_size)
    result = {"data": data_id(tests), "preparation": {"datasets": f"calibrated: {PREPARATIONS['calibrated']}", "published": f"published: {PREPARATIONS['published']}"},
              "datasets": metrics, "published": published, "efficiency": asdict(efficiency)}
    _write(out_dir, result, pd.concat(per_image), pd.concat(curves), cases, grid_size)
    return result


def _write(out_dir: Path, result: dict, per_image: pd.DataFrame, curves: pd.DataFrame, cases: list, grid_size: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "metrics.json", json.dumps(result, indent=2))
    wide = curves.pivot(index="threshold", columns="dataset", values=["dice", "iou"]).sort_index(ascending=False)
    wide.columns = [f"{dataset}_{metric}" for metric, dataset in wide.columns]
    for metric in ("dice", "iou"):  # test sets weigh equally, as in metrics.json's "mean"
        wide[f"mean_{metric}"] = curves.groupby("threshold")[metric].mean()
    for name, frame in (("per_image.csv", per_image[["dataset", *[c for c in per_image.columns if c != "dataset"]]]), ("curves.csv", wide.reset_index())):
        with atomic_path(out_dir / name) as tmp:
            frame.to_csv(tmp, index=False)
    bars = pd.DataFrame([{"dataset": d, **m} for d, m in result["datasets"].items() if d != "mean"])
    with atomic_path(out_dir / "datasets.csv") as tmp:
        bars.to_csv(tmp, index=False)
    _plot_curves(curves, out_dir / "curves.png")
    _plot_bars(bars, out_dir / "datasets.png")
    _plot_grid(cases, grid_size, out_dir / "grid.png")


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plot_curves(curves: pd.DataFrame, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric in zip(axes, ("dice", "iou")):
        for dataset, c in curves.groupby("dataset"):
            ax.plot(c["threshold"], c[metric], label=dataset)
        ax.set(xlabel="threshold", title=f"mean {metric.capitalize()} against threshold", ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].legend()
    _save(fig, path)


def _plot_bars(bars: pd.DataFrame, path: Path) -> None:
    keys = ["meanDic", "meanIoU", "wFm", "Sm"]
    fig, ax = plt.subplots(figsize=(1.5 + 1.8 * len(bars), 4))
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        ax.bar(np.arange(len(bars)) + k * width, bars[key], width, label=key)
    ax.set_xticks(np.arange(len(bars)) + 0.4 - width / 2, bars["dataset"])
    ax.set(ylim=(0, 1), title="test sets")
    ax.legend(ncols=len(keys), fontsize=8)
    _save(fig, path)


def _plot_grid(cases: list, n: int, path: Path) -> None:
    """The n worst and n best images by mean Dice: image | ground truth | prediction."""
    ranked = sorted(cases, key=lambda c: c[0])
    chosen = [("worst", c) for c in ranked[:n]] + [("best", c) for c in ranked[::-1][:n] if c not in ranked[:n]]
    fig, axes = plt.subplots(len(chosen), 3, figsize=(7.5, 2.4 * len(chosen)), squeeze=False)
    for row, (kind, (dice, dataset, image_path, truth, pred)) in zip(axes, chosen):
        image = read_rgb(image_path)
        for ax, (title, picture) in zip(row, (("image", image), ("ground truth", truth), ("prediction", pred))):
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1 if picture.ndim == 2 else None)
            ax.set_axis_off()
            ax.set_title(title, fontsize=8)
        row[0].set_title(f"{kind}: {dataset}/{Path(image_path).stem}\nmean Dice {dice:.3f}", fontsize=8)
    _save(fig, path)
