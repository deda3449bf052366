"""PSNR and 8-bit AWGN."""

from __future__ import annotations

import math

import pytest
import torch

from model.metrics import add_noise, psnr


def test_psnr_of_a_known_error_per_image():
    clean = torch.zeros(2, 3, 4, 4)
    denoised = torch.stack([torch.full((3, 4, 4), 0.1), torch.full((3, 4, 4), 0.01)])
    assert psnr(denoised, clean).tolist() == pytest.approx([20.0, 40.0], abs=1e-4)
    assert psnr(torch.full((3, 4, 4), 2.0), torch.full((3, 4, 4), 0.9)).item() == pytest.approx(
        -20 * math.log10(0.1), abs=1e-4)  # clamped to the range before the error


def test_add_noise_has_the_sigma_asked_for_and_lands_on_8_bit_levels():
    clean = torch.full((1, 3, 128, 128), 0.5)
    noisy = add_noise(clean, 25.0, torch.Generator().manual_seed(0))
    assert float((noisy - clean).std() * 255) == pytest.approx(25.0, rel=0.03)
    assert torch.equal(noisy * 255, (noisy * 255).round()) and noisy.min() >= 0 and noisy.max() <= 1
    raw = add_noise(clean, 25.0, torch.Generator().manual_seed(0), quantize=False)
    assert not torch.equal(raw * 255, (raw * 255).round())
