"""The gate: its scores, its padding, its config's round trip, its noise statistics and its two-step choice."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.gate import NUM_STATS, Gate, GateConfig, choose, noise_statistics, pad_to_multiple


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 37, 50), (1, 3, 5, 9)])
def test_the_gate_scores_every_sub_network_for_any_image_size(shape):
    gate = Gate(GateConfig(num_subnets=5)).eval()
    logits = gate(torch.rand(shape))
    assert logits.shape == (shape[0], 5) and torch.isfinite(logits).all()


def test_padding_reflects_and_falls_back_to_replication_on_tiny_images():
    image = torch.arange(3 * 5 * 6, dtype=torch.float32).reshape(1, 3, 5, 6)
    padded = pad_to_multiple(image, 4)
    assert padded.shape == (1, 3, 8, 8)
    assert torch.equal(padded[..., :5, :6], image)
    assert torch.equal(padded[..., 5, :6], image[..., 3, :])  # reflected about the last row
    tiny = pad_to_multiple(image[..., :1, :1], 4)
    assert torch.equal(tiny, image[..., :1, :1].expand(1, 3, 4, 4))
    assert pad_to_multiple(padded, 4) is padded


def test_gate_config_round_trips_through_its_dict():
    config = GateConfig(num_subnets=3, features=(8, 16, 16), hidden=12)
    assert GateConfig.from_dict(config.to_dict()) == config


def _jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    array = (image[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255


def _smooth_photo(side: int = 128) -> torch.Tensor:
    axis = torch.linspace(0, 1, side)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([0.3 + 0.4 * x, 0.5 + 0.2 * torch.sin(3 * y), 0.4 + 0.3 * x * y])[None]


def test_noise_statistics_tell_white_noise_from_jpeg_compressed_noise():
    clean = _smooth_photo()
    generator = torch.Generator().manual_seed(0)
    white = (clean + torch.randn(clean.shape, generator=generator) * 15 / 255).clamp(0, 1)
    compressed = _jpeg(white, 60)
    white_stats, compressed_stats = noise_statistics(torch.cat([white, compressed]))
    assert compressed_stats[1] > white_stats[1] + 0.1  # lag-1 correlation across
    assert compressed_stats[5] > white_stats[5] + 0.1  # the 8-pixel block grid, across
    assert compressed_stats[7] < white_stats[7] - 0.5  # colour energy over luma energy
    assert compressed_stats[9] > white_stats[9] + 0.3  # red-green correlation


def test_noise_statistics_stay_finite_on_flat_quantised_images():
    flat = _jpeg(torch.full((1, 3, 64, 64), 0.5), 30)  # every step between neighbours is zero
    stats = noise_statistics(flat)
    assert stats.shape == (1, NUM_STATS) and torch.isfinite(stats).all() and stats.abs().max() < 30
    assert torch.equal(noise_statistics(torch.rand(2, 3, 8, 8)), torch.zeros(2, NUM_STATS))  # under one patch


def test_choose_decides_the_group_by_its_total_probability_then_the_row_within_it():
    # Row 0 (group A) scores highest alone, but group B's three rows hold more probability together.
    logits = torch.tensor([[2.0, -9.0, 1.5, 1.5, 1.6]])
    assert choose(logits, [[0, 1], [2, 3, 4]]).tolist() == [4]
    assert choose(logits, [[0, 1, 2, 3, 4]]).tolist() == [0]  # one group: the argmax
