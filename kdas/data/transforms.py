"""albumentations pipelines. Images reach them already resized to the training size
(the Dataset caches them so), so augmentation works on small arrays. Models take RGB in
[0, 1] and normalise it themselves (see kdas.models.PolypPVT)."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch


def train_augment() -> A.Compose:
    """Geometry (applied to image and mask alike) and colour (image only)."""
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.Affine(scale=(0.85, 1.15), translate_percent=(-0.1, 0.1), rotate=(-30, 30), border_mode=cv2.BORDER_CONSTANT, p=0.7),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=0.5),
        ]
    )


def seed_augment(augment: A.Compose, seed: int) -> None:
    """Seed a pipeline so that its transforms draw from independent streams.

    albumentations' own ``set_random_seed`` hands every transform the same seed, so their
    draws move in lockstep: measured on 2.0.8, HorizontalFlip and VerticalFlip then fire
    together every time (a 180-degree rotation, never a single flip)."""
    augment.set_random_seed(seed)
    for k, transform in enumerate(augment.transforms):
        transform.set_random_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
