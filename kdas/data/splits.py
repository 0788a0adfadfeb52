"""Which image is train, val or test.

- Datasets with a published PraNet list (Kvasir-SEG, CVC-ClinicDB): listed ids are test,
  the rest train.
- Test-only datasets (CVC-ColonDB, ETIS, CVC-300): all test.
- Any other dataset: seeded random test part.
Then a seeded `val` part is held out of each dataset's train images: models are selected
on it, never on a test set. It is drawn by group: frames joined by near-duplicate links
(perceptual-hash distance within the contract's `near_duplicate_distance`; neighbouring
frames of one colonoscopy video) stay on one side, so val measures generalisation, not
memory.
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


def hamming(hashes: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances of 64-bit hashes (uint64 array): an n x n matrix."""
    x = hashes[:, None] ^ hashes[None, :]
    return np.unpackbits(x.view(np.uint8).reshape(len(hashes), len(hashes), 8), axis=2).sum(2)


def near_duplicate_groups(phashes: list, distance: int) -> np.ndarray:
    """Connected components of the near-duplicate graph: one group label per item (items
    without a hash are groups of their own)."""
    n = len(phashes)
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    known = [k for k, h in enumerate(phashes) if isinstance(h, str) and h]
    if known:
        dist = hamming(np.array([int(phashes[k], 16) for k in known], dtype=np.uint64))
        for a, b in zip(*np.nonzero(np.triu(dist <= distance, k=1))):
            parent[root(known[a])] = root(known[b])
    return np.array([root(i) for i in range(n)])


def _seeded_group_pick(ids: list[str], groups: np.ndarray, fraction: float, seed: int, salt: str) -> set[str]:
    """Whole groups, in seeded order, until round(fraction * n) ids are reached."""
    order = sorted(range(len(ids)), key=lambda k: ids[k])
    members: dict[int, list[str]] = {}
    for k in order:
        members.setdefault(int(groups[k]), []).append(ids[k])
    keys = sorted(members, key=lambda g: members[g][0])
    rng = np.random.default_rng([seed, *salt.encode()])
    target, picked = round(fraction * len(ids)), set()
    for g in rng.permutation(len(keys)):
        if len(picked) >= target:
            break
        picked.update(members[keys[g]])
    return picked


def assign_splits(manifest: pd.DataFrame, params: SplitParams, near_duplicate_distance: int) -> pd.Series:
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
        train_rows = rows[[i not in test for i in ids]]
        groups = near_duplicate_groups(train_rows["phash"].tolist(), near_duplicate_distance)
        val = _seeded_group_pick(train_rows["id"].tolist(), groups, params.val_fraction, params.seed, f"val/{dataset}")
        split[rows.index] = [("test" if i in test else "val" if i in val else "train") for i in ids]
    return split
