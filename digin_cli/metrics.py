"""Image metrics shared by the tasks and the benchmarks: PSNR, whole and masked."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1]."""
    mse = F.mse_loss(a.float(), b.float()).item()
    return 100.0 if mse == 0 else 10 * math.log10(1.0 / mse)


def masked_psnr(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> float:
    """PSNR in dB over the pixels `weight` (1, H, W) selects (soft weights allowed); images (3, H, W) in [0, 1]."""
    total = weight.sum() * a.shape[0]
    if total <= 0:
        return float("nan")
    mse = float(((a.float() - b.float()).square() * weight).sum() / total)
    return 100.0 if mse == 0 else 10 * math.log10(1.0 / mse)
