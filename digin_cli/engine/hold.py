"""Holding a region of every item to a reference trajectory while the rest is optimized."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HoldRegion:
    """The part of every item that `optimize` keeps as its unoptimized start has it."""

    latent_mask: torch.Tensor  # (B, 1, h, w) in [0, 1], 1 = latents held to the start's trajectory
    # (B, 1, H, W) in [0, 1]: alpha with which the start's decoded image is laid over every
    # decoded image (None: latents only). The decoder reaches across latent cells (its
    # convolutions and mid-block attention), so held latents alone let a changed
    # surrounding repaint a small object.
    pixel_mask: torch.Tensor | None = None


@dataclass
class HeldTrajectory:
    """A region held to a reference DDIM trajectory (Blended Latent Diffusion, Avrahami et
    al. 2023): inside the latent mask each step's latent and x0-prediction are replaced by
    the reference's, so gradients flow through the rest only; with a pixel mask, the
    reference's decoded image is also laid over every decoded image."""

    mask: torch.Tensor  # (B, 1, h, w) in [0, 1], 1 = held
    latents: torch.Tensor  # (T + 1, B, C, h, w): z_T, then z after each of the T steps
    x0: torch.Tensor  # (T, B, C, h, w) the x0-prediction of each step
    pixel_mask: torch.Tensor | None = None  # (B, 1, H, W)
    image: torch.Tensor | None = None  # (B, 3, H, W) in [0, 1], the reference's decoded z_0

    def blend(self, index: int, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> the same with the held region taken from reference latent `index`."""
        return self.mask * self.latents[index] + (1 - self.mask) * latents

    def blend_x0(self, step: int, x0: torch.Tensor) -> torch.Tensor:
        return self.mask * self.x0[step] + (1 - self.mask) * x0

    def composite(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) decoded images -> the reference image laid over them by the pixel mask."""
        if self.pixel_mask is None:
            return images
        return self.pixel_mask * self.image + (1 - self.pixel_mask) * images
