"""`kdas evaluate`: a model on every test set of the manifest, scored by the standard
protocol, plus its efficiency on the device used, plots and a picture grid.

Maps are scored under both preparations of kdas.serving.inference: `calibrated` (what the model
outputs when deployed: metrics.json's "datasets", the plots and the promotion gate) and
`published` (as the official test scripts prepare them: metrics.json's "published", the
one to compare with papers).

Outputs (reports/evaluate/ by default):
  metrics.json    per test set + their mean, both preparations (DVC metrics)
  per_image.csv   every image's own figures
  curves.csv      Dice and IoU against threshold: per test set and their mean (DVC plots)
  datasets.csv    one row per test set (DVC bar plot)
  curves.png      Dice and IoU against threshold, the threshold used and the best one marked
  datasets.png    the headline figures per test set
  grid.png        the worst and best cases at the threshold used: the image, the prediction
                  over it (true positives green, false positives red, false negatives blue) and
                  the probability map with the truth's outline; worst by 1 - Dice, where an
                  empty truth predicted empty counts as perfect
  compare.png     teacher vs student (each test set's meanDic against parameters, GMACs and
                  latency), from the other role's metrics.json beside this one when it exists
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
from matplotlib.ticker import NullFormatter  # noqa: E402

from kdas.data.manifest import data_id  # noqa: E402
from kdas.evaluation.metrics import Evaluator  # noqa: E402
from kdas.io import atomic_path, binarise, read_mask, read_rgb, write_text  # noqa: E402
from kdas.maps import PREPARATIONS, THRESHOLD, prepare  # noqa: E402
from kdas.models import count_macs, count_parameters  # noqa: E402
from kdas.progress import Progress  # noqa: E402
from kdas.serving.inference import Segmenter  # noqa: E402

log = logging.getLogger(__name__)

# the overlay's colours (RGB 0-1): true positive, false positive, false negative
TP_COLOUR, FP_COLOUR, FN_COLOUR = (0.1, 0.85, 0.1), (1.0, 0.1, 0.1), (0.15, 0.45, 1.0)

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


def error_at(pred: np.ndarray, truth: np.ndarray, threshold: float = THRESHOLD) -> float:
    """1 - Dice of the mask at `threshold`; an empty truth predicted empty is perfect (0), not
    the 0 Dice a per-threshold mean gives it."""
    mask, truth = pred >= threshold, truth.astype(bool)
    both = mask.sum() + truth.sum()
    return 0.0 if both == 0 else 1.0 - 2.0 * float(np.logical_and(mask, truth).sum()) / float(both)


def evaluate_model(seg: Segmenter, manifest: pd.DataFrame, out_dir: str | Path, *, batch_size: int, grid_size: int,
                   threshold: float = THRESHOLD) -> dict:
    """Score `seg` on every dataset's test split; returns the metrics written to metrics.json.
    `batch_size`, `grid_size`: params.yaml `evaluate`; `threshold`: the masks of the pictures."""
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
        progress = Progress(range(0, len(records), batch_size), f"evaluate {dataset}")
        for start in progress:
            chunk = records[start : start + batch_size]
            images = [read_rgb(r.image_path) for r in chunk]
            for r, image, logits in zip(chunk, images, seg.logits(images, batch_size)):
                truth = binarise(read_mask(r.mask_path))
                pred = to_8bit(prepare(logits, "calibrated"))
                evaluator.add(str(r.id), pred, truth)
                paper.add(str(r.id), to_8bit(prepare(logits, "published")), truth)
                cases.append((error_at(pred, truth, threshold), str(dataset), r.image_path, truth, pred))
            progress.step(len(chunk))
        progress.close()
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
    _write(out_dir, result, pd.concat(per_image), pd.concat(curves), cases, grid_size, threshold)
    return result


def _write(out_dir: Path, result: dict, per_image: pd.DataFrame, curves: pd.DataFrame, cases: list, grid_size: int,
           threshold: float = THRESHOLD) -> None:
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
    _plot_curves(curves, out_dir / "curves.png", threshold)
    _plot_bars(bars, out_dir / "datasets.png")
    _plot_grid(cases, grid_size, out_dir / "grid.png", threshold)
    plot_comparison(out_dir, out_dir / "compare.png")


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plot_curves(curves: pd.DataFrame, path: Path, threshold: float = THRESHOLD) -> None:
    """Per test set and their mean; the threshold used (dashed) and the mean curve's best one (a star)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric in zip(axes, ("dice", "iou")):
        for dataset, c in curves.groupby("dataset"):
            ax.plot(c["threshold"], c[metric], label=dataset, alpha=0.8)
        mean = curves.groupby("threshold")[metric].mean()
        ax.plot(mean.index, mean.to_numpy(), color="black", lw=2, label="mean of test sets")
        used = mean.iloc[int(np.argmin(np.abs(mean.index.to_numpy() - threshold)))]
        ax.axvline(threshold, color="grey", ls="--", lw=1)
        ax.scatter([threshold], [used], color="black", zorder=3, label=f"used: {threshold:g} -> {used:.3f}")
        best_t = float(mean.idxmax())
        ax.scatter([best_t], [mean.max()], marker="*", s=180, color="tab:red", zorder=4, label=f"best: {best_t:.2f} -> {mean.max():.3f}")
        ax.set(xlabel="threshold", title=f"mean {metric.capitalize()} against threshold", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower center")
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


def overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray, threshold: float = THRESHOLD, alpha: float = 0.55) -> np.ndarray:
    """The image (RGB uint8) with the mask at `threshold` against the truth painted over it:
    true positives, false positives and false negatives in TP/FP/FN_COLOUR; float RGB in [0, 1]."""
    out = image.astype(np.float64) / 255.0
    mask, truth = pred >= threshold, truth.astype(bool)
    for where, colour in ((mask & truth, TP_COLOUR), (mask & ~truth, FP_COLOUR), (~mask & truth, FN_COLOUR)):
        out[where] = (1 - alpha) * out[where] + alpha * np.asarray(colour)
    return out


def _plot_grid(cases: list, n: int, path: Path, threshold: float = THRESHOLD) -> None:
    """The n worst and n best images by 1 - Dice at `threshold` (an empty truth predicted empty
    is perfect): image | overlay | probability map with the truth's outline."""
    from matplotlib.patches import Patch

    ranked = sorted(range(len(cases)), key=lambda k: (-cases[k][0], k))
    worst = ranked[:n]
    chosen = [("worst", cases[k]) for k in worst] + [("best", cases[k]) for k in ranked[::-1][:n] if k not in worst]
    fig, axes = plt.subplots(len(chosen), 3, figsize=(8.4, 2.6 * len(chosen) + 0.4), squeeze=False)
    for row, (kind, (error, dataset, image_path, truth, pred)) in zip(axes, chosen):
        image = read_rgb(image_path)
        row[0].imshow(image)
        row[0].set_title(f"{kind}: {dataset}/{Path(image_path).stem}\nDice {1 - error:.3f} at {threshold:g}", fontsize=8)
        row[1].imshow(overlay(image, pred, truth, threshold))
        row[1].set_title(f"mask at {threshold:g} vs truth", fontsize=8)
        row[2].imshow(pred, cmap="magma", vmin=0, vmax=1)
        if truth.any():
            row[2].contour(truth.astype(float), levels=[0.5], colors=[TP_COLOUR], linewidths=1)
        row[2].set_title("probability, truth outlined", fontsize=8)
        for ax in row:
            ax.set_axis_off()
    fig.legend(handles=[Patch(color=TP_COLOUR, label="true positive"), Patch(color=FP_COLOUR, label="false positive"),
                        Patch(color=FN_COLOUR, label="false negative")], loc="upper center", ncols=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    _save(fig, path)


def _dice_limits(scores: list[float], least_span: float = 0.1) -> tuple[float, float]:
    """y limits around `scores` spanning at least `least_span`, within [0, 1]: a 0.0002
    difference must not fill the whole axis."""
    lo, hi = min(scores), max(scores)
    pad = max((least_span - (hi - lo)) / 2, 0.1 * (hi - lo))
    lo, hi = max(0.0, lo - pad), min(1.0, hi + pad)
    return (lo, max(hi, lo + least_span)) if lo == 0.0 else (min(lo, hi - least_span), hi)


def plot_comparison(out_dir: Path, path: Path) -> None:
    """Teacher vs student: each test set's meanDic (and their mean) against parameters, GMACs and
    latency, from reports/evaluate/{teacher,student}/metrics.json (out_dir and its sibling);
    one role alone while the other has no metrics.json yet."""
    folders = {r: out_dir.parent / r for r in ("teacher", "student")} if out_dir.name in ("teacher", "student") else {out_dir.name: out_dir}
    roles = {r: json.loads((f / "metrics.json").read_text()) for r, f in folders.items() if (f / "metrics.json").exists()}
    axes_of = (("params_m", "parameters (M)"), ("gmacs", "GMACs per image"), ("latency_ms", "latency (ms, batch 1)"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    datasets = sorted({d for m in roles.values() for d in m["datasets"]}, key=lambda d: (d == "mean", d))
    colours = {d: ("black" if d == "mean" else f"C{k}") for k, d in enumerate(datasets)}
    markers = {"teacher": "o", "student": "s"}
    for ax, (key, label) in zip(axes, axes_of):
        for d in datasets:
            xs = [(m["efficiency"][key], m["datasets"][d]["meanDic"]) for m in roles.values() if d in m["datasets"]]
            if len(xs) > 1:
                ax.plot(*zip(*xs), color=colours[d], lw=2 if d == "mean" else 1, alpha=0.6)
            for role, m in roles.items():
                if d in m["datasets"]:
                    ax.scatter(m["efficiency"][key], m["datasets"][d]["meanDic"], marker=markers.get(role, "o"), color=colours[d], zorder=3)
        ax.set(xlabel=label, title=f"meanDic against {label.split(' (')[0]}")
        ax.set_xscale("log")
        # ticks at the models themselves, plainly labelled (log minor labels overlapped)
        values = sorted({m["efficiency"][key] for m in roles.values()})
        ax.set_xticks(values, [f"{v:.3g}" for v in values])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.15)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("meanDic (calibrated maps, test sets)")
    axes[0].set_ylim(*_dice_limits([m["datasets"][d]["meanDic"] for m in roles.values() for d in m["datasets"]]))
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=colours[d], lw=2, label=d) for d in datasets]
    handles += [Line2D([], [], color="grey", marker=markers.get(r, "o"), ls="", label=r) for r in roles]
    axes[-1].legend(handles=handles, fontsize=8, loc="best")
    devices = {m["efficiency"]["device"] for m in roles.values()}
    fig.suptitle(f"{' vs '.join(roles)} (latency on {', '.join(sorted(devices))})", fontsize=10)
    _save(fig, path)
