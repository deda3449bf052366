import math

import pytest
import torch

from model import denoise_tiled, denoise_whole
from model.tiling import default_margin, plan_tiles


@pytest.mark.parametrize("size", [(75, 101), (40, 200), (9, 13)])
def test_tiled_equals_whole_image(tiny_net, size):
    noisy = torch.rand(1, 3, *size)
    widths = tiny_net.slimmest()
    whole = denoise_whole(tiny_net, noisy, widths)
    tiled = denoise_tiled(tiny_net, noisy, widths, tile=16)
    assert tiled.shape == noisy.shape
    assert (tiled - whole).abs().max().item() < 1e-4


def test_too_small_a_margin_is_detectably_different(tiny_net):
    noisy = torch.rand(1, 3, 96, 96)
    whole = denoise_whole(tiny_net, noisy)
    tiled = denoise_tiled(tiny_net, noisy, tile=16, margin=0)
    assert (tiled - whole).abs().max().item() > 1e-4


def test_tiles_cover_the_image_once_and_windows_are_bounded():
    height, width, tile, margin = 4000, 6000, 512, 104
    tiles = plan_tiles(height, width, tile, margin, 8)
    covered = torch.zeros(height, width, dtype=torch.int32)
    for t in tiles:
        covered[t.cy0 : t.cy1, t.cx0 : t.cx1] += 1
        assert t.shape == tiles[0].shape and max(t.shape) <= tile + 2 * margin
        assert t.y0 <= t.cy0 - min(margin, t.cy0) and t.y1 >= min(t.cy1 + margin, height)
    assert bool((covered == 1).all())


@pytest.mark.parametrize("length", [8, 512, 600, 720, 728, 1024, 1232, 1440, 4000])
def test_an_axis_runs_the_fewest_windows_that_keep_every_margin(length):
    tile, margin = 512, 104
    tiles = plan_tiles(length, 8, tile, margin, 8)
    fits = length <= tile + 2 * margin
    assert len(tiles) == (1 if fits else math.ceil((length - 2 * margin) / tile))
    covered = torch.zeros(length, dtype=torch.int32)
    for t in tiles:
        covered[t.cy0 : t.cy1] += 1
        assert t.shape == tiles[0].shape and t.shape[0] <= tile + 2 * margin and t.shape[1] == 8
        assert t.cy1 - t.cy0 <= (length if fits else tile + margin)
        assert t.y0 <= t.cy0 - min(margin, t.cy0) and t.y1 >= min(t.cy1 + margin, length)
    assert bool((covered == 1).all())


def test_default_margin_covers_the_receptive_radius(tiny_net):
    margin = default_margin(tiny_net)
    assert margin >= tiny_net.receptive_radius() and margin % tiny_net.config.size_multiple == 0
