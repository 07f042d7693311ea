"""The shapes world: a deterministic scene renderer whose ground truth is known.

One object per image: a shape in a colour on a textured background, at a random
position, size and rotation. The four shapes differ in their outline's coarsest
symmetry (none, 2-, 3- and 5-fold), so each stays itself when a small generator
softens its corners: a square, which softens into a circle, is not one of them.
`render` returns the image and the object mask; `caption` gives the text the
diffusion model is trained on. `judge_colours` reads the object colour and the
background back from any image (also a generated one, which has no mask) by the
renderer's own colour statistics, so generated and optimized images can be scored
against what was asked.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "bar", "triangle", "star")
BAR_ASPECT = 2.5  # a bar's length over its width
STAR_INNER = 0.45  # a star's inner radius over its outer one
COLOURS = ("red", "green", "blue", "yellow")
BACKGROUNDS = ("sand", "water", "grass", "snow")

# Mean RGB of each object colour and background texture. Object colours are saturated,
# backgrounds muted, so a pixel's nearest mean tells object from background.
COLOUR_RGB = {
    "red": (215, 35, 35),
    "green": (35, 185, 45),
    "blue": (35, 65, 225),
    "yellow": (235, 215, 35),
}
BACKGROUND_RGB = {
    "sand": (200, 178, 132),
    "water": (62, 118, 160),
    "grass": (78, 122, 58),
    "snow": (232, 234, 240),
}
IMAGE_SIZE = 64
RADIUS_RANGE = (0.2, 0.3)  # object size (circumradius) as a share of the image side


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    cx: float  # object centre, as a share of the image side
    cy: float
    radius: float  # as a share of the image side
    rotation: float  # degrees
    texture_seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def sample_scene(
    rng: np.random.Generator,
    shape: str | None = None,
    colour: str | None = None,
    background: str | None = None,
    radius_range: tuple[float, float] = RADIUS_RANGE,
) -> Scene:
    """A random scene; any attribute can be fixed. Objects stay fully inside the image.

    radius_range: the object's size as a share of the side; the world's scenes (and the
    diffusion model's training set) use RADIUS_RANGE, a judge may be trained wider."""
    radius = float(rng.uniform(*radius_range))
    return Scene(
        shape=shape or SHAPES[rng.integers(len(SHAPES))],
        colour=colour or COLOURS[rng.integers(len(COLOURS))],
        background=background or BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
        cx=float(rng.uniform(radius + 0.04, 1 - radius - 0.04)),
        cy=float(rng.uniform(radius + 0.04, 1 - radius - 0.04)),
        radius=radius,
        rotation=float(rng.uniform(0, 360)),
        texture_seed=int(rng.integers(2**31)),
    )


def one_start_per_shape(background: str, on: bool) -> list[tuple[str, str, str]]:
    """(shape, colour, background) starts, one per shape, each in its own colour: on
    `background`, or off it (the other backgrounds in turn). The neuron row's starting
    scenes (maximize off the neuron's background, minimize on it)."""
    others = [b for b in BACKGROUNDS if b != background]
    return [(shape, colour, background if on else others[k % len(others)])
            for k, (shape, colour) in enumerate(zip(SHAPES, COLOURS))]  # fmt: skip


def caption(scene: Scene, colour: bool = True) -> str:
    """The scene's caption; `colour=False` leaves the colour out ("a photograph of a bar on water")."""
    what = f"{scene.colour} {scene.shape}" if colour else scene.shape
    return f"a photograph of a {what} on {scene.background}"


def _texture(background: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float RGB: a recognisable texture around the background's mean colour."""
    base = np.array(BACKGROUND_RGB[background], dtype=np.float32)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    noise = rng.normal(0, 1, (size, size)).astype(np.float32)
    if background == "sand":  # fine grain plus gentle dunes
        pattern = 10 * noise + 10 * np.sin(2 * math.pi * (3 * x + 1.5 * y + rng.uniform()))
    elif background == "water":  # horizontal ripples
        pattern = 18 * np.sin(2 * math.pi * (9 * y + 0.8 * np.sin(2 * math.pi * 2 * x + rng.uniform() * 6))) + 4 * noise
    elif background == "grass":  # vertical blades
        blades = rng.normal(0, 1, (1, size)).astype(np.float32).repeat(size, 0)
        pattern = 16 * blades + 8 * noise
    else:  # snow: bright, nearly flat, sparse sparkles
        pattern = 3 * noise + 8 * (rng.uniform(size=(size, size)) > 0.97)
    return np.clip(base[None, None, :] + pattern[..., None], 0, 255)


def _polygon(scene: Scene, size: int) -> list[tuple[float, float]] | None:
    cx, cy, r = scene.cx * size, scene.cy * size, scene.radius * size
    angle0 = math.radians(scene.rotation)
    if scene.shape == "bar":  # a rectangle inscribed in the circle of radius r
        half = math.atan(1 / BAR_ASPECT)  # the corners' angle off the long axis
        corners = [angle0 + half, angle0 + math.pi - half, angle0 + math.pi + half, angle0 - half]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in corners]
    if scene.shape == "triangle":
        corners = [angle0 + k * 2 * math.pi / 3 for k in range(3)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in corners]
    if scene.shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else STAR_INNER * r
            a = angle0 + k * math.pi / 5
            points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
        return points
    if scene.shape == "circle":
        return None
    raise ValueError(f"unknown shape {scene.shape!r}: the shapes world has {', '.join(SHAPES)}")


def render(scene: Scene, size: int = IMAGE_SIZE, supersample: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Draw a scene. Returns (image (size, size, 3) uint8, object mask (size, size) bool)."""
    rng = np.random.default_rng(scene.texture_seed)
    background = _texture(scene.background, size, rng)
    # Draw the mask at a higher resolution and downsample, for anti-aliased edges.
    big = size * supersample
    mask_image = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask_image)
    polygon = _polygon(scene, big)
    if polygon is None:
        cx, cy, r = scene.cx * big, scene.cy * big, scene.radius * big
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(polygon, fill=255)
    alpha = np.asarray(mask_image.resize((size, size), Image.BOX), dtype=np.float32) / 255  # (size, size)
    colour = np.array(COLOUR_RGB[scene.colour], dtype=np.float32)
    # A little shading so the object is not a flat stencil.
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    shade = 1.0 + 0.12 * ((scene.cx - x) + (scene.cy - y))
    shading = rng.normal(0, 4, (size, size, 1)).astype(np.float32)
    obj = np.clip(colour[None, None, :] * shade[..., None] + shading, 0, 255)
    image = alpha[..., None] * obj + (1 - alpha[..., None]) * background
    image = Image.fromarray(image.round().astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.3))
    return np.asarray(image), alpha > 0.5


@dataclass(frozen=True)
class ColourJudgement:
    colour: str | None  # majority object colour, None when too few object pixels
    background: str  # majority background class
    object_fraction: float  # share of pixels assigned to an object colour


_PALETTE_NAMES = list(COLOURS) + list(BACKGROUNDS)
_PALETTE = np.array([COLOUR_RGB[c] for c in COLOURS] + [BACKGROUND_RGB[b] for b in BACKGROUNDS], np.float32)


def judge_colours(image: np.ndarray, mask: np.ndarray | None = None, min_object_fraction: float = 0.02) -> ColourJudgement:
    """Object colour and background of an image by the renderer's colour statistics.

    Each pixel goes to the nearest of the 8 mean colours (4 object colours, 4 background
    textures, after a light blur that averages the texture out). With a mask, object
    and background pixels are taken from it; without one (a generated image), object
    pixels are those nearest an object colour.
    """
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.BoxBlur(1)), dtype=np.float32)
    distances = ((blurred[..., None, :] - _PALETTE[None, None]) ** 2).sum(-1)  # (H, W, 8)
    nearest = distances.argmin(-1)  # (H, W)
    n_colours = len(COLOURS)
    if mask is None:
        object_pixels = nearest < n_colours
        background_pixels = ~object_pixels
    else:
        object_pixels, background_pixels = mask, ~mask
    object_fraction = float(object_pixels.mean())
    colour = None
    if object_fraction >= min_object_fraction:
        obj = distances[object_pixels][:, :n_colours].argmin(-1)
        colour = COLOURS[int(np.bincount(obj, minlength=n_colours).argmax())]
    bg = distances[background_pixels][:, n_colours:].argmin(-1) if background_pixels.any() else np.zeros(1, int)
    background = BACKGROUNDS[int(np.bincount(bg, minlength=len(BACKGROUNDS)).argmax())]
    return ColourJudgement(colour=colour, background=background, object_fraction=object_fraction)
