"""Dead-leaves crops: power-law sizes, colours from the photos, reproducible from the sampler's state."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from training.data import PatchSampler
from training.deadleaves import DeadLeavesShape, dead_leaves, gaussian_blur, photo_palette, power_law_radius


def test_radii_follow_the_power_law():
    rng = random.Random(0)
    radii = np.array([power_law_radius(rng, 3.0, 1.0, 1000.0) for _ in range(20000)])
    assert radii.min() >= 1.0 and radii.max() <= 1000.0
    # For density r^-3 on [1, inf), P(r > x) = x^-2.
    for x in (2.0, 4.0):
        assert abs((radii > x).mean() - x ** -2) < 0.01


def test_flat_shapes_take_palette_colours_and_occlude_each_other():
    palette = np.array([[20, 50, 80], [230, 128, 30], [100, 200, 150], [255, 255, 255]], np.float32) / 255
    crop = dead_leaves(64, palette, random.Random(5), DeadLeavesShape(textured=0.0, blur_max=0.0))
    assert crop.shape == (3, 64, 64)
    colours = {tuple(round(float(v) * 255) for v in crop[:, y, x]) for y in range(64) for x in range(64)}
    allowed = {tuple(round(float(v) * 255) for v in colour) for colour in palette}
    assert colours <= allowed and len(colours) >= 3
    # Many shapes at many sizes: edges everywhere, yet most neighbouring pixels share a shape.
    edges = (crop[:, 1:, :] != crop[:, :-1, :]).any(0).float().mean()
    assert 0.02 < edges < 0.5


def test_crops_are_8_bit_blurred_and_reproducible():
    palette = photo_palette([torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)], 64, seed=1)
    first = dead_leaves(48, palette, random.Random(9))
    again = dead_leaves(48, palette, random.Random(9))
    assert torch.equal(first, again)
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal((first * 255).round() / 255, first)
    step = torch.zeros(3, 16, 16)
    step[:, :, 8:] = 1
    blurred = gaussian_blur(step, 1.0)
    assert blurred[0, 0, 7] < 0.5 < blurred[0, 0, 8] and 0 < blurred[0, 0, 6] < 0.5


def test_sampler_mixes_dead_leaves_and_resumes_exactly(photo_dirs):
    plain = PatchSampler(photo_dirs / "train", seed=4)
    unmixed = PatchSampler(photo_dirs / "train", seed=4, dead_leaves=0.0)
    assert torch.equal(plain.sample(6, 24), unmixed.sample(6, 24))

    mixed = PatchSampler(photo_dirs / "train", seed=4, dead_leaves=1.0)
    state = mixed.state()
    synthetic = mixed.sample(4, 24)
    # No crop of the photos: every crop is a fresh dead-leaves image, coloured from the photos' pixels.
    assert not any(torch.equal(synthetic[i], p) for i in range(4) for p in plain.sample(4, 24))
    mixed.set_state(state)
    assert torch.equal(mixed.sample(4, 24), synthetic)
    with pytest.raises(ValueError, match="dead_leaves"):
        PatchSampler(photo_dirs / "train", dead_leaves=1.5)
