"""Dead-leaves images: synthetic clean crops with the edge and size statistics of natural photos.

A dead-leaves image is a stack of random opaque shapes seen from above. Their radii follow a power law
(density proportional to ``r ** -alpha``, ``alpha`` near 3), which makes the image scale-invariant as natural
images are (Lee, Mumford and Huang, 2001), and every shape's edge occludes the ones beneath it. Such images are
a documented training prior for denoising and restoration networks (Achddou, Gousseau and Ladjal, "Synthetic
images as a regularity prior for image restoration neural networks", 2021): they are all edges and texture at
every scale, which is what a denoiser must keep, and they cost no disk space.

Here the shapes are discs, ellipses and rotated rectangles, painted front to back until the crop is covered.
Each takes its colour from pixels of the training photos, so the colours have natural statistics, and most
carry a texture of their own (a sinusoidal grating or a smooth ramp). The crop is then blurred a little, as a
lens would, and quantised to 8 bits like a photo.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DeadLeavesShape:
    """The generator's parameters (sizes in pixels of the crop)."""

    alpha: float = 3.0  # radii follow density r ** -alpha on [r_min, r_max * side]
    r_min: float = 1.0
    r_max: float = 0.5  # the largest radius, as a fraction of the crop's side
    max_shapes: int = 4000  # painting stops here; what is still uncovered takes one more colour
    textured: float = 0.7  # the fraction of shapes with a texture of their own
    blur_max: float = 1.2  # a Gaussian blur of sigma uniform in [0, blur_max]


def power_law_radius(rng: random.Random, alpha: float, low: float, high: float) -> float:
    """A radius drawn from the density ``r ** -alpha`` on ``[low, high]`` (inverse transform sampling)."""
    u = rng.random()
    if abs(alpha - 1) < 1e-9:
        return low * (high / low) ** u
    a, b = low ** (1 - alpha), high ** (1 - alpha)
    return (a + u * (b - a)) ** (1 / (1 - alpha))


def _shape_mask(kind: int, radius: float, ys: np.ndarray, xs: np.ndarray, rng: random.Random) -> np.ndarray:
    """Which of the pixels at offsets ``(ys, xs)`` from a shape's centre it covers."""
    if kind == 0:  # disc
        return ys * ys + xs * xs <= radius * radius
    angle = rng.uniform(0, math.pi)
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = xs * cos + ys * sin, -xs * sin + ys * cos
    aspect = rng.uniform(0.3, 1.0)
    if kind == 1:  # ellipse
        return (u / radius) ** 2 + (v / (radius * aspect)) ** 2 <= 1
    return (np.abs(u) <= radius) & (np.abs(v) <= radius * aspect)  # rotated rectangle


def _texture(rng: random.Random, ys: np.ndarray, xs: np.ndarray, radius: float) -> np.ndarray:
    """A shape's own pattern, a multiplicative factor around 1: a grating or a ramp across the shape."""
    if rng.random() < 0.5:
        period = rng.uniform(2.0, max(2.5, radius))
        angle = rng.uniform(0, math.pi)
        phase = rng.uniform(0, 2 * math.pi)
        amplitude = rng.uniform(0.05, 0.35)
        wave = np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period + phase)
        return 1 + amplitude * wave
    angle = rng.uniform(0, 2 * math.pi)
    slope = rng.uniform(0.05, 0.4) / max(radius, 1.0)
    return 1 + slope * (xs * math.cos(angle) + ys * math.sin(angle))


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(3, H, W)`` blurred by a separable Gaussian of ``sigma`` pixels, with reflected borders."""
    if sigma < 0.3:
        return image
    half = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-half, half + 1, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.pad(image[:, None], (half, half, half, half), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]


def dead_leaves(side: int, palette: np.ndarray, rng: random.Random,
                shape: DeadLeavesShape = DeadLeavesShape()) -> torch.Tensor:
    """One ``(3, side, side)`` float crop in [0, 1], 8-bit valued.

    Args:
        side: the crop's side in pixels.
        palette: ``(N, 3)`` float colours in [0, 1] (pixels of real photos) that the shapes take theirs from.
        rng: every random draw comes from it, so a saved ``rng`` state reproduces the crop.
        shape: the generator's parameters.
    """
    if palette.ndim != 2 or palette.shape[1] != 3 or len(palette) == 0:
        raise ValueError(f"palette must be (N, 3) colours, got shape {palette.shape}")
    image = np.zeros((3, side, side), dtype=np.float32)
    uncovered = np.ones((side, side), dtype=bool)
    left = side * side
    r_max = max(shape.r_min * 1.01, shape.r_max * side)
    grid_y, grid_x = np.mgrid[0:side, 0:side].astype(np.float32)
    for _ in range(shape.max_shapes):
        radius = power_law_radius(rng, shape.alpha, shape.r_min, r_max)
        cy, cx = rng.uniform(-radius, side + radius), rng.uniform(-radius, side + radius)
        y0, y1 = max(0, int(cy - radius)), min(side, int(cy + radius) + 1)
        x0, x1 = max(0, int(cx - radius)), min(side, int(cx + radius) + 1)
        kind = rng.randrange(3)
        colour = palette[rng.randrange(len(palette))]
        textured = rng.random() < shape.textured
        if y0 >= y1 or x0 >= x1:
            continue
        ys, xs = grid_y[y0:y1, x0:x1] - cy, grid_x[y0:y1, x0:x1] - cx
        mask = _shape_mask(kind, radius, ys, xs, rng) & uncovered[y0:y1, x0:x1]
        if not mask.any():
            continue
        if textured:
            image[:, y0:y1, x0:x1][:, mask] = colour[:, None] * _texture(rng, ys, xs, radius)[mask]
        else:
            image[:, y0:y1, x0:x1][:, mask] = colour[:, None]
        uncovered[y0:y1, x0:x1] &= ~mask
        left -= int(mask.sum())
        if left == 0:
            break
    if left:
        image[:, uncovered] = palette[rng.randrange(len(palette))][:, None]
    out = gaussian_blur(torch.from_numpy(image), rng.uniform(0, shape.blur_max))
    return (out.clamp(0, 1) * 255).round() / 255


def photo_palette(images: list[torch.Tensor], count: int, seed: int) -> np.ndarray:
    """``(count, 3)`` colours in [0, 1]: pixels drawn uniformly from ``(3, H, W)`` uint8 photos, a photo at a
    time, by a generator of its own (the crop sampler's draws stay as they were)."""
    generator = np.random.default_rng(seed)
    colours = np.empty((count, 3), dtype=np.float32)
    for i in range(count):
        image = images[generator.integers(len(images))]
        y, x = generator.integers(image.shape[1]), generator.integers(image.shape[2])
        colours[i] = image[:, y, x].numpy() / 255.0
    return colours
