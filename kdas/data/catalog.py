"""The datasets kdas knows by name: where to fetch them and how the benchmark splits them.

A dataset not listed here can still be imported under any name; it is then split at
random (params.yaml: data.split).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    title: str
    images: int | None = None               # pairs in the public release
    test_list: str | None = None            # PraNet list of test ids (kdas/data/splits/pranet/)
    test_only: bool = False                 # never trained on (generalisation test)
    url: str | None = None                  # public release for `kdas data fetch`
    size: int | None = None                 # bytes of that download, when known
    sha256: str | None = None
    aliases: tuple[str, ...] = ()
    generated: bool = False                 # written by a pipeline stage (dvc.yaml), never imported

    def test_ids(self) -> set[str]:
        if self.test_list is None:
            return set()
        text = resources.files("kdas.data").joinpath("splits", "pranet", self.test_list).read_text()
        return {line.strip() for line in text.splitlines() if line.strip()}


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in [
        CatalogEntry(
            "kvasir-seg", "Kvasir-SEG (Jha et al., MMM 2020)", images=1000, test_list="kvasir_test.txt",
            url="https://datasets.simula.no/downloads/kvasir-seg.zip", aliases=("kvasir",),
        ),
        CatalogEntry(
            "cvc-clinicdb", "CVC-ClinicDB (Bernal et al., CMIG 2015)", images=612, test_list="clinicdb_test.txt",
            aliases=("clinicdb", "cvc-612"),
        ),
        CatalogEntry("cvc-colondb", "CVC-ColonDB (Bernal et al., PR 2012)", images=380, test_only=True, aliases=("colondb",)),
        CatalogEntry("etis-laribpolypdb", "ETIS-LaribPolypDB (Silva et al., 2014)", images=196, test_only=True, aliases=("etis",)),
        CatalogEntry("cvc-300", "CVC-300 / EndoScene test (Vázquez et al., 2017)", images=60, test_only=True, aliases=("endoscene",)),
        CatalogEntry("pranet-train", "PraNet TrainDataset (Kvasir-SEG 900 + CVC-ClinicDB 550)", images=1450, aliases=("traindataset",)),
        CatalogEntry("synth", "kdas synthetic colonoscopy frames (embedded default)", generated=True),
    ]
}


def canonical_name(name: str) -> str | None:
    """The catalogue name for a folder or user-given name (case and aliases ignored)."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    for entry in CATALOG.values():
        if key == entry.name or key in entry.aliases:
            return entry.name
    return None
