"""The real releases in ../shared/datasets: counts, the PraNet split and the contract."""

from __future__ import annotations

import pytest

from helpers import DATASETS, MAX_NONBINARY
from kdas.config import load_params
from kdas.data.importer import import_dataset
from kdas.data.manifest import build_manifest
from kdas.data.validation import validate_manifest

pytestmark = [pytest.mark.slow, pytest.mark.realdata, pytest.mark.skipif(not DATASETS.exists(), reason=f"{DATASETS} not present")]


def test_import_split_and_validate_the_three_releases(workdir):
    params = load_params()
    counts = {}
    for folder in ("kvasir-seg", "cvc-clinicdb", "cvc-colondb"):
        [out] = import_dataset(DATASETS / folder, "data/raw", track=False, max_nonbinary=MAX_NONBINARY)
        counts[out.name] = len(list((out / "images").iterdir()))
    assert counts == {"kvasir-seg": 1000, "cvc-clinicdb": 612, "cvc-colondb": 380}

    df = build_manifest("data/raw", list(counts), params.data.split, near_duplicate_distance=params.validation.near_duplicate_distance)
    report = validate_manifest(df, params.validation)
    by = df.groupby(["dataset", "split"]).size()
    assert by[("kvasir-seg", "test")] == 100 and by[("cvc-clinicdb", "test")] == 62 and by[("cvc-colondb", "test")] == 380
    assert (df["split"].isin(["train", "val"]) & (df["dataset"] != "cvc-colondb")).sum() == 1450
    # val is drawn by near-duplicate group: about 10% of each dataset's train part, and no
    # video frame has a near-duplicate on the other side
    assert 88 <= by[("kvasir-seg", "val")] <= 100 and 53 <= by[("cvc-clinicdb", "val")] <= 70
    assert report.success, report.errors[:5]
    assert not [f for f in report.warnings if f.rule == "near_duplicate_train_val"]
    # the published split keeps neighbouring video frames apart only by chance: reported, not fatal
    assert any(f.rule == "near_duplicate_test_train" for f in report.warnings)
