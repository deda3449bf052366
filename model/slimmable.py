"""Slimmable layers: full-width weights, sliced in ``forward``.

The input width is read from the tensor and the output width is an explicit argument, so the same module
can serve two widths from two threads at once: no state is ever written during ``forward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SlimConv2d(nn.Conv2d):
    """A ``Conv2d`` that can run with fewer input and output channels than it stores.

    Args:
        x: ``(B, C_in, H, W)`` with ``C_in <= in_channels``; the first ``C_in`` input filters are used.
        out_channels: how many output channels to compute (the first ones); ``None`` means all.

    Returns:
        ``(B, out_channels, H', W')``.
    """

    def forward(self, x: torch.Tensor, out_channels: int | None = None) -> torch.Tensor:  # type: ignore[override]
        out = self.out_channels if out_channels is None else out_channels
        weight = self.weight[:out, : x.shape[1]]
        bias = None if self.bias is None else self.bias[:out]
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def export(self, in_channels: int, out_channels: int) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding a copy of the sliced weights."""
        conv = nn.Conv2d(
            in_channels, out_channels, self.kernel_size, self.stride, self.padding, bias=self.bias is not None
        )
        with torch.no_grad():
            conv.weight.copy_(self.weight[:out_channels, :in_channels])
            if self.bias is not None:
                conv.bias.copy_(self.bias[:out_channels])
        return conv.to(self.weight.device)


class SlimConvTranspose2d(nn.ConvTranspose2d):
    """A ``ConvTranspose2d`` whose input and output widths can be sliced, like :class:`SlimConv2d`.

    The stored weight has shape ``(in_channels, out_channels, kH, kW)``.
    """

    def forward(self, x: torch.Tensor, out_channels: int | None = None) -> torch.Tensor:  # type: ignore[override]
        out = self.out_channels if out_channels is None else out_channels
        weight = self.weight[: x.shape[1], :out]
        bias = None if self.bias is None else self.bias[:out]
        return F.conv_transpose2d(x, weight, bias, self.stride, self.padding, self.output_padding)

    def export(self, in_channels: int, out_channels: int) -> nn.ConvTranspose2d:
        """A plain ``nn.ConvTranspose2d`` holding a copy of the sliced weights."""
        conv = nn.ConvTranspose2d(
            in_channels, out_channels, self.kernel_size, self.stride, self.padding, bias=self.bias is not None
        )
        with torch.no_grad():
            conv.weight.copy_(self.weight[:in_channels, :out_channels])
            if self.bias is not None:
                conv.bias.copy_(self.bias[:out_channels])
        return conv.to(self.weight.device)


def apply_conv(layer: nn.Module, x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Run ``layer`` at ``out_channels``; a plain (exported) conv ignores the width it already has."""
    if isinstance(layer, (SlimConv2d, SlimConvTranspose2d)):
        return layer(x, out_channels)
    return layer(x)
