"""The torch Dataset over manifest rows: decoded once, cached at the training size."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, DistributedSampler

from kdas.data.transforms import seed_augment, train_augment
from kdas.io import binarise, read_mask, read_rgb
from kdas.maps import resize
from kdas.progress import Progress


def _load(image_path: str, mask_path: str, size: int, teacher_size: int | None) -> tuple[np.ndarray, ...]:
    """The frame and its mask at `size`, and the frame at `teacher_size` if given, each resized
    from the original as evaluation resizes the test frames (kdas.maps.resize): bilinear
    frames, nearest-neighbour masks, so a model trains on what it is tested on."""
    original = read_rgb(image_path)
    mask = resize(binarise(read_mask(mask_path)).astype(np.uint8), size, mask=True)
    return (resize(original, size), mask) + (() if teacher_size is None else (resize(original, teacher_size),))


class PolypDataset(Dataset):
    """(3xSxS uint8 RGB image, 1xSxS uint8 {0,1} mask) pairs: bytes, not floats, cross the
    loader's process boundary (4x less to copy); the training loop scales them to [0, 1] on
    its device. Decoding a 1920 px JPEG costs far more than augmenting a 352 px array, so
    every pair is decoded and resized once, up front (in threads), and DataLoader workers
    share the cache through fork.

    Index with ``i``, or with ``(i, seed)`` (what :class:`SeededSampler` yields) to draw the
    sample's augmentation from a stream of its own.

    With a `teacher_size`, each item also holds the teacher's view: the same frame decoded at
    the teacher's size and augmented with the same draws (the same flips, rotation, shift,
    scale and colour), so the student's tensors are those it gets without a teacher."""

    def __init__(self, rows: pd.DataFrame, size: int, augment: bool, workers: int = 4, teacher_size: int | None = None):
        self.size = size
        self.augment = train_augment() if augment else None
        paths = list(zip(rows["image_path"], rows["mask_path"]))
        self.ids = list(rows["dataset"].astype(str) + "/" + rows["id"].astype(str))
        with ThreadPoolExecutor(workers) as pool:
            progress = Progress(pool.map(lambda p: _load(*p, size, teacher_size), paths), f"decode {len(paths)} images", total=len(paths), step_name="image")
            self.cache = []
            for pair in progress:
                self.cache.append(pair)
                progress.step()
            progress.close()

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """(image, mask), and the teacher's view of the image where there is one."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        image, mask, *view = self.cache[i]
        if self.augment is not None:
            if seed is None and view:  # both views need the same draws
                seed = int(np.random.randint(2**32, dtype=np.uint64))
            if seed is not None:
                seed_augment(self.augment, seed)
            out = self.augment(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
            if view:
                seed_augment(self.augment, seed)
                view = [self.augment(image=view[0], mask=np.zeros(view[0].shape[:2], np.uint8))["image"]]
        return (_chw(image), torch.from_numpy(np.ascontiguousarray(mask))[None], *map(_chw, view))


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


class SeededSampler(DistributedSampler):
    """The shuffled order of an epoch, as ``(index, seed)`` pairs: the order comes from
    (``seed``, epoch) as DistributedSampler draws it (one process is a world of one), and each
    sample's augmentation from a seed of (``seed``, epoch, index). An epoch is then fixed by
    those alone: not by the number of loader workers, by which persistent worker draws a
    sample, by how far a previous epoch was iterated, or by a resume in the middle of a run."""

    def __init__(self, data: Dataset, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(data, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=num_replicas > 1)

    def __iter__(self):
        for i in super().__iter__():
            yield i, int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0])
