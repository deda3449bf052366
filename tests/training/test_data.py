"""Training and validation data: texture-biased crops, scaled crops, and validation views at several scales."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import PatchSampler, fixed_noisy_set


@pytest.fixture(scope="module")
def half_textured_dir(tmp_path_factory):
    """One 64x256 image: a flat left half and a one-pixel checkerboard right half."""
    folder = tmp_path_factory.mktemp("half")
    pixels = np.full((64, 256, 3), 128, np.uint8)
    checker = (np.indices((64, 128)).sum(0) % 2 * 255).astype(np.uint8)
    pixels[:, 128:] = checker[..., None]
    Image.fromarray(pixels).save(folder / "half.png")
    return folder


def test_texture_candidates_shift_crops_towards_texture(half_textured_dir):
    def textured_fraction(candidates: int) -> float:
        sampler = PatchSampler(half_textured_dir, seed=3, texture_candidates=candidates)
        patches = sampler.sample(200, 16)
        return sum(PatchSampler.texture(p) > 0.1 for p in patches) / len(patches)

    uniform, biased = textured_fraction(1), textured_fraction(4)
    assert 0.3 < uniform < 0.7
    assert biased > 0.9


def test_scale_range_area_downsamples_larger_regions(half_textured_dir):
    full = PatchSampler(half_textured_dir, seed=0, scale_range=(1.0, 1.0))
    half = PatchSampler(half_textured_dir, seed=0, scale_range=(0.5, 0.5))
    # Crops of the checkerboard alone: at scale 1 it stays a checkerboard, at scale 0.5 it averages to grey.
    full.images = half.images = [image[:, :, 128:] for image in full.images]
    assert all(PatchSampler.texture(p) > 1.5 for p in full.sample(8, 16))
    downsampled = half.sample(8, 16)
    assert downsampled.shape == (8, 3, 16, 16)
    assert all(PatchSampler.texture(p) < 0.05 for p in downsampled)
    assert torch.allclose(downsampled.mean(), torch.tensor(0.5), atol=0.01)
    for bad in ({"scale_range": (0.0, 1.0)}, {"scale_range": (0.8, 0.5)}, {"texture_candidates": 0}):
        with pytest.raises(ValueError):
            PatchSampler(half_textured_dir, **bad)


def test_validation_views_at_several_scales_keep_scale_one_unchanged(half_textured_dir):
    plain = fixed_noisy_set(half_textured_dir, [25], seed=7)
    views = fixed_noisy_set(half_textured_dir, [15, 25], seed=7, scales=[1.0, 0.5])
    assert [(name, sigma, tuple(clean.shape[-2:])) for name, sigma, clean, _ in views] == [
        ("half.png", 15.0, (64, 256)), ("half.png", 25.0, (64, 256)),
        ("half.png@0.5", 15.0, (32, 128)), ("half.png@0.5", 25.0, (32, 128))]
    # Scale 1 is the photo itself, with the same noise as a set without scales.
    assert torch.equal(views[1][2], plain[0][2]) and torch.equal(views[1][3], plain[0][3])
    # Downscaled by area, the one-pixel checkerboard averages to grey; the flat half stays flat.
    half_clean = views[2][2]
    assert PatchSampler.texture(half_clean[0, :, :, 68:]) < 0.05
    assert torch.allclose(half_clean[0, :, :, 68:].mean(), torch.tensor(0.5), atol=0.01)
    assert torch.allclose(half_clean[0, :, :, :60], torch.tensor(128 / 255))
    with pytest.raises(ValueError, match="scales"):
        fixed_noisy_set(half_textured_dir, [25], seed=7, scales=[0.0])


def test_a_views_scale_is_read_from_the_suffix_it_was_given_and_not_from_the_files_name():
    from training.data import pair_scale

    assert pair_scale("photo.png@0.5") == 0.5 and pair_scale("photo.png") == 1.0
    assert pair_scale("icon@2x.png") == 1.0 and pair_scale("icon@2x.png@0.5") == 0.5
