"""Whole-image inference at any size: padding, and overlapped tiles that reproduce the whole-image result.

An image is padded once (reflect, bottom/right) to the U-Net's multiple. Tiles are cut from that padded
image on a grid aligned to the multiple, each with ``margin`` pixels of context on every side where the
image has them. When ``margin`` covers the network's receptive radius, every kept pixel of a tile saw
exactly what it sees in whole-image inference, so tiled and whole-image outputs agree up to float
rounding. All tiles of an image share one window shape (at most ``tile + 2 * margin``), so they batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model.gate import pad_to_multiple
from model.supernet import SlimUNet, WidthConfig

DEFAULT_TILE = 512


@dataclass(frozen=True)
class Tile:
    """A window to run (``y0:y1, x0:x1``) and the core of it to keep (``cy0:cy1, cx0:cx1``), in padded pixels."""

    y0: int
    y1: int
    x0: int
    x1: int
    cy0: int
    cy1: int
    cx0: int
    cx1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0


def default_margin(net: SlimUNet) -> int:
    """The receptive radius rounded up to the network's size multiple."""
    multiple = net.config.size_multiple
    radius = net.receptive_radius()
    return radius + (-radius % multiple)


def _axis_windows(length: int, tile: int, margin: int, multiple: int) -> list[tuple[int, int, int, int]]:
    """``(start, end, core_start, core_end)`` per window along one axis; every window has the same size.

    An axis that fits in one window of ``tile + 2 * margin`` is run whole: its ends need no context, so
    cutting it would only run pixels twice. A longer one is cut into the fewest cores of at most ``tile``,
    spread evenly, and the windows are as small as those cores and their margins allow (a 768-pixel axis
    runs 2 x 488 pixels at tile 512, margin 104, not 2 x 720).
    """
    if length <= tile + 2 * margin:
        return [(0, length, 0, length)]
    count = math.ceil((length - 2 * margin) / tile)
    units = (length - 2 * margin) // multiple
    bounds = [0, *(margin + multiple * round(units * i / count) for i in range(1, count)), length]
    cores = [end - start for start, end in zip(bounds, bounds[1:])]
    window = max(cores[0] + margin, cores[-1] + margin, *(core + 2 * margin for core in cores[1:-1]))
    spans = []
    for core_start, core_end in zip(bounds, bounds[1:]):
        start = min(max(core_start - margin, 0), length - window)
        spans.append((start, start + window, core_start, core_end))
    return spans


def plan_tiles(height: int, width: int, tile: int, margin: int, multiple: int) -> list[Tile]:
    """Tiles covering a padded ``height x width`` image (both multiples of ``multiple``).

    Args:
        tile: side of the kept core of each tile; a multiple of ``multiple``.
        margin: context on each side of the core; a multiple of ``multiple``.
    """
    if height % multiple or width % multiple or tile % multiple or margin % multiple:
        raise ValueError(f"sizes, tile and margin must be multiples of {multiple}")
    return [
        Tile(y0, y1, x0, x1, cy0, cy1, cx0, cx1)
        for (y0, y1, cy0, cy1) in _axis_windows(height, tile, margin, multiple)
        for (x0, x1, cx0, cx1) in _axis_windows(width, tile, margin, multiple)
    ]


class TiledImage:
    """One image cut into tiles: take each window, run it, put the result back, then read the result.

    Args:
        noisy: ``(1, C, H, W)`` in [0, 1], any size.
        multiple: the network's size multiple.
        tile, margin: see :func:`plan_tiles`.
    """

    def __init__(self, noisy: torch.Tensor, multiple: int, tile: int, margin: int) -> None:
        if noisy.dim() != 4 or noisy.shape[0] != 1:
            raise ValueError(f"expected a (1, C, H, W) tensor, got {tuple(noisy.shape)}")
        self.height, self.width = noisy.shape[-2:]
        self.padded = pad_to_multiple(noisy, multiple)
        self.tiles = plan_tiles(self.padded.shape[-2], self.padded.shape[-1], tile, margin, multiple)
        self.output = torch.empty_like(self.padded)

    def window(self, index: int) -> torch.Tensor:
        """``(1, C, h, w)``: the input window of tile ``index``."""
        t = self.tiles[index]
        return self.padded[:, :, t.y0 : t.y1, t.x0 : t.x1]

    def put(self, index: int, denoised_window: torch.Tensor) -> None:
        """Store the core of a denoised window ``(1, C, h, w)``."""
        t = self.tiles[index]
        core = denoised_window[:, :, t.cy0 - t.y0 : t.cy1 - t.y0, t.cx0 - t.x0 : t.cx1 - t.x0]
        self.output[:, :, t.cy0 : t.cy1, t.cx0 : t.cx1] = core.to(self.output.dtype)

    def result(self) -> torch.Tensor:
        """``(1, C, H, W)``: the stitched output, cropped back to the input size."""
        return self.output[:, :, : self.height, : self.width]

    def window_pixels(self) -> int:
        """Pixels actually run through the network, margins included."""
        return sum(t.shape[0] * t.shape[1] for t in self.tiles)


@torch.inference_mode()
def denoise_whole(net: SlimUNet, noisy: torch.Tensor, widths: WidthConfig | None = None) -> torch.Tensor:
    """Denoise ``(B, C, H, W)`` in one pass (pad to the multiple, run, crop)."""
    height, width = noisy.shape[-2:]
    padded = pad_to_multiple(noisy, net.config.size_multiple)
    return net(padded, widths)[:, :, :height, :width]


@torch.inference_mode()
def denoise_tiled(
    net: SlimUNet,
    noisy: torch.Tensor,
    widths: WidthConfig | None = None,
    tile: int = DEFAULT_TILE,
    margin: int | None = None,
) -> torch.Tensor:
    """Denoise ``(1, C, H, W)`` tile by tile; memory is bounded by one window, whatever the image size."""
    margin = default_margin(net) if margin is None else margin
    job = TiledImage(noisy, net.config.size_multiple, tile, margin)
    for index in range(len(job.tiles)):
        job.put(index, net(job.window(index), widths))
    return job.result()
