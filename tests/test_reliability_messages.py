"""Failures that must read as one line naming the file and the rule, not a traceback: a
decompression bomb in `kdas metrics`, an oversized image in `kdas predict`, a full disk
during import or export, a tracking store that fails under `kdas promote`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import make_dataset, png_declaring
from kdas.cli import main


def kdas(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("side,rule", [(60000, r"cannot read as an image \(Image size \(3600000000 pixels\) exceeds limit"),
                                       (10000, r"image too large \(10000x10000 px declared; at most \d+ pixels\)")])
def test_a_decompression_bomb_in_kdas_metrics_is_one_line(tmp_path, side, rule):
    gt = make_dataset(tmp_path / "ds", n=2) / "masks"
    (tmp_path / "pred").mkdir()
    for name in ("img00.png", "img01.png"):
        (tmp_path / "pred" / name).write_bytes((gt / name).read_bytes())
    (tmp_path / "pred" / "img01.png").write_bytes(png_declaring(side, side))
    code, output = kdas("metrics", str(tmp_path / "pred"), str(gt))
    assert code == 1 and len(output.strip().splitlines()) == 1
    assert re.match(rf"error: {re.escape(str(tmp_path / 'pred' / 'img01.png'))}: {rule}", output)


@pytest.mark.slow
def test_predict_refuses_an_image_past_validation_max_size_before_decoding_it(workdir):
    from kdas.checkpoint import save_model
    from kdas.models import create_model

    save_model(workdir / "m.pt", create_model("polyp_pvt_tiny"), image_size=64)
    Image.fromarray(np.zeros((8, 4100, 3), np.uint8)).save(workdir / "wide.png")  # 4100 px wide, a few KB
    code, output = kdas("predict", "wide.png", "--model", "m.pt", "--out", "pred")
    assert code == 1
    assert output.strip().splitlines()[-1] == ("error: wide.png: image too large (4100x8 px; at most 4096 px a side, "
                                               "validation.max_size in params.yaml)")
    assert not any((workdir / "pred").iterdir())


@pytest.fixture
def full_disk(tmp_path) -> Path:
    """A 256 KiB tmpfs: writing more fails with ENOSPC, as a full disk does."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_during_import_is_one_line_and_leaves_nothing(workdir, full_disk):
    src = make_dataset(workdir / "ds", n=12, size=(160, 160))  # ~900 KB of noise: does not fit
    code, output = kdas("data", "import", str(src), "--raw", str(full_disk / "raw"), "--no-dvc")
    assert code == 1 and output.startswith("error: disk full") and len(output.strip().splitlines()) == 1
    assert "nothing half-written was kept" in output
    assert list((full_disk / "raw").iterdir()) == []


@pytest.mark.slow
def test_a_full_disk_during_export_is_one_line(workdir, full_disk):
    from kdas.checkpoint import save_model
    from kdas.models import create_model

    save_model(workdir / "m.pt", create_model("polyp_pvt_tiny"), image_size=64)  # ~1.8 MB of weights: the export does not fit
    code, output = kdas("export", "--model", "m.pt", "--out", str(full_disk / "m.onnx"))
    assert code == 1 and output.startswith("error: disk full") and len(output.strip().splitlines()) == 1
    assert list(full_disk.iterdir()) == []


@pytest.mark.slow
def test_a_failing_tracking_store_under_promote_is_one_line(workdir, monkeypatch):
    (workdir / "bad.db").write_bytes(np.random.default_rng(0).bytes(4096))  # not a database
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'bad.db'}")
    code, output = kdas("promote", "--version", "1")  # the version named: nothing is read before the store
    assert code == 1 and len(output.strip().splitlines()) == 1
    assert output.startswith(f"error: the MLflow tracking store sqlite:///{workdir / 'bad.db'} failed: ") and "file is not a database" in output


@pytest.mark.slow
def test_a_full_disk_saving_a_model_is_an_oserror_naming_the_file(workdir, full_disk):
    import errno

    from kdas.checkpoint import save_model
    from kdas.models import create_model

    with pytest.raises(OSError) as err:
        save_model(full_disk / "best.pt", create_model("polyp_pvt_tiny"), image_size=64)  # ~1.8 MB: does not fit
    assert err.value.errno == errno.ENOSPC and err.value.filename and "best.pt" in str(err.value.filename)
    assert list(full_disk.iterdir()) == []
