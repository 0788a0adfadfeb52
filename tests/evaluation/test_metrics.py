"""kdas.evaluation.metrics: the UACANet/PraNet evaluation protocol, checked against shared test vectors;
`kdas metrics`'s errors, one line each."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench_metrics import loop_curves  # the protocol written naively, the benchmark's baseline too
from helpers import SHARED, kdas_cli, make_dataset, png_declaring
from kdas.evaluation.metrics import THRESHOLDS, Evaluator, MetricsInputError, evaluate_folders, image_scores, read_ground_truth, read_prediction

VECTORS = SHARED / "metric-vectors"


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def _disk(h=40, w=50, cy=20, cx=22, r=9) -> np.ndarray:
    yy, xx = np.ogrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _evaluator_with(pred, gt) -> Evaluator:
    ev = Evaluator()
    ev.add("x", pred, gt)
    return ev


# ----------------------------------------------------------------------------- test vectors


@pytest.fixture(scope="module")
def vectors():
    if not (VECTORS / "expected.json").is_file():
        pytest.skip(f"metric test vectors not found at {VECTORS.resolve()} (shared checkout)")
    expected = json.loads((VECTORS / "expected.json").read_text())
    return expected, evaluate_folders(VECTORS / "pred", VECTORS / "gt")


def test_dataset_figures_match_protocol(vectors):
    expected, ev = vectors
    summary = ev.summary()
    assert set(summary) == set(expected["dataset"])
    for key, value in expected["dataset"].items():
        assert summary[key] == pytest.approx(value, abs=1e-6), key


def test_per_image_figures_match_protocol(vectors):
    expected, ev = vectors
    table = ev.per_image().set_index("name")
    assert sorted(table.index) == sorted(expected["per_image"])
    for name, figures in expected["per_image"].items():
        for key, value in figures.items():
            assert table.loc[name, key] == pytest.approx(value, abs=1e-6), (name, key)


def test_curves_and_per_image_shape(vectors):
    _, ev = vectors
    curves = ev.curves()
    assert list(curves.columns) == ["threshold", "dice", "iou", "sen", "spe", "em"]
    assert len(curves) == 256 and np.array_equal(curves["threshold"], THRESHOLDS)
    summary = ev.summary()
    assert curves["dice"].max() == pytest.approx(summary["maxDic"])
    assert curves["em"].mean() == pytest.approx(summary["meanEm"])
    table = ev.per_image()
    columns = ["name", "meanDic", "meanIoU", "meanEm", "Sm", "wFm", "mae", "maxDic"]
    assert list(table.columns) == columns
    assert len(table) == len(ev) == 16


# ----------------------------------------------------------------------------- vectorisation


@pytest.mark.parametrize("eight_bit", [True, False], ids=["8-bit", "float"])
def test_vectorised_curves_equal_per_threshold_loop(eight_bit):
    rng = np.random.default_rng(7)
    gt = _disk(30, 37, 14, 17, 8)
    pred = np.clip(0.7 * gt + rng.normal(0.15, 0.25, gt.shape), 0, 1)
    # boundary values: every v/255 (66 of them lie one ulp below linspace's "same" threshold,
    # so the protocol binarises them as negative there) or the thresholds themselves
    if eight_bit:
        pred = np.round(pred * 255) / 255
        pred.flat[:256] = np.arange(256) / 255
    else:
        pred.flat[:256] = THRESHOLDS
    scores = image_scores(pred, gt)
    for key, ref in loop_curves(pred, gt).items():
        np.testing.assert_allclose(getattr(scores, key), ref, rtol=0, atol=1e-12, err_msg=key)


# ----------------------------------------------------------------------------- edge cases


def test_perfect_prediction():
    gt = _disk()
    s = image_scores(gt.astype(float), gt)
    assert s.mae == 0 and s.wfm == pytest.approx(1.0) and s.sm == pytest.approx(1.0, abs=1e-8)
    # binarised at any t > 0 the map is exactly gt; at t = 0 everything is positive
    assert np.allclose(s.dice[:-1], 1) and np.allclose(s.iou[:-1], 1)
    assert np.allclose(s.em[:-1], gt.size / (gt.size - 1))
    assert s.dice[-1] == pytest.approx(2 * gt.sum() / (gt.sum() + gt.size))


def test_all_zero_prediction():
    gt = _disk()
    s = image_scores(np.zeros(gt.shape), gt)
    # nothing is predicted until t = 0, where every pixel is positive
    assert np.all(s.dice[:-1] == 0) and np.all(s.iou[:-1] == 0) and np.all(s.spe == 0)
    assert s.sen[-1] == 1 and s.dice[-1] > 0
    assert s.wfm == 0 and s.mae == pytest.approx(gt.mean())


def test_empty_ground_truth():
    gt = np.zeros((20, 30), dtype=bool)
    pred = np.zeros(gt.shape)
    pred[:5, :5] = 0.8
    s = image_scores(pred, gt)
    assert np.all(s.dice == 0) and np.all(s.iou == 0) and np.all(s.sen == 0)
    assert s.sm == pytest.approx(1 - pred.mean())
    assert s.wfm == 0  # the protocol's NaN, scored 0
    # E-measure on an empty mask is the share of negative pixels (n - 1 normalised)
    assert s.em[0] == pytest.approx(gt.size / (gt.size - 1))
    assert s.em[-1] == pytest.approx(0)
    assert all(np.isfinite(v) for v in _evaluator_with(pred, gt).summary().values())


def test_full_ground_truth_is_finite():
    gt = np.ones((10, 12), dtype=bool)
    s = image_scores(np.full(gt.shape, 0.6), gt)
    assert all(np.isfinite(getattr(s, k)).all() for k in ("dice", "iou", "sen", "spe", "em"))
    assert s.sm == pytest.approx(0.6)


def test_bad_arrays_are_rejected():
    gt = _disk()
    with pytest.raises(MetricsInputError, match="img7.*size"):
        Evaluator().add("img7", np.zeros((4, 4)), gt)
    with pytest.raises(MetricsInputError, match=r"\[0, 1\]"):
        image_scores(gt * 255.0, gt)
    with pytest.raises(MetricsInputError, match="boolean"):
        image_scores(np.zeros(gt.shape), gt * 255)
    ev = _evaluator_with(gt.astype(float), gt)
    with pytest.raises(MetricsInputError, match="twice"):
        ev.add("x", gt.astype(float), gt)


def test_empty_evaluator_raises_clearly():
    ev = Evaluator()
    assert len(ev) == 0
    with pytest.raises(MetricsInputError, match="no images"):
        ev.summary()
    with pytest.raises(MetricsInputError, match="no images"):
        ev.curves()


# ----------------------------------------------------------------------------- files


def test_readers(tmp_path):
    rgb = np.zeros((6, 8, 3), dtype=np.uint8)
    rgb[2:4, 2:5] = 200
    _save(tmp_path / "m.jpg", rgb)  # lossy, RGB: converted to 'L', thresholded at 0.5
    gt = read_ground_truth(tmp_path / "m.jpg")
    assert gt.dtype == bool and gt.shape == (6, 8) and gt[3, 3] and not gt[0, 0]
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    pred = read_prediction(_save(tmp_path / "p.png", gray))
    assert pred.dtype == np.float64 and np.array_equal(pred, gray / 255)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(MetricsInputError, match="bad.png"):
        read_prediction(tmp_path / "bad.png")


def test_folders_pair_by_stem_any_extension(tmp_path):
    gt = _disk().astype(np.uint8) * 255
    _save(tmp_path / "pred" / "a.png", gt)
    _save(tmp_path / "gt" / "a.bmp", gt)
    _save(tmp_path / "pred" / "b.png", np.zeros_like(gt))
    _save(tmp_path / "gt" / "b.png", gt)
    (tmp_path / "pred" / "notes.txt").write_text("ignored")
    ev = evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    assert list(ev.per_image()["name"]) == ["a.png", "b.png"]
    assert isinstance(ev.per_image(), pd.DataFrame)


def test_folders_size_mismatch_names_files(tmp_path):
    _save(tmp_path / "pred" / "case1.png", np.zeros((10, 12)))
    _save(tmp_path / "gt" / "case1.png", np.zeros((10, 13)))
    with pytest.raises(MetricsInputError, match=r"case1\.png.*case1\.png.*differ in size"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt")


def test_folders_unpaired_files_named(tmp_path):
    _save(tmp_path / "pred" / "a.png", np.zeros((5, 5)))
    _save(tmp_path / "pred" / "only_pred.png", np.zeros((5, 5)))
    _save(tmp_path / "gt" / "a.png", np.zeros((5, 5)))
    _save(tmp_path / "gt" / "only_gt.jpg", np.zeros((5, 5)))
    with pytest.raises(MetricsInputError) as err:
        evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    assert "only_pred.png" in str(err.value) and "only_gt.jpg" in str(err.value)


def test_folders_without_pairs(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    with pytest.raises(MetricsInputError, match="no image pairs"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    with pytest.raises(MetricsInputError, match="does not exist"):
        evaluate_folders(tmp_path / "missing", tmp_path / "gt")


# --------------------------------------------------------------------------- one line, not a traceback


@pytest.mark.parametrize("side,rule", [(60000, r"cannot read as an image \(Image size \(3600000000 pixels\) exceeds limit"),
                                       (10000, r"image too large \(10000x10000 px declared; at most \d+ pixels\)")])
def test_a_decompression_bomb_in_kdas_metrics_is_one_line(tmp_path, side, rule):
    gt = make_dataset(tmp_path / "ds", n=2) / "masks"
    (tmp_path / "pred").mkdir()
    for name in ("img00.png", "img01.png"):
        (tmp_path / "pred" / name).write_bytes((gt / name).read_bytes())
    (tmp_path / "pred" / "img01.png").write_bytes(png_declaring(side, side))
    code, output = kdas_cli("metrics", str(tmp_path / "pred"), str(gt))
    assert code == 1 and len(output.strip().splitlines()) == 1
    assert re.match(rf"error: {re.escape(str(tmp_path / 'pred' / 'img01.png'))}: {rule}", output)
