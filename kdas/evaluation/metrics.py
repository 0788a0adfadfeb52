"""Polyp-segmentation evaluation: PraNet's MATLAB toolbox as ported to Python by UACANet.

This is the protocol Polyp-PVT, KDAS and HSNet report (see ../shared/metric-vectors/README.md):
pred = png/255 (no re-normalisation), gt = png/255 > 0.5; 256 thresholds linspace(1, 0, 256),
binarised as pred >= t; Dice, IoU, sensitivity, specificity and E-measure per threshold (all
0 where TP = 0, except E-measure); S-measure, weighted F-measure and MAE on the raw map.
Dataset figures: the per-threshold curves are averaged over images, then `mean*` / `max*`
of that curve; Sm, wFm and mae are plain means over images.

The reference code loops over the 256 thresholds, re-binarising the whole image each time.
Here every per-threshold quantity is computed from one pass over the pixels (see
`_threshold_counts`), which gives identical counts and therefore identical numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from kdas.io import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS

__all__ = [
    "THRESHOLDS",
    "MetricsInputError",
    "read_prediction",
    "read_ground_truth",
    "ImageScores",
    "image_scores",
    "mean_dice",
    "structure_measure",
    "weighted_fmeasure",
    "Evaluator",
    "evaluate_folders",
]

THRESHOLDS = np.linspace(1, 0, 256)
_EPS = np.finfo(np.float64).eps
# 8-bit (or 1-bit / palette) images only: png/255 must land in [0, 1].
_ACCEPTED_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


class MetricsInputError(ValueError):
    """Bad evaluation input; the message names the offending file(s) or image and the rule."""


# ----------------------------------------------------------------------------- reading


def _read_8bit(path) -> np.ndarray:
    path = Path(path)
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:  # from the header: a small file can declare gigapixels
                raise MetricsInputError(f"{path}: image too large ({img.width}x{img.height} px declared; at most {MAX_IMAGE_PIXELS} pixels)")
            if img.mode not in _ACCEPTED_MODES:
                raise MetricsInputError(
                    f"{path}: image mode {img.mode!r} is not 8-bit; masks and predictions "
                    "must be 8-bit images (value/255 is the probability)"
                )
            return np.asarray(img.convert("L"))
    except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as exc:
        raise MetricsInputError(f"{path}: cannot read as an image ({exc})") from exc


def read_prediction(path) -> np.ndarray:
    """Probability map as float64 HxW in [0, 1] = png/255 (colour images converted to 'L')."""
    return _read_8bit(path).astype(np.float64) / 255


def read_ground_truth(path) -> np.ndarray:
    """Binary mask as bool HxW = png/255 > 0.5."""
    return _read_8bit(path).astype(np.float64) / 255 > 0.5


# ----------------------------------------------------------------------------- per image


@dataclass
class ImageScores:
    """One image's figures. Curves have 256 entries, index i is threshold THRESHOLDS[i]."""

    dice: np.ndarray
    iou: np.ndarray
    sen: np.ndarray
    spe: np.ndarray
    em: np.ndarray
    sm: float
    wfm: float
    mae: float


def _check_pair(pred, gt, name: str | None) -> tuple[np.ndarray, np.ndarray]:
    where = f"{name}: " if name else ""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.ndim != 2 or gt.ndim != 2:
        raise MetricsInputError(
            f"{where}prediction and ground truth must be 2-D (HxW); got {pred.shape} and {gt.shape}"
        )
    if pred.shape != gt.shape:
        raise MetricsInputError(
            f"{where}prediction size {pred.shape} differs from ground-truth size {gt.shape}"
        )
    if pred.size == 0:
        raise MetricsInputError(f"{where}empty image")
    if gt.dtype != bool:
        if not np.isin(gt, (0, 1)).all():
            raise MetricsInputError(f"{where}ground truth must be boolean (or 0/1)")
        gt = gt.astype(bool)
    pred = pred.astype(np.float64, copy=False)
    if not (np.isfinite(pred).all() and pred.min() >= 0 and pred.max() <= 1):
        raise MetricsInputError(
            f"{where}prediction must be a probability map in [0, 1] (did you forget /255?); "
            f"got range [{np.nanmin(pred)}, {np.nanmax(pred)}]"
        )
    return pred, gt


# Ascending thresholds, padded so that index 256 ("above every threshold") is valid.
_ASCENDING = np.append(THRESHOLDS[::-1], np.inf)


def _threshold_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TP and FP at each of the 256 thresholds in O(pixels + 256), no per-threshold pass.

    A pixel p is positive at the thresholds t <= p; THRESHOLDS descends, so those are the
    indices i >= 256 - n_le(p), n_le = how many thresholds are <= p. A histogram of that
    first index over fg (bg) pixels, cumulated, counts the fg (bg) pixels positive at each
    threshold. n_le comes from the same float comparison `t <= p` as the protocol's
    `pred >= t`, so the counts are exact: this matters, since linspace's thresholds are not
    exactly j/255 (66 of the 8-bit values v/255 fall one ulp below their "own" threshold
    and the protocol counts them negative there).
    """
    p = pred.ravel()
    # The thresholds lie within an ulp of j/255, so with j0 = floor(255 p) every threshold
    # below index j0 is <= p and every one above j0 + 1 is > p: two comparisons settle it.
    j0 = np.minimum((p * 255).astype(np.intp), 255)
    n_le = j0 + (_ASCENDING[j0] <= p) + (_ASCENDING[j0 + 1] <= p)
    first = THRESHOLDS.size - n_le
    hist = np.bincount(first + 257 * gt.ravel(), minlength=2 * 257).reshape(2, 257)
    fp, tp = np.cumsum(hist[:, :-1], axis=1).astype(np.float64)
    return tp, fp


def _enhanced_measure(tp, fp, n_fg, n) -> np.ndarray:
    """E-measure of the binarised map at every threshold, from the confusion counts.

    On a binary map the alignment term takes one value per (pred bit, gt bit) class:
    pred - mean(pred) and gt - mean(gt) are constant within each class. So the sum over
    pixels is sum over the 4 classes of count * value, with the protocol's eps kept.
    """
    if n_fg == 0:  # protocol: enhanced map = 1 - binarised pred
        total = n - (tp + fp)
    elif n_fg == n:  # protocol: enhanced map = binarised pred
        total = tp + fp
    else:
        fn = n_fg - tp
        tn = n - n_fg - fp
        mu_p = (tp + fp) / n
        mu_g = n_fg / n
        total = np.zeros_like(tp)
        for count, b, g in ((tp, 1, 1), (fp, 1, 0), (fn, 0, 1), (tn, 0, 0)):
            a_p, a_g = b - mu_p, g - mu_g
            align = 2 * a_g * a_p / (a_g**2 + a_p**2 + _EPS)
            total += count * (align + 1) ** 2 / 4
    return total / (n - 1 + _EPS)


def _ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    # S-measure's region similarity; N-1 normalisation and the eps as in the protocol.
    n = pred.size
    x, y = pred.mean(), gt.mean()
    dx, dy = pred - x, gt - y
    sx2 = np.sum(dx * dx) / (n - 1 + _EPS)
    sy2 = np.sum(dy * dy) / (n - 1 + _EPS)
    sxy = np.sum(dx * dy) / (n - 1 + _EPS)
    alpha = 4 * x * y * sxy
    beta = (x**2 + y**2) * (sx2 + sy2)
    if alpha != 0:
        return alpha / (beta + _EPS)
    return 1.0 if beta == 0 else 0.0


def _object(values: np.ndarray) -> float:
    # the port uses the (population) std, not the variance, in the denominator
    x = values.mean()
    return 2.0 * x / (x**2 + 1 + values.std() + _EPS)


def structure_measure(pred: np.ndarray, gt: np.ndarray) -> float:
    """S-measure (alpha = 0.5): object-aware + region-aware structural similarity."""
    u = gt.mean()
    if u == 0:
        return float(1 - pred.mean())
    if u == 1:
        return float(pred.mean())
    s_object = u * _object(pred[gt]) + (1 - u) * _object(1 - pred[~gt])
    # region term: split at the rounded gt centroid (rows x, cols y), four weighted SSIMs
    rows, cols = np.nonzero(gt)
    x, y = int(np.rint(rows.mean())), int(np.rint(cols.mean()))
    gtf = gt.astype(np.float64)
    s_region = 0.0
    for sl in (np.s_[:x, :y], np.s_[x:, :y], np.s_[:x, y:], np.s_[x:, y:]):
        p, g = pred[sl], gtf[sl]
        if p.size:  # an empty quadrant has weight 0 (the port would give NaN)
            s_region += _ssim(p, g) * p.size / pred.size
    return float(max(0.5 * s_object + 0.5 * s_region, 0.0))


# 7x7 Gaussian, sigma 5 (MATLAB fspecial): separable, so two 1-D passes give the same filter.
_G1 = np.exp(-(np.arange(-3, 4) ** 2) / (2 * 5.0**2))
_G1 /= _G1.sum()


def weighted_fmeasure(pred: np.ndarray, gt: np.ndarray) -> float:
    """Weighted F-measure (beta^2 = 1), Margolin et al.; 0 for an empty ground truth.

    The protocol gives NaN for an empty ground truth (mean over no fg pixels); like
    PySODMetrics we score it 0 so one such image does not poison the dataset mean.
    """
    if not gt.any():
        return 0.0
    err = np.abs(pred - gt)
    # nearest fg pixel of every pixel (itself on fg); the distance follows from the indices
    # exactly as scipy computes it, so skip scipy's second pass for it
    near_r, near_c = ndimage.distance_transform_edt(
        ~gt, return_distances=False, return_indices=True
    )
    rows, cols = np.indices(gt.shape)
    dist = np.sqrt((near_r - rows) ** 2 + (near_c - cols) ** 2, dtype=np.float64)
    # every bg pixel takes the error of its nearest fg pixel, then Gaussian smoothing
    err_t = np.take(err, near_r * gt.shape[1] + near_c)
    smooth = ndimage.correlate1d(err_t, _G1, axis=0, mode="nearest")
    smooth = ndimage.correlate1d(smooth, _G1, axis=1, mode="nearest")
    # fg errors may be lowered to the smoothed error (tolerates small dependent errors)
    ew_fg = np.where(gt, np.minimum(smooth, err), 0.0).sum()
    # bg errors count more the further they are from the object (weight 1 at distance 0)
    ew_bg = np.where(gt, 0.0, err * (2.0 - np.exp(np.log(0.5) / 5 * dist))).sum()
    n_fg = np.count_nonzero(gt)
    tpw = n_fg - ew_fg
    recall = 1 - ew_fg / n_fg
    precision = tpw / (tpw + ew_bg + _EPS)
    return float(2 * recall * precision / (recall + precision + _EPS))


def _ratio(num: np.ndarray, den: np.ndarray, tp: np.ndarray) -> np.ndarray:
    """num / den at each threshold; the protocol makes every ratio 0 where TP = 0 (den is 0
    only for specificity on an all-foreground mask)."""
    ok = (tp > 0) & (den > 0)
    return np.where(ok, num / np.where(ok, den, 1.0), 0.0)


def _curves(pred: np.ndarray, gt: np.ndarray) -> dict[str, np.ndarray]:
    """Dice, IoU, sensitivity, specificity and E-measure at the 256 thresholds."""
    n = float(gt.size)
    n_fg = float(gt.sum())
    tp, fp = _threshold_counts(pred, gt)
    n_pos = tp + fp
    fn = n_fg - tp
    tn = n - n_fg - fp
    return {
        "dice": _ratio(2 * tp, n_fg + n_pos, tp),
        "iou": _ratio(tp, fn + n_pos, tp),
        "sen": _ratio(tp, n_fg, tp),
        "spe": _ratio(tn, tn + fp, tp),
        "em": _enhanced_measure(tp, fp, n_fg, n),
    }


def mean_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """One image's meanDic (the mean of its 256-threshold Dice curve) and nothing else:
    what model selection needs every epoch, without the S-measure and weighted F-measure
    that cost most of :func:`image_scores`. A dataset's meanDic is the mean of these."""
    pred, gt = _check_pair(pred, gt, None)
    tp, fp = _threshold_counts(pred, gt)
    return float(_ratio(2 * tp, float(gt.sum()) + tp + fp, tp).mean())


def image_scores(pred: np.ndarray, gt: np.ndarray, *, name: str | None = None) -> ImageScores:
    """All figures of one image. pred: float in [0, 1]; gt: bool; same HxW shape.

    `name` (optional) only labels error messages.
    """
    pred, gt = _check_pair(pred, gt, name)
    return ImageScores(
        **_curves(pred, gt),
        sm=structure_measure(pred, gt),
        wfm=weighted_fmeasure(pred, gt),
        mae=float(np.mean(np.abs(gt - pred))),
    )


# ----------------------------------------------------------------------------- dataset

_CURVES = ("dice", "iou", "sen", "spe", "em")


class Evaluator:
    """Accumulates per-image scores; summarises them the way papers report them."""

    def __init__(self) -> None:
        self._names: list[str] = []
        self._seen: set[str] = set()
        self._scores: list[ImageScores] = []

    def add(self, name: str, pred: np.ndarray, gt: np.ndarray) -> ImageScores:
        if name in self._seen:
            raise MetricsInputError(f"{name}: image added twice")
        scores = image_scores(pred, gt, name=name)
        self._seen.add(name)
        self._names.append(name)
        self._scores.append(scores)
        return scores

    def __len__(self) -> int:
        return len(self._scores)

    def _require(self) -> None:
        if not self._scores:
            raise MetricsInputError("no images evaluated yet: add() at least one image first")

    def _curve(self, key: str) -> np.ndarray:
        return np.mean([getattr(s, key) for s in self._scores], axis=0)

    def curves(self) -> pd.DataFrame:
        """The dataset mean curves: 256 rows, one per threshold (1 down to 0)."""
        self._require()
        return pd.DataFrame({"threshold": THRESHOLDS, **{k: self._curve(k) for k in _CURVES}})

    def summary(self) -> dict[str, float]:
        self._require()
        dice, iou, em = self._curve("dice"), self._curve("iou"), self._curve("em")
        return {
            "meanDic": float(dice.mean()),
            "maxDic": float(dice.max()),
            "meanIoU": float(iou.mean()),
            "maxIoU": float(iou.max()),
            "meanEm": float(em.mean()),
            "maxEm": float(em.max()),
            "meanSen": float(self._curve("sen").mean()),
            "meanSpe": float(self._curve("spe").mean()),
            "Sm": float(np.mean([s.sm for s in self._scores])),
            "wFm": float(np.mean([s.wfm for s in self._scores])),
            "mae": float(np.mean([s.mae for s in self._scores])),
        }

    def per_image(self) -> pd.DataFrame:
        rows = [
            {
                "name": name,
                "meanDic": float(s.dice.mean()),
                "meanIoU": float(s.iou.mean()),
                "meanEm": float(s.em.mean()),
                "Sm": s.sm,
                "wFm": s.wfm,
                "mae": s.mae,
                "maxDic": float(s.dice.max()),
            }
            for name, s in zip(self._names, self._scores)
        ]
        columns = ["name", "meanDic", "meanIoU", "meanEm", "Sm", "wFm", "mae", "maxDic"]
        return pd.DataFrame(rows, columns=columns)


def _images_by_stem(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise MetricsInputError(f"{folder}: {role} folder does not exist")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            if path.stem in found:
                raise MetricsInputError(
                    f"{found[path.stem]} and {path}: two {role} files with the same stem"
                )
            found[path.stem] = path
    return found


def _listing(paths: list[Path], limit: int = 20) -> str:
    names = ", ".join(p.name for p in paths[:limit])
    return names + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def evaluate_folders(pred_dir, gt_dir) -> Evaluator:
    """Evaluate every prediction against the ground truth with the same file stem."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    preds = _images_by_stem(pred_dir, "prediction")
    gts = _images_by_stem(gt_dir, "ground-truth")
    problems = []
    if no_gt := sorted(set(preds) - set(gts)):
        problems.append(f"predictions without ground truth in {gt_dir}: "
                        + _listing([preds[s] for s in no_gt]))
    if no_pred := sorted(set(gts) - set(preds)):
        problems.append(f"ground truths without prediction in {pred_dir}: "
                        + _listing([gts[s] for s in no_pred]))
    if problems:
        raise MetricsInputError(
            "every image needs both files (paired by file stem); " + "; ".join(problems)
        )
    if not preds:
        raise MetricsInputError(f"no image pairs found in {pred_dir} and {gt_dir}")
    evaluator = Evaluator()
    for stem in sorted(preds):
        pred, gt = read_prediction(preds[stem]), read_ground_truth(gts[stem])
        if pred.shape != gt.shape:
            raise MetricsInputError(
                f"{preds[stem]} ({pred.shape[1]}x{pred.shape[0]}) and {gts[stem]} "
                f"({gt.shape[1]}x{gt.shape[0]}): prediction and ground truth differ in size"
            )
        evaluator.add(preds[stem].name, pred, gt)
    return evaluator
