"""Manifest + data contract: good data passes, each bad case fails naming file and rule; a bad
file already in data/raw is one row's error or one line, never a hang."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from helpers import make_dataset, png_declaring, write_pair
from kdas.config import SplitParams, load_params
from kdas.data.manifest import build_manifest, read_manifest, write_manifest
from kdas.data.validation import validate_manifest, write_report

SPLIT = SplitParams(val_fraction=0.2, test_fraction=0.3, seed=1)


@pytest.fixture
def vparams(workdir):
    return load_params().validation


def check(raw, vparams, datasets=("ds",)):
    df = build_manifest(raw, list(datasets), SPLIT, near_duplicate_distance=4, workers=1)
    return df, validate_manifest(df, vparams)


def failing(report, rule):
    return [f for f in report.errors if f.rule == rule]


@pytest.mark.slow
def test_good_dataset_passes_and_reports_are_written(tmp_path, vparams):
    make_dataset(tmp_path / "raw" / "ds", n=10)
    df, report = check(tmp_path / "raw", vparams)
    assert report.success, report.errors
    assert sorted(df["split"].unique()) == ["test", "train", "val"]
    assert (df["channels"] == 3).all() and (df["width"] == 96).all()
    write_report(report, tmp_path / "r.json", tmp_path / "r.html")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["success"] and data["n_pairs"] == 10
    assert "PASSED" in (tmp_path / "r.html").read_text()


def test_splits_are_seeded_and_stable(tmp_path):
    make_dataset(tmp_path / "raw" / "ds", n=20)
    a = build_manifest(tmp_path / "raw", ["ds"], SPLIT, near_duplicate_distance=4, workers=1)
    b = build_manifest(tmp_path / "raw", ["ds"], SPLIT, near_duplicate_distance=4, workers=1)
    assert a["split"].tolist() == b["split"].tolist()
    assert a["split"].value_counts().to_dict() == {"train": 11, "test": 6, "val": 3}
    c = build_manifest(tmp_path / "raw", ["ds"], SplitParams(0.2, 0.3, seed=2), near_duplicate_distance=4, workers=1)
    assert a["split"].tolist() != c["split"].tolist()


def test_manifest_reads_only_changed_files(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw" / "ds", n=6).parent
    first = build_manifest(raw, ["ds"], SPLIT, near_duplicate_distance=4, workers=1)
    write_manifest(first, tmp_path / "m.parquet")
    write_pair(raw / "ds" / "images", raw / "ds" / "masks", "img03", seed=99, size=(100, 90))
    with caplog.at_level("INFO"):
        second = build_manifest(raw, ["ds"], SPLIT, read_manifest(tmp_path / "m.parquet"), near_duplicate_distance=4, workers=1)
    assert "6 pairs, 5 unchanged, 1 to read" in caplog.text
    changed = second.set_index("id").loc["img03"]
    assert (changed["width"], changed["height"]) == (100, 90)
    assert second.drop(index=3).equals(first.drop(index=3))


def test_size_mismatch_is_named(tmp_path, vparams):
    raw = make_dataset(tmp_path / "raw" / "ds", n=10).parent
    Image.fromarray(np.zeros((50, 60), np.uint8)).save(raw / "ds" / "masks" / "img04.png")
    _, report = check(raw, vparams)
    assert not report.success
    [f, *_] = failing(report, "mask_size")
    assert f.file.endswith("img04.png") and "image 96x80, mask 60x50" in f.detail


def test_image_without_mask_and_mask_without_image(tmp_path, vparams):
    raw = make_dataset(tmp_path / "raw" / "ds", n=10).parent
    (raw / "ds" / "masks" / "img01.png").unlink()
    (raw / "ds" / "images" / "img02.png").unlink()
    _, report = check(raw, vparams)
    details = {f.detail for f in failing(report, "decodable")}
    assert any("img01.png: image without mask" in d for d in details)
    assert any("img02.png: mask without image" in d for d in details)


def test_truncated_jpeg_and_corrupt_png_are_named(tmp_path, vparams):
    raw = make_dataset(tmp_path / "raw" / "ds", n=10, img_ext=".jpg").parent
    jpg = raw / "ds" / "images" / "img05.jpg"
    jpg.write_bytes(jpg.read_bytes()[:300])
    (raw / "ds" / "masks" / "img06.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    _, report = check(raw, vparams)
    files = {f.file for f in failing(report, "decodable")}
    assert any(f.endswith("img05.jpg") for f in files)
    assert any("img06.png" in f.detail for f in failing(report, "decodable"))


def test_non_binary_mask_fails(tmp_path, vparams):
    raw = make_dataset(tmp_path / "raw" / "ds", n=10).parent
    ramp = np.tile(np.linspace(0, 255, 96).astype(np.uint8), (80, 1))
    Image.fromarray(ramp).save(raw / "ds" / "masks" / "img07.png")
    _, report = check(raw, vparams)
    [f] = failing(report, "binary_mask")
    assert f.file.endswith("img07.png") and "neither 0 nor 255" in f.detail


def test_rgba_grayscale_and_16_bit_pass_as_three_channels(tmp_path, vparams):
    raw = make_dataset(tmp_path / "raw" / "ds", n=8).parent
    write_pair(raw / "ds" / "images", raw / "ds" / "masks", "rgba", mode="RGBA", seed=20)
    write_pair(raw / "ds" / "images", raw / "ds" / "masks", "grey", mode="L", seed=21)
    sixteen = (np.random.default_rng(3).integers(0, 65535, (80, 96))).astype(np.uint16)
    Image.fromarray(sixteen).save(raw / "ds" / "images" / "img00.png")  # 16-bit grey PNG
    df, report = check(raw, vparams)
    assert report.success, report.errors
    assert (df["channels"] == 3).all()
    assert {f.file.split("/")[-1] for f in report.warnings if f.rule == "grayscale_image"} == {"grey.png", "img00.png"}


def test_same_image_in_train_and_test_fails(tmp_path, vparams):
    raw = make_dataset(tmp_path / "raw" / "ds", n=10).parent
    df = build_manifest(raw, ["ds"], SPLIT, near_duplicate_distance=4, workers=1)
    train_id = df.loc[df["split"] == "train", "id"].iloc[0]
    test_id = df.loc[df["split"] == "test", "id"].iloc[0]
    shutil.copy(raw / "ds" / "images" / f"{train_id}.png", raw / "ds" / "images" / f"{test_id}.png")
    _, report = check(raw, vparams)
    [f] = failing(report, "duplicate_across_splits")
    assert train_id in f.detail + f.file and test_id in f.detail + f.file


def test_empty_mask_is_a_warning_only(tmp_path, vparams):
    raw = make_dataset(tmp_path / "raw" / "ds", n=10).parent
    write_pair(raw / "ds" / "images", raw / "ds" / "masks", "empty", fg=False, seed=30)
    _, report = check(raw, vparams)
    assert report.success
    assert [f.file.split("/")[-1] for f in report.warnings if f.rule == "empty_mask"] == ["empty.png"]


def test_missing_split_fails(tmp_path, vparams):
    raw = make_dataset(tmp_path / "raw" / "ds", n=2).parent
    df = build_manifest(raw, ["ds"], SplitParams(0.0, 0.0, 0), near_duplicate_distance=4, workers=1)
    report = validate_manifest(df, vparams)
    assert {f.detail.split(";")[0] for f in failing(report, "splits_present")} == {"no 'val' images", "no 'test' images"}


def test_the_same_files_give_the_same_manifest_in_any_clone(tmp_path, monkeypatch):
    make_dataset(tmp_path / "a" / "raw" / "ds", n=4)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # new mtimes, same content
    frames = []
    for clone in ("a", "b"):
        monkeypatch.chdir(tmp_path / clone)
        frames.append(build_manifest("raw", ["ds"], SPLIT, near_duplicate_distance=4, workers=1))
    assert frames[0].equals(frames[1])


# --------------------------------------------------------------------------- one bad file in data/raw


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "broken link"])
def test_a_special_file_in_data_raw_is_one_line_not_a_hang(tmp_path, kind):
    raw = make_dataset(tmp_path / "raw" / "ds", n=2).parent
    special = raw / "ds" / "images" / "img02.png"
    {"fifo": lambda: os.mkfifo(special), "dev-zero": lambda: special.symlink_to("/dev/zero"),
     "broken link": lambda: special.symlink_to(tmp_path / "gone.png")}[kind]()
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"images/img02.png: not a regular file \(a device, FIFO, folder or broken link\)"):
        build_manifest(raw, ["ds"], SplitParams(0.25, 0.25, seed=1), workers=1, near_duplicate_distance=4)
    assert time.monotonic() - start < 5


def test_a_decompression_bomb_in_data_raw_is_one_rows_error(tmp_path):
    raw = make_dataset(tmp_path / "raw" / "ds", n=4).parent
    (raw / "ds" / "images" / "img02.png").write_bytes(png_declaring(60000, 60000))
    start = time.monotonic()
    df = build_manifest(raw, ["ds"], SplitParams(0.25, 0.25, seed=1), workers=1, near_duplicate_distance=4)
    errors = dict(zip(df["id"], df["error"]))
    assert "img02.png: cannot decode image" in errors["img02"] and "decompression bomb" in errors["img02"]
    assert [errors[i] for i in ("img00", "img01", "img03")] == ["", "", ""]
    assert time.monotonic() - start < 30


def test_a_file_name_that_is_not_utf8_in_data_raw_is_one_line_naming_it(tmp_path):
    raw = make_dataset(tmp_path / "raw" / "ds", n=2).parent
    os.rename(raw / "ds" / "images" / "img01.png", raw / "ds" / "images" / (os.fsdecode(b"img\xfe") + ".png"))
    with pytest.raises(ValueError, match=r"images/img\\xfe\.png: its name is not valid UTF-8; rename it"):
        build_manifest(raw, ["ds"], SplitParams(0.25, 0.25, seed=1), workers=1, near_duplicate_distance=4)


def test_two_files_of_one_id_in_data_raw_are_one_line_naming_both(tmp_path):
    raw = make_dataset(tmp_path / "raw" / "ds", n=2).parent
    shutil.copy(raw / "ds" / "images" / "img00.png", raw / "ds" / "images" / "img00.jpg")
    with pytest.raises(ValueError, match=r"images/img00.png: same id as img00.jpg \(ids are file names without extension\); keep one"):
        build_manifest(raw, ["ds"], SplitParams(0.25, 0.25, seed=1), workers=1, near_duplicate_distance=4)
