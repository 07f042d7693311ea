"""Rendered scenes as a user's inputs: image files, a CSV of classes and captions, and the
ground truth's pixels (images and object masks as tensors) for judging the results."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from digin_cli.io import save_png
from digin_cli.world.scenes import render


def as_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [0, 1]."""
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255


def dilate(mask: np.ndarray, pixels: int) -> torch.Tensor:
    """(H, W) bool object mask -> (H, W) float tensor, grown by `pixels` on every side."""
    grown = F.max_pool2d(torch.from_numpy(mask).float()[None, None], 2 * pixels + 1, stride=1, padding=pixels)
    return grown[0, 0]


def scene_file(folder: Path, scene, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Render a scene into folder/name.png; returns the image (H, W, 3) and the object mask (H, W)."""
    image, mask = render(scene)
    save_png(as_tensor(image), folder / f"{name}.png")
    return image, mask


def write_csv(rows: list[tuple[str, ...]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
