"""Drift monitoring: the features a frame is profiled by, the reference profile a trained model
file carries, `kdas monitor` on real frames (held-out frames of the training dataset: no drift;
another hospital's: drift), its files, its MLflow record and its bad-input exits, and the frames
a served model logs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from helpers import DATASETS, SERVE, distill_params
from kdas.checkpoint import load_model, save_model
from kdas.config import ReferenceParams, RoleModel, SplitParams, SynthParams, TrainParams
from kdas.data.manifest import build_manifest
from kdas.data.synth import write_synth
from kdas.models import create_model
from kdas.monitoring.frame_log import FOLDER_ENV, SERVED_LOG
from kdas.monitoring.profile import (
    FRAME_FEATURES,
    PREDICTION_FEATURES,
    Reference,
    attach_reference,
    embedding_columns,
    frame_features,
    prediction_features,
)
from kdas.monitoring.watch import watch
from kdas.serving.codec import encode_image
from kdas.training import TrainJob, train

TINY = "polyp_pvt_tiny"
REFERENCE = ReferenceParams(frames=40, components=4, thumbnails=2)
KVASIR, CLINICDB = DATASETS / "kvasir-seg" / "Kvasir-SEG" / "images", DATASETS / "cvc-clinicdb" / "CVC-ClinicDB" / "PNG" / "Original"


def kdas(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdas", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_frame_features_see_light_colour_detail_and_size():
    rng = np.random.default_rng(0)
    dark, bright = np.full((60, 80, 3), 30, np.uint8), np.full((60, 80, 3), 220, np.uint8)
    red = np.zeros((60, 80, 3), np.uint8)
    red[..., 0] = 200
    noise = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    f = {name: frame_features(image, 32) for name, image in [("dark", dark), ("bright", bright), ("red", red), ("noise", noise)]}
    assert list(f["dark"]) == list(FRAME_FEATURES)
    assert f["dark"]["brightness"] < 0.2 and f["bright"]["brightness"] > 0.8
    assert f["red"]["red"] > 0.7 and f["red"]["green"] == f["red"]["blue"] == 0 and f["red"]["saturation"] == pytest.approx(1)
    assert f["noise"]["sharpness"] > 0.01 and f["dark"]["sharpness"] == 0 and f["noise"]["contrast"] > 0.1 and f["dark"]["contrast"] < 1e-6
    assert (f["noise"]["height"], f["noise"]["width"]) == (60, 80)


def test_prediction_features_measure_area_and_certainty():
    prob = np.zeros((10, 10), np.float32)
    prob[:5] = 1.0  # half the frame, with certainty
    assert prediction_features(prob) == {"predicted_area": 0.5, "confidence": 1.0, "uncertain": 0.0}
    unsure = np.full((10, 10), 0.5, np.float32)
    assert prediction_features(unsure) == {"predicted_area": 1.0, "confidence": 0.5, "uncertain": 1.0}


@pytest.fixture(scope="module")
def synth_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synth(root / "raw" / "synth", SynthParams(n_images=16, size=64, empty_fraction=0.0, seed=0))
    return build_manifest(root / "raw", ["synth"], SplitParams(val_fraction=0.25, test_fraction=0.2, seed=0), near_duplicate_distance=4, workers=1)


def test_a_trained_model_file_carries_its_training_frames_profile(synth_manifest, tmp_path):
    params = TrainParams(image_size=64, batch_size=4, epochs=1, lr=1e-3, weight_decay=1e-4, grad_clip=0.5, multiscale=[1.0], lr_decay=0.1,
                         decay_epochs=50, patience=20, seed=0, workers=0, nproc_per_node=1, amp=True, compile=False, augment=False,
                         weighted_bce=True)
    result = train(TrainJob(role="student", model=RoleModel(arch=TINY, backbone=None, weights="none", drop_path_rate=0.0),
                            manifest=synth_manifest, out_dir=tmp_path, train=params, distill=distill_params("none"), reference=REFERENCE))
    payload = torch.load(result.best_path, weights_only=True)  # tensors and plain values only
    reference = Reference.from_payload(load_model(result.best_path).reference, "best.pt")
    train_rows = int((synth_manifest["split"] == "train").sum())
    assert payload["reference"]["source"] == reference.source == f"{train_rows} of its {train_rows} training frames"
    assert list(reference.table.columns) == [*FRAME_FEATURES, *PREDICTION_FEATURES, *embedding_columns(4)]
    assert len(reference.table) == train_rows and reference.thumbnails.shape == (2, 96, 96, 3)
    assert np.isfinite(reference.table.to_numpy()).all()
    # the embedding columns are the frames' embeddings on the principal axes: centred on the reference
    assert np.allclose(reference.table[embedding_columns(4)].mean(), 0, atol=1e-3)


# --------------------------------------------------------------------------- real frames


def frames(folder: Path, names: list[str], into: Path) -> Path:
    into.mkdir(parents=True)
    for name in names:
        (into / name).symlink_to(folder / name)
    return into


@pytest.fixture(scope="module")
def kvasir_model(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny model whose reference profile is 40 Kvasir-SEG frames; the other names, held out."""
    if not KVASIR.is_dir():
        pytest.skip("../shared/datasets is not here")
    names = sorted(p.name for p in KVASIR.iterdir())
    root = tmp_path_factory.mktemp("kvasir-model")
    path = save_model(root / "model.pt", create_model(TINY), image_size=64)
    attach_reference(path, [KVASIR / n for n in names[:40]], REFERENCE, torch.device("cpu"))
    return path, names[40:]


@pytest.mark.slow
def test_monitor_finds_no_drift_in_held_out_frames_and_drift_in_another_hospitals(kvasir_model, workdir, mlflow_store):
    model, held_out = kvasir_model
    same = frames(KVASIR, held_out[:30], workdir / "kvasir-new")
    other = frames(CLINICDB, sorted(p.name for p in CLINICDB.iterdir())[:30], workdir / "clinicdb")
    verdicts = {}
    for folder in (same, other):
        run = kdas("monitor", str(folder), "--model", str(model), "--out", f"out-{folder.name}", cwd=workdir)
        assert run.returncode == 0, run.stderr[-2000:]  # drift or not
        verdicts[folder.name] = json.loads((workdir / f"out-{folder.name}" / "drift.json").read_text())
        assert (workdir / f"out-{folder.name}" / "report.html").stat().st_size > 10_000
        assert ("DRIFT" if verdicts[folder.name]["drift"] else "no drift") in run.stdout
    assert not verdicts["kvasir-new"]["drift"] and verdicts["kvasir-new"]["score"] <= 0.2
    assert verdicts["clinicdb"]["drift"] and verdicts["clinicdb"]["score"] >= 0.6
    assert {"height", "width", "sharpness"} <= set(verdicts["clinicdb"]["drifted"])  # 384 x 288 frames, not Kvasir-SEG's
    # each verdict is a `monitor` run of the store, with the model file's digest
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`kdas.stage` = 'monitor'")
    assert sorted(runs["metrics.drift_score"]) == sorted(v["score"] for v in verdicts.values())
    assert set(runs["metrics.frames"]) == {30.0}


def test_monitor_bad_input_is_one_line_and_exit_2(kvasir_model, workdir):
    model, _ = kvasir_model
    empty = workdir / "empty"
    empty.mkdir()
    run = kdas("monitor", str(empty), "--model", str(model), "--no-mlflow", cwd=workdir)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "no frames" in run.stderr
    bare = save_model(workdir / "bare.pt", create_model(TINY), image_size=64)
    shutil.copy(KVASIR / sorted(p.name for p in KVASIR.iterdir())[0], empty / "frame.jpg")
    run = kdas("monitor", str(empty), "--model", str(bare), "--no-mlflow", cwd=workdir)
    assert run.returncode == 2 and "carries no reference profile" in run.stderr and "Traceback" not in run.stderr
    (empty / SERVED_LOG).write_text('{"brightness": 0.3}\nnot json\n')
    run = kdas("monitor", str(empty), "--model", str(model), "--no-mlflow", cwd=workdir)
    assert run.returncode == 2 and f"{SERVED_LOG}: line 2 is no JSON" in run.stderr
    assert not (workdir / "reports" / "monitor").exists()  # nothing half-written


@pytest.mark.slow
def test_the_served_model_logs_what_it_saw_and_the_monitor_reads_it(kvasir_model, mlflow_store, monkeypatch, tmp_path):
    from kdas.tracking.registry import register_model

    model, held_out = kvasir_model
    register_model(model, "watched", {"kvasir/meanDic": 0.5}, evaluation_data="test", serving_config={**SERVE, "max_side": 4096}, onnx=False)
    log = tmp_path / "served"
    monkeypatch.setenv(FOLDER_ENV, str(log))
    served = mlflow.pyfunc.load_model("models:/watched/1")
    from kdas.io import read_rgb

    images = [read_rgb(KVASIR / name) for name in held_out[:12]]
    for start in (0, 6):
        served.predict(pd.DataFrame({"image": [encode_image(im) for im in images[start : start + 6]]}))
    rows = [json.loads(line) for line in (log / SERVED_LOG).read_text().splitlines()]
    assert len(rows) == 12 and {*FRAME_FEATURES, *PREDICTION_FEATURES, *embedding_columns(4)} <= set(rows[0])
    assert rows[0]["height"] == images[0].shape[0] and not list(log.glob("*.jpg"))  # frames kept only when asked
    verdict = watch(log, model, tmp_path / "out", max_frames=500, device="cpu", drift_share=0.5)
    assert verdict.frames == 12 and not verdict.drift and set(verdict.features) == set(rows[0]) - {"time"}
