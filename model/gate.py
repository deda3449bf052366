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
    # With several profiles: the profile (0, 1, ...) of each sub-network. A second head then reads only the
    # noise statistics and decides the profile, and the first scores the widths within each profile.
    profiles: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict) -> GateConfig:
        raw = dict(raw)
        for key in ("features", "profiles"):
            if key in raw:
                raw[key] = tuple(raw[key])
        return cls(**raw)

    @property
    def num_profiles(self) -> int:
        return max(self.profiles) + 1 if self.profiles else 1

    @property
    def reads_stats(self) -> bool:
        return self.noise_stats or bool(self.profiles)

    def to_dict(self) -> dict:
        return asdict(self)

    size_multiple = 16


class Gate(nn.Module):
    """``gate(noisy) -> logits``: ``(B, C, H, W)`` in [0, 1] to ``(B, K)`` logits over sub-networks.

    With ``config.profiles``, the logits are log-probabilities split in two: the profile head's (on the noise
    statistics alone) plus the width's within its profile. A profile's rows then hold exactly the profile
    head's probability in all, which :func:`choose` decides on.
    """

    def __init__(self, config: GateConfig) -> None:
        super().__init__()
        self.config = config
        f1, f2, f3 = config.features
        self.conv1 = nn.Conv2d(config.in_channels, f1, 4, stride=4)
        self.conv2 = nn.Conv2d(f1, f2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(f2, f3, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(2 * f3 + (NUM_STATS if config.noise_stats else 0), config.hidden)
        self.fc2 = nn.Linear(config.hidden, config.num_subnets)
        if config.profiles:
            if len(config.profiles) != config.num_subnets:
                raise ValueError(f"profiles names {len(config.profiles)} sub-networks, the gate scores "
                                 f"{config.num_subnets}")
            self.profile_fc1 = nn.Linear(NUM_STATS, config.hidden)
            self.profile_fc2 = nn.Linear(config.hidden, config.num_profiles)
            self.groups = [[i for i, p in enumerate(config.profiles) if p == g] for g in range(config.num_profiles)]

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        noisy = pad_to_multiple(noisy, GateConfig.size_multiple)
        # Centre the input so that the first layer looks at deviations, which carry the noise.
        x = torch.relu(self.conv1(noisy - 0.5))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        pooled = [x.mean(dim=(2, 3)), x.amax(dim=(2, 3))]
        stats = noise_statistics(noisy) if self.config.reads_stats else None
        if self.config.noise_stats:
            pooled.append(stats)
        scores = self.fc2(torch.relu(self.fc1(torch.cat(pooled, dim=1))))
        if not self.config.profiles:
            return scores
        profile = self._profile_head(stats)
        logits = torch.empty_like(scores)
        for group, rows in enumerate(self.groups):
            logits[:, rows] = scores[:, rows].log_softmax(dim=1) + profile[:, group : group + 1]
        return logits

    def profile_log_probs(self, noisy: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` to ``(B, P)``: the profile head's log-probabilities alone, which are what
        :meth:`forward`'s logits give each profile in all, without running the width layers. Needs
        ``config.profiles``."""
        if not self.config.profiles:
            raise ValueError("this gate has no profile head")
        return self._profile_head(noise_statistics(pad_to_multiple(noisy, GateConfig.size_multiple)))

    def _profile_head(self, stats: torch.Tensor) -> torch.Tensor:
        return self.profile_fc2(torch.relu(self.profile_fc1(stats))).log_softmax(dim=1)


NUM_STATS = 10
BLOCK = 8  # JPEG's block side
STATS_PATCH = 16  # statistics are taken over the flattest of these patches, where noise outweighs texture
FLAT_SHARE = 0.3
STEP_FLOOR = 0.5 / 255  # half an 8-bit level: keeps the block grid's ratio finite on flat, quantised patches


def _residual(image: torch.Tensor) -> torch.Tensor:
    """The image minus its 3x3 mean: a high-pass that keeps the noise and little of smooth content."""
    return image - F.avg_pool2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def noise_statistics(noisy: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] to ``(B, 10)`` statistics of its noise, on the luma's flattest patches:

    - the log energy of the luma's high-pass residual (:func:`_residual`), scaled by 1/10;
    - the residual's correlation with itself one and two pixels across and down: white noise has almost
      none (slightly negative, from the 3x3 mean), JPEG-compressed and downscaled noise a lot;
    - the block grid's strength across and down: the log of the mean step between neighbouring pixels at the
      strongest of the 8 column (row) phases over that at the median phase. JPEG's block edges raise one
      phase; the maximum over phases finds the grid wherever it starts (a crop or a second JPEG moves it);
    - the log of the colour residual's energy over the luma's: white noise is independent in R, G and B,
      so most of its energy is colour, while JPEG quantises and subsamples colour away;
    - the log of the residual energy at full resolution over that at half resolution: white noise loses
      most of its energy to a 2x2 mean, correlated noise keeps it;
    - the correlation of the red and green residuals: near zero for white noise, high where JPEG's luma
      noise is all that is left.

    Texture would swamp all of these, so each is a mean over the ``FLAT_SHARE`` of 16x16 patches whose
    residual energy is lowest. Images smaller than a patch give zeros.
    """
    batch = noisy.shape[0]
    height, width = (side - side % STATS_PATCH for side in noisy.shape[-2:])
    if height == 0 or width == 0:
        return noisy.new_zeros(batch, NUM_STATS)
    noisy = noisy[..., :height, :width]
    luma = noisy.mean(dim=1, keepdim=True)
    residual = _residual(luma)
    patch_energy = F.avg_pool2d(residual.square(), STATS_PATCH).flatten(1)  # (B, patches)
    threshold = patch_energy.quantile(FLAT_SHARE, dim=1, keepdim=True)
    flat = (patch_energy <= threshold).float()
    weights = flat / flat.sum(dim=1, keepdim=True)
    mask = F.interpolate(flat.view(batch, 1, height // STATS_PATCH, width // STATS_PATCH), scale_factor=STATS_PATCH)

    def flat_mean(values: torch.Tensor, patch: int = STATS_PATCH) -> torch.Tensor:
        """The mean of a ``(B, 1, h, w)`` map over the flat patches (``h``, ``w`` up to one pixel short, or
        at half resolution with ``patch`` halved)."""
        rows, cols = height * patch // STATS_PATCH, width * patch // STATS_PATCH
        padded = F.pad(values, (0, cols - values.shape[-1], 0, rows - values.shape[-2]))
        return (F.avg_pool2d(padded, patch).flatten(1) * weights).sum(dim=1)

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
        stats.append(((phases.amax(dim=1) + STEP_FLOOR) / (phases.median(dim=1).values + STEP_FLOOR)).log())
    channels = _residual(noisy)
    colour = flat_mean((channels - residual).square().mean(dim=1, keepdim=True)).clamp_min(1e-10)
    stats.append((colour / energy).log())
    half = flat_mean(_residual(F.avg_pool2d(luma, 2)).square(), STATS_PATCH // 2).clamp_min(1e-10)
    stats.append((energy / half).log())
    red, green = channels[:, :1], channels[:, 1:2]
    spread = (flat_mean(red.square()) * flat_mean(green.square())).sqrt().clamp_min(1e-10)
    stats.append(flat_mean(red * green) / spread)
    return torch.stack(stats, dim=1)


def choose(logits: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """Rows of ``(B, K)`` gate ``logits`` picked in two steps: the group (a profile's sub-networks) with the
    most probability in all, then its highest-scored row. With one group this is the argmax.

    Deciding the profile on its total probability keeps it apart from the width: widths split a profile's
    probability between them, which would otherwise let one sharp width of the wrong profile win."""
    if len(groups) == 1:
        return logits.argmax(dim=1)
    totals = torch.stack([logits[:, rows].logsumexp(dim=1) for rows in groups], dim=1)
    picks = []
    for row, group in zip(logits, totals.argmax(dim=1).tolist()):
        rows = groups[group]
        picks.append(rows[int(row[rows].argmax())])
    return torch.tensor(picks, device=logits.device)


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
