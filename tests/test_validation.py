"""The data-contract page: thumbnails of the files found, near-duplicates grouped."""

import numpy as np
from PIL import Image

from kdas.data.validation import Finding, ValidationReport, _groups, render_html


def test_page_shows_thumbnails_and_groups(tmp_path):
    paths = []
    for k in range(3):
        paths.append(str(tmp_path / f"f{k}.png"))
        Image.fromarray(np.full((200, 300, 3), 40 * k, np.uint8)).save(paths[-1])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    report = ValidationReport(n_pairs=4, counts={"synth": {"train": 3, "test": 1}}, findings=[
        Finding("near_duplicate_test_train", "warning", paths[0], "a near-duplicate", paths[1]),
        Finding("near_duplicate_test_train", "warning", paths[1], "a near-duplicate", paths[2]),
        Finding("unreadable_image", "error", str(broken), "cannot decode"),
    ])
    page = render_html(report)
    assert page.count("data:image/jpeg;base64,") == 3  # the three readable files, once each
    assert "unreadable" in page and "1 group of files" in page
    assert page.index("unreadable_image") < page.index("near_duplicate_test_train")  # errors first


def test_groups_join_chains_of_pairs():
    found = [Finding("r", "warning", "a", "", "b"), Finding("r", "warning", "c", "", "b"), Finding("r", "warning", "x", "", "y")]
    assert _groups(found) == [["a", "b", "c"], ["x", "y"]]
