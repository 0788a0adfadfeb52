"""Benchmark: vectorised threshold curves in kdas.evaluation.metrics vs a straightforward per-threshold loop.

The loop below is the reference way the protocol is usually written (re-binarise the whole
image at each of the 256 thresholds, count, compute the E-measure pixel by pixel): the
baseline here and the oracle of tests/evaluation/test_metrics.py. Inputs: the 16 metric-vectors pairs and, if ../shared/datasets
exists, some real masks (Kvasir-SEG, CVC-ColonDB, native size) with synthetic degraded
predictions, both quantised to 8 bits (png/255, the protocol's input) and as raw floats.
Prints images, loop seconds, vectorised seconds, speed-up and the largest absolute
difference between the two over every curve and scalar.

    PYTHONPATH=. python benchmarks/bench_metrics.py [--real 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from kdas.evaluation import metrics as M

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared"
EPS = np.finfo(np.float64).eps


# ----------------------------------------------------------------------------- reference


def loop_curves(pred: np.ndarray, gt: np.ndarray) -> dict[str, np.ndarray]:
    """Dice/IoU/Sen/Spe/E-measure by re-binarising the image at each threshold."""
    n, n_fg = gt.size, gt.sum()
    g = gt.astype(np.float64)
    out = {k: np.zeros(M.THRESHOLDS.size) for k in ("dice", "iou", "sen", "spe", "em")}
    for i, t in enumerate(M.THRESHOLDS):
        b = pred >= t
        tp = np.sum(b & gt)
        n_pos = np.sum(b)
        fn, fp = n_fg - tp, n_pos - tp
        tn = n - n_pos - fn
        if tp > 0:
            out["dice"][i] = 2 * tp / (n_fg + n_pos)
            out["iou"][i] = tp / (fn + n_pos)
            out["sen"][i] = tp / n_fg
            out["spe"][i] = tn / (tn + fp) if tn + fp > 0 else 0.0
        bf = b.astype(np.float64)
        if n_fg == 0:
            enhanced = 1 - bf
        elif n_fg == n:
            enhanced = bf
        else:
            ap, ag = bf - bf.mean(), g - g.mean()
            align = 2 * ag * ap / (ag**2 + ap**2 + EPS)
            enhanced = (align + 1) ** 2 / 4
        out["em"][i] = enhanced.sum() / (n - 1 + EPS)
    return out


def scalars(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    # Sm / wFm / MAE are not per-threshold: both sides use the same code for them.
    return {"sm": M.structure_measure(pred, gt), "wfm": M.weighted_fmeasure(pred, gt),
            "mae": float(np.mean(np.abs(gt - pred)))}


# ----------------------------------------------------------------------------- inputs


def vector_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    d = SHARED / "metric-vectors"
    if not d.is_dir():
        return []
    return [
        (M.read_prediction(p), M.read_ground_truth(d / "gt" / p.name))
        for p in sorted((d / "pred").glob("*.png"))
    ]


def degrade(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible probability map: shifted, blurred, noisy, with a false-positive blob."""
    p = np.roll(gt.astype(np.float64), tuple(rng.integers(-15, 16, size=2)), axis=(0, 1))
    p = ndimage.gaussian_filter(p, sigma=rng.uniform(2, 8))
    h, w = gt.shape
    yy, xx = np.ogrid[:h, :w]
    cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.uniform(0.03, 0.1) * min(h, w)
    p = np.maximum(p, 0.6 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2)))
    return np.clip(p + rng.normal(0, 0.05, size=p.shape), 0, 1)


def real_pairs(count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    folders = [
        SHARED / "datasets" / "kvasir-seg" / "Kvasir-SEG" / "masks",
        SHARED / "datasets" / "cvc-colondb" / "CVC-ColonDB" / "masks",
    ]
    folders = [f for f in folders if f.is_dir()]
    if not folders or count <= 0:
        return []
    rng = np.random.default_rng(seed)
    pairs = []
    for k, folder in enumerate(folders):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in M.IMAGE_EXTENSIONS)
        share = count // len(folders) + (k < count % len(folders))
        for p in files[:share]:
            gt = M.read_ground_truth(p)
            pairs.append((degrade(gt, rng), gt))
    return pairs


# ----------------------------------------------------------------------------- timing


def timed(fn, pairs, repeat: int) -> tuple[float, list]:
    """Best wall time of `repeat` passes of fn over all pairs, and the last pass's results."""
    best, out = float("inf"), []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = [fn(p, g) for p, g in pairs]
        best = min(best, time.perf_counter() - t0)
    return best, out


def max_diff(ref: list[dict], got: list[M.ImageScores]) -> float:
    worst = 0.0
    for r, g in zip(ref, got):
        for k, v in r.items():
            worst = max(worst, float(np.max(np.abs(np.asarray(v) - getattr(g, k)))))
    return worst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", type=int, default=16,
                    help="real masks (half Kvasir-SEG, half CVC-ColonDB) with synthetic "
                         "predictions, if ../shared/datasets exists (default 16; 0 to skip); "
                         "evaluated as saved 8-bit PNGs would be (png/255) and as raw float maps")
    ap.add_argument("--repeat", type=int, default=3,
                    help="timing repeats of the fast parts, best kept (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic predictions")
    args = ap.parse_args(argv)

    real = real_pairs(args.real, args.seed)
    sets = [
        ("metric-vectors", vector_pairs()),
        ("real, 8-bit", [(np.round(p * 255) / 255, g) for p, g in real]),
        ("real, float", real),  # raw model output: the binary-search path
    ]
    sets = [(name, pairs) for name, pairs in sets if pairs]
    if not sets:
        raise SystemExit("no inputs: neither ../shared/metric-vectors nor ../shared/datasets found")

    header = (f"{'input':<15} {'part':<11} {'images':>6} {'Mpix':>5} {'loop s':>7} "
              f"{'vector s':>8} {'speed-up':>8} {'max|diff|':>9}")
    print(header)
    print("-" * len(header))
    for name, pairs in sets:
        mpix = sum(g.size for _, g in pairs) / 1e6
        t_loop, ref = timed(loop_curves, pairs, 1)  # slow and steady: once is enough
        t_scalar, ref_s = timed(scalars, pairs, args.repeat)
        t_vec_c, _ = timed(M._curves, pairs, args.repeat)
        t_vec, got = timed(M.image_scores, pairs, args.repeat)
        diff = max_diff([{**c, **s} for c, s in zip(ref, ref_s)], got)
        for part, lo, ve in (("curves", t_loop, t_vec_c), ("all", t_loop + t_scalar, t_vec)):
            print(f"{name:<15} {part:<11} {len(pairs):>6} {mpix:>5.2f} {lo:>7.2f} "
                  f"{ve:>8.4f} {lo / ve:>7.0f}x {diff:>9.1e}")
    print("curves = Dice/IoU/Sen/Spe/E-measure at 256 thresholds; all = image_scores (adds Sm, "
          "wFm, MAE: same code both sides). max|diff| over every curve point and scalar.")


if __name__ == "__main__":
    main()
