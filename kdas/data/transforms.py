"""albumentations pipelines. Images reach them already resized to the training size
(the Dataset caches them so), so augmentation works on small arrays."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize(image: np.ndarray, size: int, *, mask: bool = False) -> np.ndarray:
    interpolation = cv2.INTER_NEAREST if mask else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


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


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32, ImageNet-normalised."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std
