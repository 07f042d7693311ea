"""The one module that reads and writes files: images, masks, JSON, tensors, the cache.

Every output is written to a temporary file in the same folder and renamed into
place, so an interrupted run never leaves a half-written PNG or JSON behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import pickle
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from digin_cli.errors import NoSpaceError


def cache_dir() -> Path:
    """$DIGIN_CACHE, else $XDG_CACHE_HOME/digin, else ~/.cache/digin."""
    if os.environ.get("DIGIN_CACHE"):
        return Path(os.environ["DIGIN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "digin"


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; set it straight back
    os.umask(mask)
    return mask


# Output files get the permissions any other tool's would (0666 less the user's umask), not
# mkstemp's private 0600: colleagues and web servers read shared results folders.
FILE_MODE = 0o666 & ~_umask()


# The OSErrors of a full disk or quota: the user frees space and reruns.
DISK_FULL = {errno.ENOSPC: "no space left on device"}
if hasattr(errno, "EDQUOT"):  # not defined on Windows
    DISK_FULL[errno.EDQUOT] = "disk quota exceeded"


def _atomic_write(path: Path, write) -> None:
    """`write(handle)` into a temporary file beside `path`, renamed into place once complete;
    a full disk is one line naming the file (the temporary file is removed, `path` untouched)."""
    try:
        _write_then_rename(path, write)
    except Exception as error:
        full = _disk_full(error)
        if full is None:
            raise
        raise NoSpaceError(f"{full} writing {path}; free some space and rerun the same command: the finished "
                           "items are kept and the run goes on with the others") from None  # fmt: skip


def _disk_full(error: BaseException | None) -> str | None:
    """What a full-disk OSError behind `error` says (torch.save raises a RuntimeError caused by it), else None."""
    for _ in range(4):  # the few links of a library's wrapping
        if error is None:
            return None
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            return DISK_FULL[error.errno]
        error = error.__cause__ or error.__context__
    return None


def _write_then_rename(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(text: str, path: Path) -> None:
    _atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def write_bytes(data: bytes, path: Path) -> None:
    _atomic_write(path, lambda handle: handle.write(data))


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable (then it is redone)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_lines(path: Path) -> list[str]:
    """A UTF-8 text file's lines (OSError or UnicodeDecodeError when it cannot be read)."""
    return Path(path).read_text(encoding="utf-8").splitlines()


def remove_tree(path: Path) -> None:
    """A folder and everything in it, if it exists (a benchmark's own output folder)."""
    if Path(path).is_dir():
        shutil.rmtree(path)


def remove_file(path: Path) -> None:
    Path(path).unlink(missing_ok=True)


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


def read_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}


class ImageReadError(ValueError):
    """A file that is not an image Pillow can read, or an empty one."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB: EXIF orientation applied, alpha composited on white,
    palette and greyscale expanded, 16- and 32-bit greyscale scaled to 8 bits."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray((array / peak * 255).clip(0, 255).round().astype(np.uint8), mode="L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 if array.max() <= 1.0 else 1.0
        image = Image.fromarray((array * scale).clip(0, 255).round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def fit_square(image: Image.Image, size: int, resample) -> Image.Image:
    """Resize the short side to `size` and crop the centre square (images and their masks alike)."""
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), resample)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def load_image(path: Path, size: int) -> torch.Tensor:
    """A photograph as the model sees it: (3, size, size) in [0, 1].

    The short side is resized to `size` (bicubic, antialiased) and the centre cropped.
    Raises ImageReadError naming the file when it is empty or not a readable image."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path} does not exist; check the file name (in the folder or the CSV)")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path} is empty")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = to_rgb(opened)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"{path} is not an image Pillow can read ({type(error).__name__})") from None
    cropped = fit_square(image, size, Image.BICUBIC)
    return torch.from_numpy(np.asarray(cropped).copy()).permute(2, 0, 1).float() / 255


def list_images(folder: Path) -> list[Path]:
    """Image files in a folder (not recursive), sorted by name; hidden files skipped."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def load_mask(path: Path, size: int) -> torch.Tensor:
    """A user's mask file (white = the class object) as (1, 1, size, size) in [0, 1], cropped like the image."""
    path = Path(path)
    try:
        with Image.open(path) as opened:
            grey = ImageOps.exif_transpose(opened).convert("L")
    except (OSError, ValueError) as error:
        raise ImageReadError(f"mask {path} is not an image Pillow can read ({type(error).__name__})") from None
    cropped = np.asarray(fit_square(grey, size, Image.BILINEAR), dtype=np.float32) / 255
    return torch.from_numpy(cropped.copy())[None, None]


def save_tensors(tensors: dict[str, Any], path: Path) -> None:
    """A dict of tensors and plain values, written atomically (the inversion cache)."""
    _atomic_write(path, lambda handle: torch.save(tensors, handle))


def load_tensors(path: Path) -> dict[str, Any] | None:
    """What save_tensors wrote, or None when the file is missing or unreadable (then recompute)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
        return None


def write_jsonl(records: Sequence[dict[str, Any]], path: Path) -> None:
    """A run summary, one JSON object a line, rewritten atomically (safe to resume)."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    _atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """What write_jsonl wrote; [] when the file does not exist yet."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_vector_file(path: Path) -> Any:
    """What a .npy (numpy, no pickles) or .pt (torch, weights only) file holds; .npy arrays as tensors.

    Raises whatever numpy or torch raise on an unreadable file; callers name the option."""
    if Path(path).suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False))
    return torch.load(path, map_location="cpu", weights_only=True)


def save_vector_file(vector: torch.Tensor, path: Path) -> None:
    """A (D,) vector as float32 .npy (what load_vector_file and --direction read), atomically."""
    array = vector.detach().cpu().numpy().astype(np.float32)
    _atomic_write(path, lambda handle: np.save(handle, array, allow_pickle=False))
