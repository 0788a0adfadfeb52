"""The torch Dataset over manifest rows: decoded once, cached at the training size."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from kdas.data.transforms import to_tensor, train_augment
from kdas.maps import resize
from kdas.io import binarise, read_mask, read_rgb


def _load(image_path: str, mask_path: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    image = resize(read_rgb(image_path), size)
    mask = resize(binarise(read_mask(mask_path)).astype(np.uint8), size, mask=True)
    return image, mask


class PolypDataset(Dataset):
    """(3xSxS normalised image, 1xSxS {0,1} mask) pairs. Decoding a 1920 px JPEG costs far
    more than augmenting a 352 px array, so every pair is decoded and resized once, up front
    (in threads), and DataLoader workers share the cache through fork."""

    def __init__(self, rows: pd.DataFrame, size: int, augment: bool, workers: int = 4):
        self.size = size
        self.augment = train_augment() if augment else None
        paths = list(zip(rows["image_path"], rows["mask_path"]))
        self.ids = list(rows["dataset"].astype(str) + "/" + rows["id"].astype(str))
        with ThreadPoolExecutor(workers) as pool:
            self.cache = list(tqdm(pool.map(lambda p: _load(*p, size), paths), total=len(paths), desc="decode", unit="img", disable=None, leave=False))

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.cache[i]
        if self.augment is not None:
            out = self.augment(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return to_tensor(image), torch.from_numpy(np.ascontiguousarray(mask)).float()[None]
