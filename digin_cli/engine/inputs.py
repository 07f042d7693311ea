"""What the optimization starts from and what the classifiers see: z_T per seed, random cutouts."""

from __future__ import annotations

import torch
from torchvision.ops import roi_align

from digin_cli.components import DiffusionComponents


def initial_latents(components: DiffusionComponents, seeds: list[int]) -> torch.Tensor:
    """One z_T per seed, drawn on the CPU so a seed gives the same image on every device.

    Returns (B, C, h, w) scaled by the scheduler's init_noise_sigma, as diffusers does.
    """
    shape = components.latent_shape
    latents = [torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    return torch.cat(latents) * components.scheduler.init_noise_sigma


def make_cutouts(
    images: torch.Tensor,
    num_cutouts: int,
    size: int,
    min_scale: float,
    noise_std: float,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """Random square crops, biased to large ones, resized to `size`, plus Gaussian noise.

    images: (B, 3, H, W) -> (B, num_cutouts, 3, size, size). Differentiable in `images`.
    One generator per item: an item's cutouts do not depend on what else is in the batch.
    """
    batch, _, height, width = images.shape
    draws = [[torch.rand(num_cutouts, generator=g) for _ in range(3)] for g in generators]
    u, left_u, top_u = (torch.cat(parts) for parts in zip(*draws))  # (B * num_cutouts,) each
    # Side as a share of the short side; squaring u pushes most draws toward full size.
    side = (1.0 - (1.0 - min_scale) * u**2) * min(height, width)  # (count,)
    left = left_u * (width - side)
    top = top_u * (height - side)
    item = torch.arange(batch).repeat_interleave(num_cutouts).float()
    boxes = torch.stack([item, left, top, left + side, top + side], dim=1)  # (count, 5)
    crops = roi_align(
        images, boxes.to(images), output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True
    )  # (count, 3, size, size)
    noise = torch.cat([torch.randn((num_cutouts, *crops.shape[1:]), generator=g) for g in generators])
    return (crops + noise.to(crops) * noise_std).view(batch, num_cutouts, *crops.shape[1:])
