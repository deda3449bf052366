"""Slimmable layers: a sliced layer equals a static layer holding the copied weights."""

from __future__ import annotations

import torch

from model.slimmable import SlimConv2d, SlimConvTranspose2d


def test_a_sliced_conv_equals_its_exported_static_conv():
    torch.manual_seed(0)
    layer = SlimConv2d(16, 24, 3, padding=1)
    x = torch.rand(2, 8, 12, 12)  # the input width is read from the input
    sliced = layer(x, out_channels=12)
    static = layer.export(8, 12)
    assert sliced.shape == (2, 12, 12, 12) and isinstance(static, torch.nn.Conv2d)
    assert torch.allclose(sliced, static(x), atol=1e-6)
    assert layer(torch.rand(1, 16, 4, 4)).shape[1] == 24  # no width given: the full output


def test_a_sliced_transposed_conv_equals_its_exported_static_layer():
    torch.manual_seed(1)
    layer = SlimConvTranspose2d(32, 16, 2, stride=2)
    x = torch.rand(1, 20, 5, 5)
    sliced = layer(x, out_channels=8)
    assert sliced.shape == (1, 8, 10, 10)
    assert torch.allclose(sliced, layer.export(20, 8)(x), atol=1e-6)
