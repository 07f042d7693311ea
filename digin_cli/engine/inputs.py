"""What the optimization starts from and what the classifiers see: z_T per seed, random cutouts
(and, with OptimConfig.augment "eot", an expectation over more transformations)."""

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


def make_views(images: torch.Tensor, config, generators: list[torch.Generator]) -> torch.Tensor:
    """The classifier's views of `images` (B, 3, H, W) while optimizing, as `config.augment`
    (an OptimConfig) names them: (B, num_cutouts, 3, S, S), S = config.view_size."""
    if config.augment == "cutouts":
        return make_cutouts(images, config.num_cutouts, config.view_size, config.cutout_min_scale, config.cutout_noise_std,
                            generators)  # fmt: skip
    if config.augment == "eot":
        return make_eot_views(images, config.num_cutouts, config.view_size, config.cutout_min_scale,
                              config.cutout_noise_std, generators)  # fmt: skip
    raise ValueError(f"unknown augmentation '{config.augment}'")


# The ranges of make_eot_views' transformations: light enough that the class stays what it
# is, strong enough that a pattern tuned to one pixel grid, orientation or colour balance
# does not survive them all.
EOT_ROTATION_DEGREES = 10.0  # uniform in +-10
EOT_SCALE = (0.9, 1.1)  # zoom about the view's centre (below 1: the border is reflected in)
EOT_JITTER = 0.1  # brightness, contrast and saturation factors uniform in 1 +- 0.1
EOT_BLUR_SIGMA = 1.0  # Gaussian blur, sd uniform in [0, 1] view pixels
EOT_BLUR_RADIUS = 2  # the blur kernel's half-width: 5 taps


def make_eot_views(
    images: torch.Tensor,
    num_cutouts: int,
    size: int,
    min_scale: float,
    noise_std: float,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """An expectation over transformations: make_cutouts' crops, each then flipped
    horizontally (half of them), rotated, zoomed, colour-jittered and blurred, then the
    Gaussian noise. images: (B, 3, H, W) -> (B, num_cutouts, 3, size, size). Differentiable in
    `images`; every draw from the item's own generator, so an item's views do not depend on
    its batch, and a seed repeats them exactly."""
    batch, _, height, width = images.shape
    device = images.device
    V = num_cutouts
    # 1. Per item, in this order from its generator: the crop (as make_cutouts), then the
    #    flip, angle, zoom, three jitter factors and blur sd; the noise last.
    draws = [[torch.rand(V, generator=g, device=device) for _ in range(10)] for g in generators]
    u, left_u, top_u, flip_u, angle_u, zoom_u, bright_u, contrast_u, saturation_u, blur_u = (
        torch.cat(parts) for parts in zip(*draws))  # (B * V,) each  # fmt: skip
    noise = torch.cat([torch.randn((V, 3, size, size), generator=g, device=device) for g in generators])  # (B * V, 3, S, S)
    # 2. The crops, as make_cutouts draws them.
    side = (1.0 - (1.0 - min_scale) * u**2) * min(height, width)
    views = crop_and_resize(images, left_u * (width - side), top_u * (height - side), side, V, size)  # (B * V, 3, S, S)
    # 3. Geometry, colour, blur, noise.
    views = flip_views(views, flip_u < 0.5)
    low, high = EOT_SCALE
    views = rotate_and_zoom(views, (2 * angle_u - 1) * EOT_ROTATION_DEGREES, low + (high - low) * zoom_u)
    factors = [1 + EOT_JITTER * (2 * f - 1) for f in (bright_u, contrast_u, saturation_u)]
    views = jitter_colours(views, *factors)
    views = blur_views(views, EOT_BLUR_SIGMA * blur_u)
    return (views + noise.to(views) * noise_std).view(batch, V, *views.shape[1:])


def flip_views(views: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """views (N, 3, S, S) mirrored left-right where flip (N,) bool is set: an exact copy, no resampling."""
    return torch.where(flip.view(-1, 1, 1, 1), views.flip(-1), views)


def rotate_and_zoom(views: torch.Tensor, degrees: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
    """views (N, 3, S, S) rotated by degrees (N,) about their centre and zoomed by zoom (N,)
    (above 1: magnified), bilinear, the border reflected in where the view would leave the
    image. Rotation 0 at zoom 1 samples every pixel centre: the identity, up to rounding."""
    angle = torch.deg2rad(degrees.to(views.dtype))  # (N,)
    cos, sin = torch.cos(angle) / zoom.to(views), torch.sin(angle) / zoom.to(views)
    # Output -> input coordinates (normalized, square views): the inverse rotation, scaled by 1 / zoom.
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)  # (N, 2, 3)  # fmt: skip
    grid = torch.nn.functional.affine_grid(theta, list(views.shape), align_corners=False)  # (N, S, S, 2)
    return torch.nn.functional.grid_sample(views, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def jitter_colours(views: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                   saturation: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """views (N, 3, S, S) with brightness, contrast and saturation factors (N,) each, applied in
    that order as torchvision's ColorJitter defines them: brightness scales; contrast blends
    with the view's mean grey; saturation blends with each pixel's grey (ITU-R 601 luma).
    Not clamped to [0, 1]: a clamp would cut the gradient of every pixel it touches, and the
    decoded images sit at 0 and 1 in places."""
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=views.dtype, device=views.device).view(1, 3, 1, 1)
    views = views * brightness.to(views).view(-1, 1, 1, 1)
    mean_grey = (views * luma).sum(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True)  # (N, 1, 1, 1)
    views = mean_grey + (views - mean_grey) * contrast.to(views).view(-1, 1, 1, 1)
    grey = (views * luma).sum(dim=1, keepdim=True)  # (N, 1, S, S)
    return grey + (views - grey) * saturation.to(views).view(-1, 1, 1, 1)


def blur_views(views: torch.Tensor, sigma: torch.Tensor, radius: int = EOT_BLUR_RADIUS) -> torch.Tensor:
    """views (N, 3, S, S), each blurred by a separable Gaussian of sd sigma (N,) pixels, 2 * radius + 1
    taps, the border reflected; an sd near 0 is the identity."""
    count, channels, size, _ = views.shape
    offsets = torch.arange(-radius, radius + 1, dtype=views.dtype, device=views.device)  # (taps,)
    weights = torch.exp(-0.5 * (offsets / sigma.to(views).clamp_min(1e-3).view(-1, 1)) ** 2)  # (N, taps)
    weights = (weights / weights.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # (N * 3, taps)
    # One grouped convolution per axis: every view-channel its own kernel.
    flat = torch.nn.functional.pad(views.reshape(1, count * channels, size, size), [radius] * 4, mode="reflect")
    flat = torch.nn.functional.conv2d(flat, weights.view(-1, 1, 1, 2 * radius + 1), groups=count * channels)
    flat = torch.nn.functional.conv2d(flat, weights.view(-1, 1, 2 * radius + 1, 1), groups=count * channels)
    return flat.view(count, channels, size, size)


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
