import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import Gate, GateConfig, SlimUNet, SupernetConfig, gate_macs, supernet_macs


def counted_flops(module, *inputs) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("which", ["widest", "slimmest", "random"])
@pytest.mark.parametrize("size", [(32, 32), (24, 56)])
def test_analytic_macs_equal_flop_counter(tiny_net, which, size):
    widths = {
        "widest": tiny_net.widest(),
        "slimmest": tiny_net.slimmest(),
        "random": tiny_net.random_widths(random.Random(7)),
    }[which]
    x = torch.rand(1, 3, *size)
    assert 2 * supernet_macs(tiny_net, widths, *size) == counted_flops(tiny_net, x, widths)


def test_analytic_macs_equal_flop_counter_on_the_default_supernet():
    net = SlimUNet(SupernetConfig())
    widths = net.random_widths(random.Random(0))
    assert 2 * supernet_macs(net, widths, 64, 48) == counted_flops(net, torch.rand(1, 3, 64, 48), widths)


@pytest.mark.parametrize("size", [(64, 64), (50, 70)])
def test_gate_macs_equal_flop_counter(size):
    gate = Gate(GateConfig(num_subnets=4))
    assert 2 * gate_macs(gate.config, *size) == counted_flops(gate, torch.rand(1, 3, *size))


def test_gate_costs_under_one_percent_of_the_slimmest_subnet():
    net = SlimUNet(SupernetConfig())
    gate = GateConfig(num_subnets=4)
    assert gate_macs(gate, 256, 256) < 0.01 * supernet_macs(net, net.slimmest(), 256, 256)


def test_supernet_macs_refuses_unpadded_sizes(tiny_net):
    with pytest.raises(ValueError, match="multiple"):
        supernet_macs(tiny_net, tiny_net.widest(), 30, 32)
