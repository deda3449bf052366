"""The gate: its scores, its padding, and its config's round trip."""

from __future__ import annotations

import pytest
import torch

from model.gate import Gate, GateConfig, pad_to_multiple


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
