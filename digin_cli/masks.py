"""Foreground masks for real images: from cross-attention, refined by SAM-HQ, or given by the user.

The class tokens' cross-attention map (recorded while the inverted image is
reconstructed, see attention.py) says roughly where the object is. Normalised and
squashed, it is the mask itself, or it provides point prompts for SAM-HQ, whose
binary mask is then eroded, dilated and blurred into a soft mask. Settings follow
the reference (at 512 px; kernel sizes scale with the resolution).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

REFERENCE_SIZE = 512  # the resolution the reference's kernel sizes are given at


@dataclass
class Mask:
    pixels: torch.Tensor  # (1, 1, H, W) in [0, 1], 1 = the class object
    latents: torch.Tensor  # (1, 1, h, w) the same, downsampled to the latent grid
    source: str  # "sam-hq", "attention" or "file"


def squash_attention(attention: torch.Tensor, size: int) -> torch.Tensor:
    """(1, s, s) mean class-token attention -> (1, 1, size, size) in [0, 1]: normalise by max,
    upsample, then sqrt(clamp((x - 0.3) / 0.7)) so weak attention drops to 0."""
    attention = attention / attention.max().clamp_min(1e-12)
    up = F.interpolate(attention[None].float(), size=(size, size), mode="bilinear", align_corners=False)
    return ((up - 0.3) / 0.7).clamp(0, 1).sqrt()


def _odd(n: float) -> int:
    n = max(1, int(round(n)))
    return n if n % 2 else n + 1


def _scaled(n: float, size: int) -> float:
    return n * size / REFERENCE_SIZE


def soften(binary: torch.Tensor, erode: float = 3, dilate: float = 20, blur_kernel: float = 45, blur_sigma: float = 30) -> torch.Tensor:
    """(1, 1, H, W) binary mask -> eroded, dilated and blurred soft mask (reference settings at 512 px)."""
    size = binary.shape[-1]
    mask = binary.float()
    k = _odd(_scaled(erode, size))
    mask = -F.max_pool2d(-mask, k, stride=1, padding=k // 2)  # erosion = min-pool
    k = _odd(_scaled(dilate, size))
    mask = F.max_pool2d(mask, k, stride=1, padding=k // 2)
    kernel, sigma = _odd(_scaled(blur_kernel, size)), max(0.1, _scaled(blur_sigma, size))
    return gaussian_blur(mask, [kernel, kernel], [sigma, sigma]).clamp(0, 1)


def attention_mask(attention: torch.Tensor, size: int) -> torch.Tensor:
    """The mask with no segmenter: the squashed attention map, blurred like a SAM mask."""
    squashed = squash_attention(attention, size)
    kernel, sigma = _odd(_scaled(45, size)), max(0.1, _scaled(10, size))
    return gaussian_blur(squashed, [kernel, kernel], [sigma, sigma]).clamp(0, 1)


def sample_points(squashed: torch.Tensor, count: int = 5, threshold: float = 0.35, seed: int = 0) -> np.ndarray:
    """Point prompts: `count` distinct pixels above `threshold`, drawn with probability
    proportional to the squashed attention, without replacement. Returns (n, 2) x, y."""
    values = squashed.flatten()  # (H * W,)
    weights = torch.where(values > threshold, values, torch.zeros_like(values))
    if weights.sum() <= 0:  # nothing above threshold: the single strongest pixel
        weights = (values == values.max()).float()
    n = min(count, int((weights > 0).sum()))
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.multinomial(weights.cpu(), n, replacement=False, generator=generator)
    side = squashed.shape[-1]
    return np.stack([(chosen % side).numpy(), (chosen // side).numpy()], axis=1).astype(np.float32)


def sam_mask(predictor, image: np.ndarray, attention: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """SAM-HQ mask prompted with points from the attention map, softened. image: (H, W, 3) uint8.

    `predictor` is a segment_anything_hq SamPredictor (loaded once per run)."""
    size = image.shape[0]
    points = sample_points(squash_attention(attention, size)[0, 0], seed=seed)
    predictor.set_image(image)
    masks, _, _ = predictor.predict(
        point_coords=points, point_labels=np.ones(len(points)), multimask_output=False, hq_token_only=True
    )
    binary = torch.from_numpy(np.asarray(masks[0], dtype=np.float32))[None, None]  # (1, 1, H, W)
    return soften(binary)


def to_latent_grid(pixels: torch.Tensor, latent_side: int) -> torch.Tensor:
    """(1, 1, H, W) -> (1, 1, h, w) by area averaging."""
    return F.adaptive_avg_pool2d(pixels, latent_side)


def object_core(mask: torch.Tensor) -> torch.Tensor:
    """(1, H, W) soft object mask -> (1, H, W) binary core: where the distance holds the image
    (nearly) fully (mask >= 0.9). A soft mask's blurred rim is a transition zone the
    optimization may change, so it does not count as "the object"."""
    for level in (0.9, 0.5):
        core = (mask >= level).float()
        if core.sum() > 0:
            return core
    return (mask > 0).float()


def latent_cells(region: torch.Tensor, latent_side: int) -> torch.Tensor:
    """(B, 1, H, W) binary region -> (B, 1, h, w) binary: every latent cell the region touches.
    A latent cell decodes to a patch of pixels, so holding the whole region needs all of them."""
    return F.adaptive_max_pool2d(region.float(), latent_side)
