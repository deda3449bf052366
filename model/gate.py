"""The gate: a tiny CNN that reads the noisy image and scores the K sub-networks of a checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GateConfig:
    """Shape of the gate.

    The first conv is a stride-4 patchify at full resolution, so the gate still sees the noise
    (a downscaled image would have averaged it away); two stride-2 convs follow, then global mean and
    max pooling and a two-layer MLP over the K sub-networks.
    """

    in_channels: int = 3
    num_subnets: int = 4
    features: tuple[int, int, int] = (16, 32, 32)
    hidden: int = 32

    @classmethod
    def from_dict(cls, raw: dict) -> GateConfig:
        raw = dict(raw)
        if "features" in raw:
            raw["features"] = tuple(raw["features"])
        return cls(**raw)

    def to_dict(self) -> dict:
        return asdict(self)

    size_multiple = 16


class Gate(nn.Module):
    """``gate(noisy) -> logits``: ``(B, C, H, W)`` in [0, 1] to ``(B, K)`` logits over sub-networks."""

    def __init__(self, config: GateConfig) -> None:
        super().__init__()
        self.config = config
        f1, f2, f3 = config.features
        self.conv1 = nn.Conv2d(config.in_channels, f1, 4, stride=4)
        self.conv2 = nn.Conv2d(f1, f2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(f2, f3, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(2 * f3, config.hidden)
        self.fc2 = nn.Linear(config.hidden, config.num_subnets)

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        noisy = pad_to_multiple(noisy, GateConfig.size_multiple)
        # Centre the input so that the first layer looks at deviations, which carry the noise.
        x = torch.relu(self.conv1(noisy - 0.5))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return self.fc2(torch.relu(self.fc1(pooled)))


def pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad ``(B, C, H, W)`` at the bottom and right up to multiples of ``multiple``.

    Reflection keeps image statistics (and noise) at the border; images too small to reflect are
    replicated instead.
    """
    height, width = image.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return image
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(image, (0, pad_w, 0, pad_h), mode=mode)
