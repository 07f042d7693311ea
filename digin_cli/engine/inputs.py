"""What the optimization starts from and what the classifiers see: z_T per seed, random cutouts."""

from __future__ import annotations

import torch

from digin_cli.components import DiffusionComponents


def initial_latents(components: DiffusionComponents, seeds: list[int]) -> torch.Tensor:
    """One z_T per seed, drawn on the CPU so a seed gives the same image on every device.

    Returns (B, C, h, w) scaled by the scheduler's init_noise_sigma, as diffusers does.
    """
    shape = components.latent_shape
    latents = [torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    return torch.cat(latents) * components.scheduler.init_noise_sigma


def view_generators(device: torch.device, seed: int, batch: int) -> list[torch.Generator]:
    """One generator per item, all seeded alike, on the device the views are drawn on: an
    item's augmentations do not depend on the batch it shares (only on the seed). A CUDA
    draw needs a CUDA generator; the CPU's serves the CPU and meta tensors (which hold no
    values). A seed gives other views on a GPU than on the CPU, as its arithmetic differs too."""
    where = device if device.type in ("cuda", "mps", "xpu") else torch.device("cpu")
    return [torch.Generator(device=where).manual_seed(seed) for _ in range(batch)]


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
    device = images.device
    # Drawn where the images are: on a GPU nothing is built on the host and copied per loss term.
    draws = [[torch.rand(num_cutouts, generator=g, device=device) for _ in range(3)] for g in generators]
    u, left_u, top_u = (torch.cat(parts) for parts in zip(*draws))  # (B * num_cutouts,) each
    # Side as a share of the short side; squaring u pushes most draws toward full size.
    side = (1.0 - (1.0 - min_scale) * u**2) * min(height, width)  # (count,)
    left = left_u * (width - side)
    top = top_u * (height - side)
    crops = crop_and_resize(images, left, top, side, num_cutouts, size)  # (count, 3, size, size)
    noise = torch.cat([torch.randn((num_cutouts, *crops.shape[1:]), generator=g, device=device) for g in generators])
    return (crops + noise.to(crops) * noise_std).view(batch, num_cutouts, *crops.shape[1:])


def crop_and_resize(images: torch.Tensor, left: torch.Tensor, top: torch.Tensor, side: torch.Tensor,
                    per_image: int, size: int) -> torch.Tensor:  # fmt: skip
    """Square crops of (B, 3, H, W) images resized to `size`, `per_image` crops per image in order:
    left, top, side (B * per_image,) in pixels. Returns (B * per_image, 3, size, size).

    The values of torchvision's roi_align(aligned=True, sampling_ratio=2) on those boxes,
    written as two matrix products: bilinear sampling and the bin average are separable,
    so a crop is rows @ image @ columns^T. On a 2-core CPU the forward and backward of 128
    crops of 64 px took 0.011 s instead of roi_align's 0.107 s (its CPU backward is a
    scalar loop, and was 15% of a shapes-model optimization step); on a GPU both are
    batched matrix products.
    """
    batch, _, height, width = images.shape
    rows = _resize_weights(top - 0.5, side, size, height).view(batch, per_image, size, height)  # (B, K, size, H)
    columns = _resize_weights(left - 0.5, side, size, width).view(batch, per_image, size, width)  # (B, K, size, W)
    crops = torch.einsum("bkph,bchw,bkqw->bkcpq", rows.to(images), images, columns.to(images))  # (B, K, 3, size, size)
    return crops.flatten(0, 1)


def _resize_weights(start: torch.Tensor, length: torch.Tensor, size: int, extent: int, samples: int = 2) -> torch.Tensor:
    """Interpolation matrices of crops along one axis, as roi_align(aligned=True, sampling_ratio=samples) samples.

    start, length: (count,) each crop's edge (in pixel-index coordinates, pixel i's centre at i)
    and side. Each of the `size` output bins averages `samples` bilinear samples at its
    sub-bin centres, clamped into the image as roi_align clamps them. Returns (count, size, extent).
    """
    fractions = (torch.arange(size * samples, dtype=start.dtype, device=start.device) + 0.5) / (size * samples)  # (size * samples,)
    positions = (start[:, None] + length[:, None] * fractions).clamp(0, extent - 1)  # (count, size * samples)
    pixels = torch.arange(extent, dtype=start.dtype, device=start.device)  # (extent,)
    # The bilinear weight of pixel i for a sample at y is the hat max(0, 1 - |y - i|).
    hats = (1 - (positions[..., None] - pixels).abs()).clamp(min=0)  # (count, size * samples, extent)
    return hats.view(len(start), size, samples, extent).mean(dim=2)
