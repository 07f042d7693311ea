"""The one module that reads and writes files: images, labelled sheets, JSON, the cache.

Every output is written to a temporary file in the same folder and renamed into
place, so an interrupted run never leaves a half-written PNG or JSON behind.
"""

from __future__ import annotations

import json
import os
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

SHEET_MIN_SIDE = 256  # small images are upscaled (nearest) so labels and pixels stay readable


def cache_dir() -> Path:
    """$DIGIN_CACHE, else $XDG_CACHE_HOME/digin, else ~/.cache/digin."""
    if os.environ.get("DIGIN_CACHE"):
        return Path(os.environ["DIGIN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "digin"


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> RGB PIL image."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round()
    return Image.fromarray(array.astype(np.uint8), mode="RGB")


def save_png(image: torch.Tensor | Image.Image, path: Path) -> None:
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    _atomic_write(path, lambda handle: pil.save(handle, format="PNG"))


def write_json(data: Any, path: Path) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    _atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


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


def read_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
