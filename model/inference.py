"""The inference engine shared by the CLI and the service: gate, pick a sub-network, run tiled."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from model.checkpoint import Checkpoint
from model.flops import gate_macs, supernet_macs
from model.gate import Gate
from model.supernet import SlimUNet
from model.tiling import DEFAULT_TILE, TiledImage, default_margin


class Quality(str, enum.Enum):
    """``auto``: the gate's pick; ``fast``: the slimmest sub-network; ``best``: the widest."""

    auto = "auto"
    fast = "fast"
    best = "best"


@dataclass(frozen=True)
class DenoiseResult:
    denoised: torch.Tensor  # (1, 3, H, W), clamped to [0, 1]
    subnet: int
    flops: int  # network and gate, margins and padding included


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when it is available, else the CPU; any other name as torch reads it (``"cuda:1"``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Denoiser:
    """Holds a loaded checkpoint and runs it. Stateless per call, so one instance serves many threads.

    Args:
        checkpoint: a loaded :class:`~model.checkpoint.Checkpoint`.
        tile, margin: tiling parameters (see :mod:`model.tiling`); margin defaults to the receptive radius.
    """

    def __init__(self, checkpoint: Checkpoint, tile: int = DEFAULT_TILE, margin: int | None = None) -> None:
        # Channels-last: on the CPU the slimmed convolutions run 1.5x (widest) to 1.9x (slimmest) faster in this
        # layout (benchmarks/speed.py). The network is converted in place.
        self.net: SlimUNet = checkpoint.net.to(memory_format=torch.channels_last)
        self.gate: Gate = checkpoint.gate
        self.subnets = checkpoint.subnets
        self.gate_trained = checkpoint.gate_trained
        self.provenance = checkpoint.provenance
        if tile < self.net.config.size_multiple or tile % self.net.config.size_multiple:
            raise ValueError(f"tile {tile} must be a positive multiple of {self.net.config.size_multiple}")
        self.tile = tile
        self.margin = default_margin(self.net) if margin is None else margin
        costs = [s.mflops_per_pixel for s in self.subnets]
        self.best_index = max(range(len(costs)), key=costs.__getitem__)
        self.fast_index = min(range(len(costs)), key=costs.__getitem__)
        self.engines: Mapping[int, Callable[[torch.Tensor], torch.Tensor]] = {}

    def use_engines(self, engines: Mapping[int, Callable[[torch.Tensor], torch.Tensor]]) -> None:
        """Run sub-network ``i`` through ``engines[i]`` instead of the supernet: a compiled static copy that
        maps ``(B, 3, h, w)`` windows to denoised windows in [0, 1] (see ``service.backends``)."""
        unknown = set(engines) - set(range(len(self.subnets)))
        if unknown:
            raise ValueError(f"no sub-network {sorted(unknown)}; this checkpoint has {len(self.subnets)}")
        self.engines = engines

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def multiple(self) -> int:
        return self.net.config.size_multiple

    @torch.inference_mode()
    def select(self, noisy: torch.Tensor, quality: Quality | str) -> tuple[int, int]:
        """Pick a sub-network for ``(1, 3, H, W)`` ``noisy``; returns ``(index, gate MACs spent)``."""
        quality = Quality(quality)
        if quality is Quality.best:
            return self.best_index, 0
        if quality is Quality.fast:
            return self.fast_index, 0
        logits = self.gate(noisy.to(self.device))
        return int(logits.argmax(dim=1).item()), gate_macs(self.gate.config, *noisy.shape[-2:])

    def split(self, noisy: torch.Tensor) -> TiledImage:
        """Cut ``(1, 3, H, W)`` into tiles that share window shapes with other images."""
        return TiledImage(noisy, self.multiple, self.tile, self.margin)

    @torch.inference_mode()
    def run_windows(self, windows: torch.Tensor, index: int) -> torch.Tensor:
        """Run a batch ``(B, 3, h, w)`` of same-shape windows through sub-network ``index``."""
        if index in self.engines:
            return self.engines[index](windows)
        windows = windows.to(self.device).contiguous(memory_format=torch.channels_last)
        return self.net(windows, self.subnets[index].widths).clamp_(0, 1)

    def window_macs(self, index: int, height: int, width: int) -> int:
        return supernet_macs(self.net, self.subnets[index].widths, height, width)

    def run(self, noisy: torch.Tensor, index: int) -> tuple[torch.Tensor, int]:
        """Denoise ``(1, 3, H, W)`` with sub-network ``index``, one tile at a time; returns (denoised, MACs)."""
        job = self.split(noisy)
        macs = 0
        for tile_index, tile in enumerate(job.tiles):
            job.put(tile_index, self.run_windows(job.window(tile_index), index).cpu())
            macs += self.window_macs(index, *tile.shape)
        return job.result(), macs

    def denoise(self, noisy: torch.Tensor, quality: Quality | str = Quality.auto) -> DenoiseResult:
        """Denoise one ``(1, 3, H, W)`` image in [0, 1] end to end: select, then run tiled."""
        index, gate_cost = self.select(noisy, quality)
        denoised, macs = self.run(noisy, index)
        return DenoiseResult(denoised, index, 2 * (gate_cost + macs))

    def gate_mflops_per_pixel(self, side: int = 256) -> float:
        return 2 * gate_macs(self.gate.config, side, side) / (side * side) / 1e6

    def summary(self) -> dict:
        """The sub-network table and gate cost, as ``ddsnet info --json`` and ``GET /info`` show them."""
        return {
            "subnets": [s.to_dict() for s in self.subnets],
            "best": self.best_index,
            "fast": self.fast_index,
            "gate_mflops_per_pixel": round(self.gate_mflops_per_pixel(), 6),
            "gate_trained": self.gate_trained,
            "tile": self.tile,
            "margin": self.margin,
            "provenance": self.provenance,
        }
