"""Inference shared by the CLI and the service: gate, pick a sub-network, run tiled.

A sub-network runs through the sliced supernet, or through a ``runtime`` the caller hands in: a compiled
static copy that maps ``(B, 3, h, w)`` windows to denoised windows in [0, 1] (see ``service.backends``).
The denoiser itself never holds one, so the same instance serves callers with different runtimes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from model.checkpoint import Checkpoint
from model.flops import gate_macs, supernet_macs
from model.gate import Gate, choose
from model.supernet import SlimUNet
from model.tiling import DEFAULT_TILE, TiledImage, default_margin

# A compiled sub-network: ``(B, 3, h, w)`` windows in, denoised windows in [0, 1] out.
WindowRuntime = Callable[[torch.Tensor], torch.Tensor]


class Quality(str, enum.Enum):
    """``auto``: the gate's pick; ``fast``: the slimmest sub-network; ``best``: the widest."""

    auto = "auto"
    fast = "fast"
    best = "best"


class Noise(str, enum.Enum):
    """Which profile's weights: ``auto`` lets the JPEG header or the gate decide; ``white`` is for white noise
    (sensor noise, added noise); ``compressed`` for JPEG-compressed and otherwise correlated noise."""

    auto = "auto"
    white = "white"
    compressed = "compressed"


# Why a profile ran: the request named it, the upload's JPEG header said so, or the gate chose it.
PROFILE_REQUESTED = "requested"
PROFILE_JPEG_HEADER = "jpeg_header"
PROFILE_GATE = "gate"
# An upload stored as JPEG at this quality or below goes to the compressed profile without asking the gate:
# its quantisation tables say for certain that the pixels went through JPEG.
JPEG_HINT_MAX_QUALITY = 97


@dataclass(frozen=True)
class Selection:
    """The sub-network chosen for an image: its row, the gate's MACs spent on choosing it, its profile and
    why that profile."""

    index: int
    gate_macs: int
    profile: str
    profile_reason: str


@dataclass(frozen=True)
class DenoiseResult:
    denoised: torch.Tensor  # (1, 3, H, W), clamped to [0, 1]
    subnet: int
    flops: int  # network and gate, margins and padding included
    profile: str = ""


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
        # layout (benchmarks/speed.py). The networks are converted in place.
        self.nets: dict[str, SlimUNet] = {name: net.to(memory_format=torch.channels_last)
                                          for name, net in checkpoint.nets.items()}
        self.profiles = list(self.nets)
        self.net: SlimUNet = self.nets[self.profiles[0]]
        self.gate: Gate = checkpoint.gate
        self.subnets = checkpoint.subnets
        self.gate_trained = checkpoint.gate_trained
        self.provenance = checkpoint.provenance
        self.tensors_sha256 = checkpoint.tensors_sha256  # which weights: "" for a checkpoint never saved
        if tile < self.net.config.size_multiple or tile % self.net.config.size_multiple:
            raise ValueError(f"tile {tile} must be a positive multiple of {self.net.config.size_multiple}")
        self.tile = tile
        self.margin = default_margin(self.net) if margin is None else margin
        self.rows = {name: [i for i, s in enumerate(self.subnets) if s.profile == name] for name in self.profiles}
        # ``best`` and ``fast`` of the first profile; :meth:`best_of` and :meth:`fast_of` for any.
        self.best_index, self.fast_index = self.best_of(self.profiles[0]), self.fast_of(self.profiles[0])

    def best_of(self, profile: str) -> int:
        """The widest sub-network of ``profile``."""
        return max(self.rows[profile], key=lambda i: self.subnets[i].mflops_per_pixel)

    def fast_of(self, profile: str) -> int:
        """The slimmest sub-network of ``profile``."""
        return min(self.rows[profile], key=lambda i: self.subnets[i].mflops_per_pixel)

    def network(self, index: int) -> SlimUNet:
        """The supernet that sub-network ``index`` slices: its profile's."""
        return self.nets[self.subnets[index].profile]

    def check_noise(self, noise: Noise) -> None:
        """Refuse a profile this checkpoint does not have (:class:`ValueError`, naming the ones it has)."""
        if noise is not Noise.auto and noise.value not in self.nets:
            raise ValueError(f"this checkpoint has no {noise.value} profile; its profiles are "
                             f"{', '.join(self.profiles)}")

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def multiple(self) -> int:
        return self.net.config.size_multiple

    @torch.inference_mode()
    def select(self, noisy: torch.Tensor, quality: Quality, noise: Noise = Noise.auto,
               jpeg_quality: int | None = None) -> Selection:
        """Pick a sub-network for ``(1, 3, H, W)`` ``noisy``.

        The profile is the one ``noise`` names; else, for an upload that was a JPEG file of at most
        :data:`JPEG_HINT_MAX_QUALITY` (``jpeg_quality``, from its header), the compressed profile; else the
        profile that the gate gives the most probability in all (:func:`model.gate.choose`). Within the
        profile, ``auto`` takes the gate's best-scored sub-network, ``best`` the widest and ``fast`` the
        slimmest. The gate runs only where it decides something: for ``fast`` and ``best``, only its profile
        head, which decides the profile as :func:`model.gate.choose` does (up to rounding).
        """
        self.check_noise(noise)
        profile, reason = None, PROFILE_GATE
        if noise is not Noise.auto:
            profile, reason = noise.value, PROFILE_REQUESTED
        elif len(self.profiles) == 1:
            profile = self.profiles[0]
        elif (jpeg_quality is not None and jpeg_quality <= JPEG_HINT_MAX_QUALITY
              and Noise.compressed.value in self.nets):
            profile, reason = Noise.compressed.value, PROFILE_JPEG_HEADER
        if profile is not None and quality is not Quality.auto:
            pick = self.best_of(profile) if quality is Quality.best else self.fast_of(profile)
            return Selection(pick, 0, profile, reason)
        if quality is not Quality.auto and self.gate.config.profiles:
            # Only the profile is left to decide: the profile head alone, without the width layers.
            group = int(self.gate.profile_log_probs(noisy.to(self.device))[0].argmax())
            profile = self.subnets[self.gate.groups[group][0]].profile
            pick = self.best_of(profile) if quality is Quality.best else self.fast_of(profile)
            return Selection(pick, gate_macs(self.gate.config, *noisy.shape[-2:], widths=False), profile, reason)
        logits = self.gate(noisy.to(self.device))[0]
        macs = gate_macs(self.gate.config, *noisy.shape[-2:])
        if profile is None:
            groups = [self.rows[name] for name in self.profiles]
            profile = self.subnets[int(choose(logits[None], groups)[0])].profile
        if quality is Quality.best:
            return Selection(self.best_of(profile), macs, profile, reason)
        if quality is Quality.fast:
            return Selection(self.fast_of(profile), macs, profile, reason)
        rows = self.rows[profile]
        return Selection(rows[int(logits[rows].argmax())], macs, profile, reason)

    def split(self, noisy: torch.Tensor) -> TiledImage:
        """Cut ``(1, 3, H, W)`` into tiles that share window shapes with other images."""
        return TiledImage(noisy, self.multiple, self.tile, self.margin)

    @torch.inference_mode()
    def run_windows(self, windows: torch.Tensor, index: int, runtime: WindowRuntime | None = None) -> torch.Tensor:
        """Run a batch ``(B, 3, h, w)`` of same-shape windows through sub-network ``index``: through
        ``runtime`` (sub-network ``index``'s compiled copy) when given, else through the sliced supernet."""
        if runtime is not None:
            return runtime(windows)
        windows = windows.to(self.device).contiguous(memory_format=torch.channels_last)
        return self.network(index)(windows, self.subnets[index].widths).clamp_(0, 1)

    def window_macs(self, index: int, height: int, width: int) -> int:
        return supernet_macs(self.net, self.subnets[index].widths, height, width)

    def run(self, noisy: torch.Tensor, index: int, runtime: WindowRuntime | None = None) -> tuple[torch.Tensor, int]:
        """Denoise ``(1, 3, H, W)`` with sub-network ``index`` (through ``runtime`` when given), one tile at a
        time; returns (denoised, MACs)."""
        job = self.split(noisy)
        macs = 0
        for tile_index, tile in enumerate(job.tiles):
            job.put(tile_index, self.run_windows(job.window(tile_index), index, runtime).cpu())
            macs += self.window_macs(index, *tile.shape)
        return job.result(), macs

    def denoise(self, noisy: torch.Tensor, quality: Quality = Quality.auto,
                runtimes: Mapping[int, WindowRuntime] | None = None, noise: Noise = Noise.auto,
                jpeg_quality: int | None = None) -> DenoiseResult:
        """Denoise one ``(1, 3, H, W)`` image in [0, 1] end to end: select, then run tiled.

        Args:
            noisy: ``(1, 3, H, W)`` in [0, 1].
            quality: which sub-network (see :class:`Quality`).
            runtimes: sub-network index -> its runtime; the sliced supernet runs when absent.
            noise, jpeg_quality: which profile (see :meth:`select`).
        """
        chosen = self.select(noisy, quality, noise, jpeg_quality)
        denoised, macs = self.run(noisy, chosen.index, None if runtimes is None else runtimes[chosen.index])
        return DenoiseResult(denoised, chosen.index, 2 * (chosen.gate_macs + macs), chosen.profile)

    def gate_mflops_per_pixel(self, side: int = 256) -> float:
        return 2 * gate_macs(self.gate.config, side, side) / (side * side) / 1e6

    def summary(self) -> dict:
        """The sub-network table and gate cost, as ``ddsnet info --json`` and ``GET /info`` show them."""
        return {
            "subnets": [s.to_dict() for s in self.subnets],
            "profiles": self.profiles,
            "best": self.best_index,
            "fast": self.fast_index,
            "gate_mflops_per_pixel": round(self.gate_mflops_per_pixel(), 6),
            "gate_trained": self.gate_trained,
            "tile": self.tile,
            "margin": self.margin,
            "provenance": self.provenance,
        }
