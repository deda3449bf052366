import random
import threading

import pytest
import torch
from torch import nn

from model import SlimUNet, SupernetConfig
from model.slimmable import SlimConv2d, SlimConvTranspose2d


def test_slim_conv_equals_conv_with_sliced_weights():
    conv = SlimConv2d(16, 32, 3, padding=1)
    x = torch.randn(2, 10, 9, 9)
    reference = nn.functional.conv2d(x, conv.weight[:20, :10], conv.bias[:20], padding=1)
    assert torch.allclose(conv(x, 20), reference)
    assert conv(x, 20).shape == (2, 20, 9, 9)


def test_slim_conv_transpose_slices_in_and_out():
    conv = SlimConvTranspose2d(16, 8, 2, stride=2)
    x = torch.randn(1, 12, 5, 5)
    reference = nn.functional.conv_transpose2d(x, conv.weight[:12, :6], conv.bias[:6], stride=2)
    assert torch.allclose(conv(x, 6), reference)


def test_groups_and_width_space(tiny_net):
    assert len(tiny_net.widest()) == len(tiny_net.groups) == 3 + 2 + 1 + 2
    assert tiny_net.slimmest() == tuple(g.min_width for g in tiny_net.groups)
    assert all(g.min_width < g.full for g in tiny_net.groups)
    config = tiny_net.random_widths(random.Random(3))
    assert tiny_net.validate(config) == config


@pytest.mark.parametrize("bad", [(8,), (8, 16, 32, 8, 16, 32, 16, 7)])
def test_validate_rejects_bad_configs(tiny_net, bad):
    with pytest.raises(ValueError):
        tiny_net.validate(bad)


def test_config_rejects_inconsistent_shapes():
    with pytest.raises(ValueError):
        SupernetConfig(channels=(8, 16), enc_blocks=(1, 1), dec_blocks=(1,))
    with pytest.raises(ValueError):
        SupernetConfig(channels=(10, 16), enc_blocks=(1,), dec_blocks=(1,), steps_per_width=4)


def test_widths_change_the_output_and_shape_is_kept(tiny_net):
    x = torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        wide, slim = tiny_net(x, tiny_net.widest()), tiny_net(x, tiny_net.slimmest())
    assert wide.shape == slim.shape == x.shape
    assert (wide - slim).abs().max() > 1e-3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_export_equals_supernet_at_that_config(tiny_net, seed):
    widths = tiny_net.random_widths(random.Random(seed))
    static = tiny_net.export(widths)
    x = torch.rand(1, 3, 32, 40)
    with torch.no_grad():
        expected, exported = tiny_net(x, widths), static(x)
    assert torch.allclose(expected, exported, atol=1e-6)
    assert not any(isinstance(m, (SlimConv2d, SlimConvTranspose2d)) for m in static.modules())
    assert sum(p.numel() for p in static.parameters()) < sum(p.numel() for p in tiny_net.parameters())


def test_two_threads_with_two_widths_get_their_own_results(tiny_net):
    x = torch.rand(1, 3, 32, 32)
    configs = [tiny_net.widest(), tiny_net.slimmest()]
    with torch.no_grad():
        expected = [tiny_net(x, c) for c in configs]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def work(index: int) -> None:
        with torch.no_grad():
            for _ in range(20):
                results[index].append(tiny_net(x, configs[index]))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in (0, 1):
        assert len(results[index]) == 20
        assert all(torch.equal(r, expected[index]) for r in results[index])


def test_default_supernet_fits_the_cost_budget():
    from model import supernet_mflops_per_pixel

    net = SlimUNet(SupernetConfig())
    assert supernet_mflops_per_pixel(net, net.widest()) <= 2 * 250e3 / 1e6
