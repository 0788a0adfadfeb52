"""Which image is train, val or test.

- Datasets with a published PraNet list (Kvasir-SEG, CVC-ClinicDB): listed ids are test,
  the rest train.
- Test-only datasets (CVC-ColonDB, ETIS, CVC-300): all test.
- Any other dataset: seeded random test part.
Then a seeded `val` part is held out of each dataset's train images: models are selected
on it, never on a test set.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kdas.config import SplitParams
from kdas.data.catalog import CATALOG


def _seeded_pick(ids: list[str], fraction: float, seed: int, salt: str) -> set[str]:
    """round(fraction * n) of the ids, the same for the same (seed, dataset, id set)."""
    ids = sorted(ids)
    n = round(fraction * len(ids))
    rng = np.random.default_rng([seed, *salt.encode()])
    return {ids[i] for i in rng.permutation(len(ids))[:n]}


def assign_splits(manifest: pd.DataFrame, params: SplitParams) -> pd.Series:
    split = pd.Series("train", index=manifest.index, dtype="str")
    for dataset, rows in manifest.groupby("dataset"):
        entry = CATALOG.get(str(dataset))
        ids = rows["id"].tolist()
        if entry is not None and entry.test_only:
            test = set(ids)
        elif entry is not None and entry.test_list:
            test = entry.test_ids() & set(ids)
        else:
            test = _seeded_pick(ids, params.test_fraction, params.seed, f"test/{dataset}")
        train = [i for i in ids if i not in test]
        val = _seeded_pick(train, params.val_fraction, params.seed, f"val/{dataset}")
        split[rows.index] = [("test" if i in test else "val" if i in val else "train") for i in ids]
    return split
