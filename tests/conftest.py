"""Shared fixtures: a tiny supernet config and a small randomly initialised gated checkpoint."""

from __future__ import annotations

import pytest
import torch

from model import Gate, GateConfig, SlimUNet, Subnet, SupernetConfig, save_checkpoint, supernet_mflops_per_pixel

TINY = SupernetConfig(
    channels=(8, 16, 32), enc_blocks=(1, 1), body_blocks=1, dec_blocks=(1, 1), steps_per_width=4, min_steps=2
)


def randomize(net: SlimUNet, seed: int = 0) -> SlimUNet:
    """Random weights of a realistic scale everywhere (the real init damps the tail)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return net


@pytest.fixture
def tiny_net() -> SlimUNet:
    return randomize(SlimUNet(TINY)).eval()


def tiny_subnets(net: SlimUNet) -> list[Subnet]:
    middle = tuple((g.full + g.min_width) // 2 // g.step * g.step for g in net.groups)
    configs = [net.widest(), middle, net.slimmest()]
    return [Subnet(c, supernet_mflops_per_pixel(net, c), {"25": 30.0 - i}) for i, c in enumerate(configs)]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A gated checkpoint file with three sub-networks and random weights."""
    net = randomize(SlimUNet(TINY))
    torch.manual_seed(1)
    gate = Gate(GateConfig(num_subnets=3))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, net, gate, tiny_subnets(net), gate_trained=False, provenance={"made_by": "tests"})
    return str(path)


@pytest.fixture(scope="session")
def two_profile_checkpoint(tmp_path_factory) -> str:
    """A gated checkpoint with a white and a compressed profile (other random weights), three sub-networks
    each, the weights stored in float16, and a gate that reads the noise statistics and decides the profile
    with a head of its own."""
    white, compressed = randomize(SlimUNet(TINY)), randomize(SlimUNet(TINY), seed=5)
    rows = tiny_subnets(white)
    subnets = rows + [Subnet(s.widths, s.mflops_per_pixel, s.val_psnr, "compressed") for s in rows]
    torch.manual_seed(2)
    gate = Gate(GateConfig(num_subnets=6, noise_stats=True, profiles=(0, 0, 0, 1, 1, 1)))
    path = tmp_path_factory.mktemp("ckpt") / "two-profiles.safetensors"
    save_checkpoint(path, {"white": white, "compressed": compressed}, gate, subnets, gate_trained=False,
                    provenance={"made_by": "tests"}, dtype=torch.float16)
    return str(path)


@pytest.fixture(autouse=True)
def engine_cache_home(tmp_path, monkeypatch):
    """Each test's engine cache (``$XDG_CACHE_HOME/ddsnet``) is its own and starts empty: none touches the
    user's, and none finds another test's engines."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("DDSNET_CACHE", raising=False)
    monkeypatch.delenv("DDSNET_CACHE_DIR", raising=False)
    monkeypatch.delenv("DDSNET_TORCH_THREADS", raising=False)  # an in-process CLI call would set torch's threads
    return tmp_path / "xdg-cache" / "ddsnet"
