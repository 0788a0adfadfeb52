"""`kdas data import`: every public layout, bad files named, nothing half-written."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import tifffile
from PIL import Image

from helpers import MAX_NONBINARY, make_dataset, write_pair
from kdas.data.importer import ImportError_, import_dataset
from kdas.io import read_mask, read_rgb


def imported(raw, name):
    return sorted(p.name for p in (raw / name / "images").iterdir()), sorted(p.name for p in (raw / name / "masks").iterdir())


def test_kvasir_layout_keeps_jpeg_bytes_and_binarises_jpeg_masks(tmp_path):
    src = tmp_path / "kvasir-seg" / "Kvasir-SEG"
    for i in range(3):
        write_pair(src / "images", src / "masks", f"cju{i}", img_ext=".jpg", mask_ext=".jpg", seed=i)
    (src / "kavsir_bboxes.json").write_text("{}")
    raw = tmp_path / "raw"
    [out] = import_dataset(tmp_path / "kvasir-seg", raw, track=False, max_nonbinary=MAX_NONBINARY)
    assert out == raw / "kvasir-seg"
    assert imported(raw, "kvasir-seg") == (["cju0.jpg", "cju1.jpg", "cju2.jpg"], ["cju0.png", "cju1.png", "cju2.png"])
    assert (out / "images" / "cju0.jpg").read_bytes() == (src / "images" / "cju0.jpg").read_bytes()
    assert set(np.unique(read_mask(out / "masks" / "cju0.png"))) <= {0, 255}


def test_clinicdb_png_layout(tmp_path):
    src = tmp_path / "CVC-ClinicDB" / "PNG"
    for i in (1, 2):
        write_pair(src / "Original", src / "Ground Truth", str(i), seed=i)
    [out] = import_dataset(tmp_path / "CVC-ClinicDB", tmp_path / "raw", track=False, max_nonbinary=MAX_NONBINARY)
    assert out.name == "cvc-clinicdb"
    assert imported(tmp_path / "raw", "cvc-clinicdb")[0] == ["1.png", "2.png"]


def test_clinicdb_tiff_layout_with_16_bit_images(tmp_path):
    src = tmp_path / "CVC-ClinicDB"
    (src / "Original").mkdir(parents=True)
    (src / "Ground Truth").mkdir()
    rng = np.random.default_rng(0)
    pixels16 = rng.integers(0, 65535, (72, 96, 3), dtype=np.uint16)
    tifffile.imwrite(src / "Original" / "1.tif", pixels16, photometric="rgb")
    mask = np.zeros((72, 96), np.uint8)
    mask[10:30, 10:40] = 255
    tifffile.imwrite(src / "Ground Truth" / "1.tif", mask)
    [out] = import_dataset(src, tmp_path / "raw", track=False, max_nonbinary=MAX_NONBINARY)
    assert out.name == "cvc-clinicdb"
    rgb = read_rgb(out / "images" / "1.png")
    assert rgb.shape == (72, 96, 3) and rgb.dtype == np.uint8
    # 16 bit scaled to 8 bit, the channel order kept
    assert abs(int(rgb[0, 0, 0]) - int(pixels16[0, 0, 0]) // 257) <= 1
    assert read_mask(out / "masks" / "1.png")[20, 20] == 255


def test_colondb_layout_jpg_images_png_masks(tmp_path):
    src = tmp_path / "cvc-colondb" / "CVC-ColonDB"
    for i in (1, 2):
        write_pair(src / "images", src / "masks", str(i), img_ext=".jpg", seed=i)
    [out] = import_dataset(tmp_path / "cvc-colondb", tmp_path / "raw", track=False, max_nonbinary=MAX_NONBINARY)
    assert out.name == "cvc-colondb" and imported(tmp_path / "raw", "cvc-colondb")[0] == ["1.jpg", "2.jpg"]


@pytest.mark.parametrize("folders", [("image", "mask"), ("images", "masks")])
def test_pranet_train_tree(tmp_path, folders):
    src = tmp_path / "TrainDataset"
    write_pair(src / folders[0], src / folders[1], "cju1")
    write_pair(src / folders[0], src / folders[1], "101", seed=1)
    [out] = import_dataset(src, tmp_path / "raw", track=False, max_nonbinary=MAX_NONBINARY)
    assert out.name == "pranet-train"


def test_pranet_test_tree_imports_each_dataset(tmp_path):
    src = tmp_path / "TestDataset"
    for name in ("Kvasir", "CVC-ClinicDB", "CVC-ColonDB", "ETIS-LaribPolypDB", "CVC-300"):
        write_pair(src / name / "images", src / name / "masks", "1")
    out = import_dataset(src, tmp_path / "raw", track=False, max_nonbinary=MAX_NONBINARY)
    assert sorted(p.name for p in out) == ["cvc-300", "cvc-clinicdb", "cvc-colondb", "etis-laribpolypdb", "kvasir-seg"]
    with pytest.raises(ImportError_, match="--name applies to one only"):
        import_dataset(src, tmp_path / "raw2", name="x", track=False, max_nonbinary=MAX_NONBINARY)


def test_plain_pair_needs_a_name_or_takes_the_folders(tmp_path):
    make_dataset(tmp_path / "my-clinic", n=2)
    [out] = import_dataset(tmp_path / "my-clinic", tmp_path / "raw", track=False, max_nonbinary=MAX_NONBINARY)
    assert out.name == "my-clinic"
    [out] = import_dataset(tmp_path / "my-clinic", tmp_path / "raw", name="renamed", track=False, max_nonbinary=MAX_NONBINARY)
    assert out.name == "renamed"


def test_zip_release(tmp_path):
    src = tmp_path / "src" / "Kvasir-SEG"
    write_pair(src / "images", src / "masks", "a", img_ext=".jpg", mask_ext=".jpg")
    archive = tmp_path / "kvasir-seg.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in src.rglob("*"):
            zf.write(p, p.relative_to(tmp_path / "src"))
    [out] = import_dataset(archive, tmp_path / "raw", track=False, max_nonbinary=MAX_NONBINARY)
    assert out.name == "kvasir-seg" and imported(tmp_path / "raw", "kvasir-seg")[0] == ["a.jpg"]


def test_zip_that_escapes_its_folder_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("images/a.png", b"x")
        zf.writestr("../../escaped.png", b"x")
    with pytest.raises(ImportError_, match=r"escaped\.png.*escapes"):
        import_dataset(archive, tmp_path / "raw", track=False, max_nonbinary=MAX_NONBINARY)
    assert not (tmp_path.parent / "escaped.png").exists()
    assert not (tmp_path / "raw").exists()


def test_zip_with_a_symlink_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("images/link.png")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ImportError_, match="symbolic link"):
        import_dataset(archive, tmp_path / "raw", track=False, max_nonbinary=MAX_NONBINARY)


def test_unknown_layout_says_what_was_found_and_expected(tmp_path):
    (tmp_path / "stuff" / "pictures").mkdir(parents=True)
    (tmp_path / "stuff" / "pictures" / "a.png").write_bytes(b"")
    with pytest.raises(ImportError_, match=r"(?s)Found: pictures/.*Expected.*images/ \+ masks/"):
        import_dataset(tmp_path / "stuff", tmp_path / "raw", track=False, max_nonbinary=MAX_NONBINARY)


def test_unpaired_files_are_named(tmp_path):
    src = make_dataset(tmp_path / "ds", n=2)
    write_pair(src / "images", tmp_path / "elsewhere", "lonely_image")
    write_pair(tmp_path / "elsewhere2", src / "masks", "lonely_mask")
    with pytest.raises(ImportError_, match=r"(?s)lonely_image\.png: image without mask.*lonely_mask\.png: mask without image"):
        import_dataset(src, tmp_path / "raw", track=False, max_nonbinary=MAX_NONBINARY)
    assert not (tmp_path / "raw" / "ds").exists()


def test_truncated_jpeg_is_named_and_nothing_is_half_written(tmp_path):
    src = make_dataset(tmp_path / "ds", n=4, img_ext=".jpg")
    raw = tmp_path / "raw"
    import_dataset(src, raw, track=False, max_nonbinary=MAX_NONBINARY)  # a first, good version
    before = imported(raw, "ds")
    bad = src / "images" / "img02.jpg"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(ImportError_, match="img02.jpg: cannot decode image"):
        import_dataset(src, raw, track=False, max_nonbinary=MAX_NONBINARY)
    assert imported(raw, "ds") == before  # the good version is untouched
    assert [p.name for p in raw.iterdir()] == ["ds"]  # and no temporary folder is left


def test_corrupt_png_is_named(tmp_path):
    src = make_dataset(tmp_path / "ds", n=2)
    (src / "masks" / "img01.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(ImportError_, match="img01.png: cannot decode image"):
        import_dataset(src, tmp_path / "raw", track=False, max_nonbinary=MAX_NONBINARY)
    assert not (tmp_path / "raw" / "ds").exists()


def test_soft_mask_is_refused(tmp_path):
    src = make_dataset(tmp_path / "ds", n=2)
    ramp = np.tile(np.linspace(0, 255, 96).astype(np.uint8), (80, 1))
    Image.fromarray(ramp).save(src / "masks" / "img00.png")
    with pytest.raises(ImportError_, match=r"img00.png: not a binary mask"):
        import_dataset(src, tmp_path / "raw", track=False, max_nonbinary=MAX_NONBINARY)


def test_rgba_and_grayscale_images_import(tmp_path):
    src = tmp_path / "ds"
    write_pair(src / "images", src / "masks", "rgba", mode="RGBA")
    write_pair(src / "images", src / "masks", "grey", mode="L", seed=1)
    [out] = import_dataset(src, tmp_path / "raw", track=False, max_nonbinary=MAX_NONBINARY)
    for stem in ("rgba", "grey"):
        assert read_rgb(out / "images" / f"{stem}.png").shape == (80, 96, 3)


@pytest.mark.slow
def test_import_tracks_with_dvc_in_a_dvc_repo(tmp_path, monkeypatch, tool_env):
    import subprocess

    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["dvc", "init", "-q"], check=True, env=tool_env)
    monkeypatch.setenv("PATH", tool_env["PATH"])
    src = make_dataset(tmp_path / "src" / "ds", n=2)
    import_dataset(src, "data/raw", max_nonbinary=MAX_NONBINARY)
    assert (tmp_path / "data" / "raw" / "ds.dvc").exists()
