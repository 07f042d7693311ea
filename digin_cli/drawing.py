"""Pictures made for people: labelled sheets, difference heat maps, mask overlays.

Tensors in, tensors or PIL images out; writing them is ``io``'s job.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from digin_cli.io import to_pil

SHEET_MIN_SIDE = 256  # small images are upscaled (nearest) so labels and pixels stay readable


def labelled_sheet(panels: Sequence[tuple[torch.Tensor, Sequence[str]]], title: str = "") -> Image.Image:
    """Images side by side, each with lines of text under it, and an optional title on top.

    panels: [(image (3, H, W) in [0, 1], [label line, ...]), ...]
    """
    images = [to_pil(image) for image, _ in panels]
    scale = max(1, -(-SHEET_MIN_SIDE // min(images[0].size)))  # ceil division
    images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    font = _font(14)
    line_height = 18
    pad = 8
    label_lines = max(len(lines) for _, lines in panels)
    width = sum(im.width for im in images) + pad * (len(images) + 1)
    # Wrap the title to the sheet's width (measured in the font), so it is never cut off.
    title_lines = textwrap.wrap(title, width=max(10, int((width - 2 * pad) / max(1.0, font.getlength("m") * 0.8))))
    title_height = line_height * len(title_lines) + pad if title else 0
    height = title_height + max(im.height for im in images) + label_lines * line_height + 2 * pad + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for k, line in enumerate(title_lines):
        draw.text((pad, pad + k * line_height), line, fill="black", font=font)
    x = pad
    for im, (_, lines) in zip(images, panels):
        y = title_height + pad
        sheet.paste(im, (x, y))
        for k, line in enumerate(lines):
            draw.text((x, y + im.height + pad // 2 + k * line_height), line, fill="black", font=font)
        x += im.width + pad
    return sheet


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def heat_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| averaged over channels, as a black-red-yellow-white map: (3, H, W) -> (3, H, W)."""
    diff = (a - b).abs().mean(dim=0)  # (H, W)
    x = diff / diff.max().clamp_min(1e-6)
    return torch.stack([(3 * x).clamp(0, 1), (3 * x - 1).clamp(0, 1), (3 * x - 2).clamp(0, 1)])


def mask_overlay(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(3, H, W) image with the (1, H, W) mask tinted red."""
    red = torch.tensor([1.0, 0.1, 0.1]).view(3, 1, 1)
    alpha = 0.55 * mask
    return image * (1 - alpha) + red * alpha
