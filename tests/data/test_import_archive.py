"""A zip whose names cannot all be files and folders at once (a file and a folder of the same
name) is refused before anything is extracted, in one line naming the archive and the entry
(issue 32, low 11: a FileExistsError traceback)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from helpers import MAX_NONBINARY, kdas_cli, write_pair
from kdas.data.importer import ImportError_, import_dataset

ORDERS = {
    "file first": [("Kvasir-SEG/images", b"x"), ("Kvasir-SEG/images/a.jpg", None)],
    "folder first": [("Kvasir-SEG/images/a.jpg", None), ("Kvasir-SEG/images", b"x")],
    "folder entry": [("Kvasir-SEG/images/", b""), ("Kvasir-SEG/images", b"x")],
}


@pytest.mark.parametrize("entries", ORDERS.values(), ids=ORDERS.keys())
def test_a_file_and_a_folder_of_one_name_is_refused(workdir: Path, entries: list) -> None:
    image, _ = write_pair(workdir / "src" / "images", workdir / "src" / "masks", "a", img_ext=".jpg")
    archive = workdir / "clash.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(image, "Kvasir-SEG/masks/a.jpg")
        for name, data in entries:
            zf.writestr(name, data) if data is not None else zf.write(image, name)
    with pytest.raises(ImportError_, match=r"clash\.zip: 'Kvasir-SEG/images' is both a file and a folder"):
        import_dataset(archive, workdir / "raw", track=False, max_nonbinary=MAX_NONBINARY)
    assert not (workdir / "raw").exists()
    code, output = kdas_cli("data", "import", str(archive))
    assert code == 1 and output.count("\n") == 1 and "both a file and a folder" in output, output
    assert not (workdir / "data" / "raw" / "clash").exists()
