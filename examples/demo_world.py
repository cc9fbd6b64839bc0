"""A synthetic world of coloured shapes, for the demo CLIP and for examples and tests.

Each scene is one named object (shape, colour, size, position) on a tinted background with a
small unnamed distractor. Captions name only some attributes, with varied templates. Both
choices are deliberate (DESIGN.md §4): images carry content that captions never describe, so a
contrastive model trained on this world keeps a CLIP-like modality gap instead of collapsing
the two modalities onto each other.

Usage::

    scenes = sample_world(1000, seed=0)
    images = render_batch(scenes)                    # (n, 3, 32, 32) floats in [0, 1]
    rng = random.Random(0)
    texts = [caption(s, rng) for s in scenes]
    labels = [s.color_index for s in scenes]         # or s.shape_index, for a classifier
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.20, 0.80),
    "orange": (1.00, 0.55, 0.05),
    "cyan": (0.10, 0.90, 0.90),
    "pink": (1.00, 0.50, 0.75),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
#: Row-major 3x3 grid of positions, with the phrase a caption uses for each.
POSITIONS = (
    ("top-left", "in the top left corner"),
    ("top", "at the top"),
    ("top-right", "in the top right corner"),
    ("left", "on the left"),
    ("center", "in the center"),
    ("right", "on the right"),
    ("bottom-left", "in the bottom left corner"),
    ("bottom", "at the bottom"),
    ("bottom-right", "in the bottom right corner"),
)
POSITION_NAMES = tuple(name for name, _ in POSITIONS)
#: Image normalisation the demo model was trained with (also in its preprocess_cfg).
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

_RADIUS = {"small": 3.0, "large": 5.0}
_PREFIXES = ("", "a photo of ", "an image of ", "there is ", "a drawing of ", "a picture with ")
_NOUNS = ("shape", "object", "thing")


@dataclass(frozen=True)
class Scene:
    """One image's ground truth. Background and distractor are never named by captions."""

    shape: str
    color: str
    size: str
    position: str
    center: tuple[float, float]  # (x, y) in pixels, jittered around the grid cell
    color_rgb: tuple[float, float, float]
    background: tuple[float, float, float]
    distractor_xy: tuple[int, int]
    distractor_rgb: tuple[float, float, float]
    noise_seed: int

    @property
    def shape_index(self) -> int:
        return SHAPES.index(self.shape)

    @property
    def color_index(self) -> int:
        return COLOR_NAMES.index(self.color)

    @property
    def position_index(self) -> int:
        return POSITION_NAMES.index(self.position)


def _jitter(
    rgb: tuple[float, float, float], amount: float, rng: random.Random
) -> tuple[float, float, float]:
    r, g, b = (min(1.0, max(0.0, c + rng.uniform(-amount, amount))) for c in rgb)
    return (r, g, b)


def _sample_scene(rng: random.Random) -> Scene:
    color = rng.choice(COLOR_NAMES)
    position = rng.randrange(len(POSITIONS))
    cell = IMAGE_SIZE / 3
    cx = (position % 3 + 0.5) * cell + rng.uniform(-1.5, 1.5)
    cy = (position // 3 + 0.5) * cell + rng.uniform(-1.5, 1.5)
    grey = rng.uniform(0.15, 0.45)
    return Scene(
        shape=rng.choice(SHAPES),
        color=color,
        size=rng.choice(SIZES),
        position=POSITION_NAMES[position],
        center=(cx, cy),
        color_rgb=_jitter(COLORS[color], 0.05, rng),
        background=_jitter((grey, grey, grey), 0.15, rng),
        distractor_xy=(rng.randrange(IMAGE_SIZE - 3), rng.randrange(IMAGE_SIZE - 3)),
        distractor_rgb=(rng.random(), rng.random(), rng.random()),
        noise_seed=rng.randrange(2**31),
    )


def sample_world(n: int, seed: int) -> list[Scene]:
    """``n`` independent scenes; the same ``seed`` always gives the same scenes."""
    rng = random.Random(seed)
    return [_sample_scene(rng) for _ in range(n)]


def _shape_mask(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    adx, ady = dx.abs(), dy.abs()
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return torch.maximum(adx, ady) <= 0.85 * r
    if shape == "triangle":  # apex up
        return (dy >= -r) & (dy <= 0.8 * r) & (adx <= 0.6 * (dy + r))
    if shape == "diamond":
        return adx + ady <= r
    if shape == "cross":
        return ((adx <= 0.35 * r) & (ady <= r)) | ((ady <= 0.35 * r) & (adx <= r))
    if shape == "ring":
        dist2 = dx**2 + dy**2
        return (dist2 <= r**2) & (dist2 >= (0.5 * r) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


_GRID = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5


def render(scene: Scene) -> torch.Tensor:
    """The scene as a (3, 32, 32) float32 image in [0, 1]."""
    image = torch.tensor(scene.background, dtype=torch.float32).view(3, 1, 1)
    image = image.expand(3, IMAGE_SIZE, IMAGE_SIZE).clone()
    dx = _GRID.view(1, -1) - scene.center[0]
    dy = _GRID.view(-1, 1) - scene.center[1]
    mask = _shape_mask(scene.shape, dx, dy, _RADIUS[scene.size])
    image[:, mask] = torch.tensor(scene.color_rgb).view(3, 1)
    x, y = scene.distractor_xy
    image[:, y : y + 3, x : x + 3] = torch.tensor(scene.distractor_rgb).view(3, 1, 1)
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(scene.noise_seed))
    return (image + 0.03 * noise).clamp_(0.0, 1.0)


def render_batch(scenes: Sequence[Scene]) -> torch.Tensor:
    """(n, 3, 32, 32) images in [0, 1]."""
    return torch.stack([render(scene) for scene in scenes])


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """Map [0, 1] images to the demo model's input range (MEAN / STD)."""
    mean = torch.tensor(MEAN, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption naming some (never all the visual) attributes, with a random template."""
    name_color = rng.random() < 0.7
    name_shape = rng.random() < 0.8 or not name_color
    words = []
    if rng.random() < 0.3:
        words.append(scene.size)
    if name_color:
        words.append(scene.color)
    words.append(scene.shape if name_shape else rng.choice(_NOUNS))
    phrase = " ".join(words)
    if rng.random() < 0.4:
        phrase += " " + POSITIONS[scene.position_index][1]
    return f"{rng.choice(_PREFIXES)}{_article(phrase)} {phrase}"
