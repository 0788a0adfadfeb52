"""The evaluation pictures: the worst-case measure, the overlay's colours, the comparison figure."""

import json

import numpy as np
from PIL import Image

from kdas.evaluation.evaluate import FN_COLOUR, FP_COLOUR, TP_COLOUR, _plot_curves, _plot_grid, error_at, overlay, plot_comparison


def test_error_does_not_punish_a_correct_empty_frame():
    empty = np.zeros((8, 8), bool)
    full = np.ones((8, 8), bool)
    assert error_at(np.zeros((8, 8)), empty) == 0.0  # empty truth, empty prediction: perfect
    assert error_at(np.full((8, 8), 0.9), empty) == 1.0  # empty truth, something predicted: all wrong
    assert error_at(np.full((8, 8), 0.4), full) == 1.0  # below the threshold: nothing found
    half = np.zeros((8, 8)); half[:4] = 0.9
    assert abs(error_at(half, full) - (1 - 2 * 32 / 96)) < 1e-12


def test_overlay_colours_each_kind_of_pixel():
    image = np.zeros((1, 4, 3), np.uint8)
    pred = np.array([[0.9, 0.9, 0.1, 0.1]])
    truth = np.array([[1, 0, 1, 0]], bool)
    out = overlay(image, pred, truth, alpha=1.0)
    assert np.allclose(out[0, 0], TP_COLOUR) and np.allclose(out[0, 1], FP_COLOUR) and np.allclose(out[0, 2], FN_COLOUR)
    assert np.allclose(out[0, 3], 0)  # true negative: the image as it is


def _metrics(params_m, dice):
    return {"datasets": {"kvasir": {"meanDic": dice}, "mean": {"meanDic": dice}},
            "efficiency": {"params_m": params_m, "gmacs": params_m / 2, "latency_ms": params_m * 3, "device": "cpu"}}


def test_pictures_are_written(tmp_path):
    rng = np.random.default_rng(0)
    image = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(image)
    truth = np.zeros((16, 16), bool); truth[4:10, 4:10] = True
    cases = [(error_at(p, t), "synth", str(image), t, p) for p, t in
             [(rng.random((16, 16)), truth), (np.zeros((16, 16)), np.zeros((16, 16), bool)), (truth * 0.9, truth)]]
    _plot_grid(cases, 1, tmp_path / "grid.png")
    import pandas as pd
    curves = pd.DataFrame({"threshold": np.tile(np.linspace(1, 0, 5), 2), "dice": rng.random(10), "iou": rng.random(10),
                           "dataset": ["a"] * 5 + ["b"] * 5})
    _plot_curves(curves, tmp_path / "curves.png")
    for role, m in (("teacher", _metrics(25.1, 0.9)), ("student", _metrics(3.6, 0.85))):
        (tmp_path / role).mkdir()
        (tmp_path / role / "metrics.json").write_text(json.dumps(m))
    plot_comparison(tmp_path / "student", tmp_path / "compare.png")
    for name in ("grid.png", "curves.png", "compare.png"):
        assert Image.open(tmp_path / name).size[0] > 300
