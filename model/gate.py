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
    max pooling and a two-layer MLP over the K sub-networks. With ``noise_stats``, the MLP also reads
    :func:`noise_statistics`: the noise's level, its correlation between neighbouring pixels, and the
    8-pixel block grid that JPEG leaves, at whatever offset, which a stride-4 patchify cannot see.
    """

    in_channels: int = 3
    num_subnets: int = 4
    features: tuple[int, int, int] = (16, 32, 32)
    hidden: int = 32
    noise_stats: bool = False

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
        self.fc1 = nn.Linear(2 * f3 + (NUM_STATS if config.noise_stats else 0), config.hidden)
        self.fc2 = nn.Linear(config.hidden, config.num_subnets)

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        noisy = pad_to_multiple(noisy, GateConfig.size_multiple)
        # Centre the input so that the first layer looks at deviations, which carry the noise.
        x = torch.relu(self.conv1(noisy - 0.5))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        pooled = [x.mean(dim=(2, 3)), x.amax(dim=(2, 3))]
        if self.config.noise_stats:
            pooled.append(noise_statistics(noisy))
        return self.fc2(torch.relu(self.fc1(torch.cat(pooled, dim=1))))


NUM_STATS = 7
BLOCK = 8  # JPEG's block side
STATS_PATCH = 16  # statistics are taken over the flattest of these patches, where noise outweighs texture
FLAT_SHARE = 0.3


def noise_statistics(noisy: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] to ``(B, 7)`` statistics of its noise, on the luma's flattest patches:

    - the log energy of the high-pass residual (the image minus its 3x3 mean), scaled by 1/10;
    - the residual's correlation with itself one and two pixels across and down: white noise has almost
      none, JPEG-compressed and downscaled noise a lot;
    - the block grid's strength across and down: the mean step between neighbouring pixels at the strongest
      of the 8 column (row) phases, over the median phase, minus 1. JPEG's block edges raise one phase; the
      maximum over phases finds the grid wherever it starts (a crop or a second JPEG moves it).

    Texture would swamp all of these, so each is a mean over the ``FLAT_SHARE`` of 16x16 patches whose
    residual energy is lowest. Images smaller than a patch give zeros.
    """
    batch = noisy.shape[0]
    luma = noisy.mean(dim=1, keepdim=True)
    height, width = (side - side % STATS_PATCH for side in luma.shape[-2:])
    if height == 0 or width == 0:
        return noisy.new_zeros(batch, NUM_STATS)
    luma = luma[..., :height, :width]
    residual = luma - F.avg_pool2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    patch_energy = F.avg_pool2d(residual.square(), STATS_PATCH).flatten(1)  # (B, patches)
    threshold = patch_energy.quantile(FLAT_SHARE, dim=1, keepdim=True)
    flat = (patch_energy <= threshold).float()
    weights = flat / flat.sum(dim=1, keepdim=True)
    mask = F.interpolate(flat.view(batch, 1, height // STATS_PATCH, width // STATS_PATCH), scale_factor=STATS_PATCH)

    def flat_mean(values: torch.Tensor) -> torch.Tensor:
        """The mean of a ``(B, 1, h, w)`` map over the flat patches (``h``, ``w`` up to one pixel short)."""
        padded = F.pad(values, (0, width - values.shape[-1], 0, height - values.shape[-2]))
        return (F.avg_pool2d(padded, STATS_PATCH).flatten(1) * weights).sum(dim=1)

    energy = flat_mean(residual.square()).clamp_min(1e-10)
    stats = [energy.log() / 10]
    for lag in (1, 2):
        stats.append(flat_mean(residual[..., :, lag:] * residual[..., :, :-lag]) / energy)
        stats.append(flat_mean(residual[..., lag:, :] * residual[..., :-lag, :]) / energy)
    across = (luma[..., :, 1:] - luma[..., :, :-1]).abs() * mask[..., :, 1:]
    down = (luma[..., 1:, :] - luma[..., :-1, :]).abs() * mask[..., 1:, :]
    for steps, weight in ((across.sum(dim=2), mask[..., :, 1:].sum(dim=2)),
                          (down.sum(dim=3), mask[..., 1:, :].sum(dim=3))):
        steps, weight = steps.flatten(1), weight.flatten(1)  # (B, W - 1) or (B, H - 1)
        usable = steps.shape[1] - steps.shape[1] % BLOCK
        steps = steps[:, :usable].reshape(batch, -1, BLOCK).sum(dim=1)
        weight = weight[:, :usable].reshape(batch, -1, BLOCK).sum(dim=1).clamp_min(1)
        phases = steps / weight  # (B, 8): the mean step at each phase of the grid
        stats.append(phases.amax(dim=1) / phases.median(dim=1).values.clamp_min(1e-6) - 1)
    return torch.stack(stats, dim=1)


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
