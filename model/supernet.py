"""The slimmable super network: a BN-free residual U-Net (DRUNet-like) that predicts the noise residual.

Width is plain data. A *width configuration* is a tuple with one channel count per slimmable group:

* one *trunk* group per U-Net level, because the head, the residual blocks' outputs, the down/up
  convolutions and the skip additions of a level are tied together by additions;
* one *inner* group per residual block (the width between its two 3x3 convolutions).

Every group runs at a multiple of its step between its minimum and its full width.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from model.slimmable import SlimConv2d, SlimConvTranspose2d, apply_conv

WidthConfig = tuple[int, ...]


@dataclass(frozen=True)
class SupernetConfig:
    """Shape of the super network.

    Attributes:
        in_channels: image channels (3 for RGB).
        channels: full trunk width per level, finest first; ``len(channels)`` levels means
            ``len(channels) - 1`` stride-2 downsamplings.
        enc_blocks: residual blocks per encoder level (finest first), one entry per level but the last.
        body_blocks: residual blocks at the coarsest level.
        dec_blocks: residual blocks per decoder level (finest first).
        steps_per_width: a group's width moves in steps of ``full // steps_per_width``.
        min_steps: a group never runs narrower than ``min_steps`` steps.
    """

    in_channels: int = 3
    channels: tuple[int, ...] = (32, 64, 128, 256)
    enc_blocks: tuple[int, ...] = (1, 1, 2)
    body_blocks: int = 2
    dec_blocks: tuple[int, ...] = (1, 1, 2)
    steps_per_width: int = 8
    min_steps: int = 3

    def __post_init__(self) -> None:
        levels = len(self.channels)
        if levels < 2:
            raise ValueError("a U-Net needs at least two levels")
        if len(self.enc_blocks) != levels - 1 or len(self.dec_blocks) != levels - 1:
            raise ValueError(f"enc_blocks and dec_blocks need {levels - 1} entries each")
        for width in self.channels:
            if width % self.steps_per_width:
                raise ValueError(f"channel count {width} is not a multiple of steps_per_width={self.steps_per_width}")
        if not 1 <= self.min_steps <= self.steps_per_width:
            raise ValueError("min_steps must lie in [1, steps_per_width]")

    @classmethod
    def from_dict(cls, raw: dict) -> SupernetConfig:
        raw = dict(raw)
        for key in ("channels", "enc_blocks", "dec_blocks"):
            if key in raw:
                raw[key] = tuple(raw[key])
        return cls(**raw)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (the total downsampling factor)."""
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class WidthGroup:
    """One slimmable group: its name, full width and step (minimum = ``min_width``)."""

    name: str
    full: int
    step: int
    min_width: int

    @property
    def choices(self) -> tuple[int, ...]:
        return tuple(range(self.min_width, self.full + 1, self.step))


@dataclass(frozen=True)
class LayerSpec:
    """One convolution as the network runs it at a given width configuration.

    ``scale`` is the downsampling factor of the layer's *input* relative to the image.
    """

    name: str
    kind: str  # "conv" or "convT"
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    scale: int


class ResBlock(nn.Module):
    """``x + conv(relu(conv(x)))`` with a slimmable inner width. No normalisation."""

    def __init__(self, trunk: int, inner: int) -> None:
        super().__init__()
        self.conv1 = SlimConv2d(trunk, inner, 3, padding=1)
        self.conv2 = SlimConv2d(inner, trunk, 3, padding=1)

    def forward(self, x: torch.Tensor, inner: int) -> torch.Tensor:
        hidden = torch.relu(apply_conv(self.conv1, x, inner))
        return x + apply_conv(self.conv2, hidden, x.shape[1])


class SlimUNet(nn.Module):
    """The supernet. ``net(noisy, widths)`` denoises ``(B, C, H, W)`` images in [0, 1] at ``widths``.

    H and W must be multiples of ``config.size_multiple``; :mod:`model.tiling` pads for you.
    """

    def __init__(self, config: SupernetConfig) -> None:
        super().__init__()
        self.config = config
        levels = len(config.channels)
        ch = config.channels
        self.head = SlimConv2d(config.in_channels, ch[0], 3, padding=1)
        self.encoders = nn.ModuleList(
            nn.ModuleList(ResBlock(ch[level], ch[level]) for _ in range(config.enc_blocks[level]))
            for level in range(levels - 1)
        )
        self.downs = nn.ModuleList(SlimConv2d(ch[level], ch[level + 1], 2, stride=2) for level in range(levels - 1))
        self.body = nn.ModuleList(ResBlock(ch[-1], ch[-1]) for _ in range(config.body_blocks))
        self.ups = nn.ModuleList(
            SlimConvTranspose2d(ch[level + 1], ch[level], 2, stride=2) for level in range(levels - 1)
        )
        self.decoders = nn.ModuleList(
            nn.ModuleList(ResBlock(ch[level], ch[level]) for _ in range(config.dec_blocks[level]))
            for level in range(levels - 1)
        )
        self.tail = SlimConv2d(ch[0], config.in_channels, 3, padding=1)
        # Start close to the identity (a small residual), which speeds up early training.
        with torch.no_grad():
            self.tail.weight.mul_(0.1)
            self.tail.bias.zero_()
        self.groups = self._make_groups()

    def _make_groups(self) -> tuple[WidthGroup, ...]:
        cfg = self.config

        def group(name: str, full: int) -> WidthGroup:
            step = full // cfg.steps_per_width
            return WidthGroup(name, full, step, step * cfg.min_steps)

        groups = [group(f"trunk{level}", width) for level, width in enumerate(cfg.channels)]
        for level, count in enumerate(cfg.enc_blocks):
            groups += [group(f"enc{level}.{i}", cfg.channels[level]) for i in range(count)]
        groups += [group(f"body.{i}", cfg.channels[-1]) for i in range(cfg.body_blocks)]
        for level in reversed(range(len(cfg.dec_blocks))):
            groups += [group(f"dec{level}.{i}", cfg.channels[level]) for i in range(cfg.dec_blocks[level])]
        return tuple(groups)

    def widest(self) -> WidthConfig:
        return tuple(g.full for g in self.groups)

    def slimmest(self) -> WidthConfig:
        return tuple(g.min_width for g in self.groups)

    def random_widths(self, rng: random.Random) -> WidthConfig:
        """A uniformly random per-group configuration (the sandwich rule's random members)."""
        return tuple(rng.choice(g.choices) for g in self.groups)

    def validate(self, widths: WidthConfig) -> WidthConfig:
        """Return ``widths`` as a tuple of ints, or raise ``ValueError`` naming the first bad group."""
        widths = tuple(int(w) for w in widths)
        if len(widths) != len(self.groups):
            raise ValueError(f"width configuration has {len(widths)} entries, the network has {len(self.groups)}")
        for g, w in zip(self.groups, widths):
            if w not in g.choices:
                raise ValueError(f"group {g.name}: width {w} is not one of {g.choices}")
        return widths

    def layer_specs(self, widths: WidthConfig | None = None) -> Iterator[LayerSpec]:
        """Every convolution in forward order, with the widths it runs at under ``widths``."""
        cfg = self.config
        widths = self.widest() if widths is None else widths
        levels = len(cfg.channels)
        trunk, inner = widths[:levels], iter(widths[levels:])

        def blocks(prefix: str, count: int, width: int, scale: int) -> Iterator[LayerSpec]:
            for i in range(count):
                hidden = next(inner)
                yield LayerSpec(f"{prefix}.{i}.conv1", "conv", width, hidden, 3, 1, scale)
                yield LayerSpec(f"{prefix}.{i}.conv2", "conv", hidden, width, 3, 1, scale)

        yield LayerSpec("head", "conv", cfg.in_channels, trunk[0], 3, 1, 1)
        for level in range(levels - 1):
            scale = 2**level
            yield from blocks(f"encoders.{level}", cfg.enc_blocks[level], trunk[level], scale)
            yield LayerSpec(f"downs.{level}", "conv", trunk[level], trunk[level + 1], 2, 2, scale)
        yield from blocks("body", cfg.body_blocks, trunk[-1], 2 ** (levels - 1))
        for level in reversed(range(levels - 1)):
            scale = 2**level
            yield LayerSpec(f"ups.{level}", "convT", trunk[level + 1], trunk[level], 2, 2, 2 * scale)
            yield from blocks(f"decoders.{level}", cfg.dec_blocks[level], trunk[level], scale)
        yield LayerSpec("tail", "conv", trunk[0], cfg.in_channels, 3, 1, 1)

    def receptive_radius(self) -> int:
        """An upper bound, in image pixels, on how far an output pixel can see (width-independent)."""
        radius = 0
        for spec in self.layer_specs():
            radius += spec.scale * (spec.kernel // 2) if spec.kind == "conv" and spec.stride == 1 else spec.scale
        return radius

    def forward(self, noisy: torch.Tensor, widths: WidthConfig | None = None) -> torch.Tensor:
        """Denoise a batch.

        Args:
            noisy: ``(B, C, H, W)`` in [0, 1]; H and W multiples of ``config.size_multiple``.
            widths: a width configuration (see :meth:`validate`); ``None`` is the widest.

        Returns:
            ``(B, C, H, W)`` denoised images (not clamped).
        """
        levels = len(self.config.channels)
        widths = self.widest() if widths is None else widths
        trunk, inner = widths[:levels], iter(widths[levels:])
        x = apply_conv(self.head, noisy, trunk[0])
        skips = [x]
        for level in range(levels - 1):
            for block in self.encoders[level]:
                x = block(x, next(inner))
            x = apply_conv(self.downs[level], x, trunk[level + 1])
            skips.append(x)
        for block in self.body:
            x = block(x, next(inner))
        for level in reversed(range(levels - 1)):
            x = apply_conv(self.ups[level], x + skips.pop(), trunk[level])
            for block in self.decoders[level]:
                x = block(x, next(inner))
        residual = apply_conv(self.tail, x + skips.pop(), noisy.shape[1])
        return noisy + residual

    def export(self, widths: WidthConfig) -> SlimUNet:
        """A static copy at ``widths``: every slimmable conv becomes a plain conv holding sliced weights.

        The copy's ``forward(noisy)`` needs no width argument (OFA's ``get_active_subnet``).
        """
        widths = self.validate(widths)
        static = copy.deepcopy(self)
        for spec in self.layer_specs(widths):
            parent_name, _, attr = spec.name.rpartition(".")
            parent = static.get_submodule(parent_name) if parent_name else static
            setattr(parent, attr, self.get_submodule(spec.name).export(spec.in_channels, spec.out_channels))
        static.groups = tuple(
            WidthGroup(g.name, w, g.step, min(g.min_width, w)) for g, w in zip(self.groups, widths)
        )
        return static


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["SupernetConfig", "SlimUNet", "WidthConfig", "WidthGroup", "LayerSpec", "count_parameters"]
