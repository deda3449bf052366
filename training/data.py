"""Training and validation data: any folder of clean images, training noise, fixed-seed validation noise."""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from model.metrics import add_noise
from training.deadleaves import DeadLeavesShape, dead_leaves, photo_palette
from training.degradations import apply, degrade, eval_degradation

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return paths


def load_rgb(path: Path) -> torch.Tensor:
    """``(3, H, W)`` uint8, EXIF orientation applied."""
    with Image.open(path) as image:
        rgb = ImageOps.exif_transpose(image).convert("RGB")
        return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


class PatchSampler:
    """Random crops with flips and 90-degree rotations from images held in memory as uint8.

    Args:
        folder: clean training images.
        seed: seeds the crop positions, scales and augmentations.
        scale_range: each crop is taken at a random scale in this range (``0.5`` means a region twice the
            crop's side, area-downsampled), so one photo yields both its own detail and denser texture.
        texture_candidates: draw this many candidate crops and keep the one with the most gradient energy.
            Wallpaper-like photos are mostly smooth; ``> 1`` shifts training towards the texture and edges
            that a denoiser must keep, where ``1`` samples crops uniformly.
        dead_leaves: the fraction of crops that are synthetic dead-leaves images (:mod:`training.deadleaves`)
            instead of photo crops, their colours drawn from the photos' pixels. At 0 the sampler draws
            exactly what it drew before the option existed.
    """

    PALETTE_SIZE = 8192

    def __init__(self, folder: str | Path, seed: int = 0, scale_range: tuple[float, float] = (1.0, 1.0),
                 texture_candidates: int = 1, dead_leaves: float = 0.0) -> None:
        low, high = float(scale_range[0]), float(scale_range[1])
        if not 0 < low <= high <= 1:
            raise ValueError(f"scale_range must satisfy 0 < low <= high <= 1, got {scale_range}")
        if texture_candidates < 1:
            raise ValueError(f"texture_candidates must be >= 1, got {texture_candidates}")
        if not 0 <= dead_leaves <= 1:
            raise ValueError(f"dead_leaves must be a fraction in [0, 1], got {dead_leaves}")
        self.images = [load_rgb(p) for p in list_images(folder)]
        self.rng = random.Random(seed)
        self.scale_range = (low, high)
        self.texture_candidates = int(texture_candidates)
        self.dead_leaves = float(dead_leaves)
        self.palette = photo_palette(self.images, self.PALETTE_SIZE, seed) if self.dead_leaves else None

    @classmethod
    def for_data(cls, data, seed: int = 0) -> PatchSampler:
        """The sampler of a ``DataConfig``'s training photos and crop settings."""
        return cls(data.train_dir, seed=seed, scale_range=data.scale_range,
                   texture_candidates=data.texture_candidates, dead_leaves=data.dead_leaves)

    def _crop(self, crop: int) -> torch.Tensor:
        image = self.rng.choice(self.images)
        height, width = image.shape[-2:]
        scale = self.rng.uniform(*self.scale_range)
        side = min(round(crop / scale), height, width)
        y, x = self.rng.randint(0, height - side), self.rng.randint(0, width - side)
        patch = image[:, y : y + side, x : x + side]
        if side != crop:
            patch = torch.nn.functional.interpolate(
                patch[None].float(), size=(crop, crop), mode="bilinear", antialias=side > crop
            )[0].round().clamp(0, 255)
        return patch.float() / 255

    @staticmethod
    def texture(patch: torch.Tensor) -> float:
        """Mean absolute finite difference, a cheap measure of edges and texture."""
        return float((patch[..., 1:, :] - patch[..., :-1, :]).abs().mean()
                     + (patch[..., :, 1:] - patch[..., :, :-1]).abs().mean())

    def sample(self, batch_size: int, crop: int) -> torch.Tensor:
        """``(B, 3, crop, crop)`` float in [0, 1]."""
        patches = []
        for _ in range(batch_size):
            if self.dead_leaves and self.rng.random() < self.dead_leaves:
                patch = dead_leaves(crop, self.palette, self.rng, DeadLeavesShape())
            else:
                candidates = [self._crop(crop) for _ in range(self.texture_candidates)]
                patch = max(candidates, key=self.texture) if len(candidates) > 1 else candidates[0]
            if self.rng.random() < 0.5:
                patch = patch.flip(-1)
            patch = torch.rot90(patch, self.rng.randint(0, 3), dims=(-2, -1))
            patches.append(patch)
        return torch.stack(patches)

    def state(self) -> object:
        return self.rng.getstate()

    def set_state(self, state: object) -> None:
        self.rng.setstate(state)


def noisy_batch(clean: torch.Tensor, data, generator: torch.Generator, rng: random.Random) -> torch.Tensor:
    """A training batch's noisy inputs under ``data`` (a ``DataConfig``): AWGN over ``[sigma_min, sigma_max]``
    and the kinds of ``data.degradations``. ``rng`` picks the kinds (pass the crop sampler's, so that a
    resumed run draws the same); with AWGN alone it is not used."""
    return degrade(clean, data.degradations, (data.sigma_min, data.sigma_max), data.quantize, generator, rng)


def center_crop(image: torch.Tensor, crop: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    side_h, side_w = min(crop, height), min(crop, width)
    y, x = (height - side_h) // 2, (width - side_w) // 2
    return image[..., y : y + side_h, x : x + side_w]


def downscale(image: torch.Tensor, scale: float) -> torch.Tensor:
    """Area-like (antialiased bilinear) downscale of ``(1, 3, H, W)`` in [0, 1], re-quantised to 8 bits."""
    if scale == 1.0:
        return image
    size = [max(1, round(side * scale)) for side in image.shape[-2:]]
    resized = torch.nn.functional.interpolate(image * 255, size=size, mode="bilinear", antialias=True)
    return resized.round().clamp(0, 255) / 255


def fixed_noisy_set(
    folder: str | Path, sigmas: list[float], seed: int, crop: int | None = None, scales: Sequence[float] = (1.0,),
    degradations: Sequence[str] = (),
) -> list[tuple[str, float | str, torch.Tensor, torch.Tensor]]:
    """Validation pairs ``(name, key, clean, noisy)``, each ``(1, 3, H, W)``, with reproducible noise.

    The key is the sigma (a float) for AWGN at each of ``sigmas``, then the name of each of
    ``degradations`` (see ``training.degradations.EVAL_DEGRADATIONS``); :func:`pair_label` makes either a
    label. Each image is used at every one of ``scales`` (``0.5``: downscaled to half its sides, so a
    1024-pixel wallpaper has the texture density of a 512-pixel photo); names other than scale 1's get
    ``@scale``.
    """
    if any(not 0 < scale <= 1 for scale in scales):
        raise ValueError(f"validation scales must lie in (0, 1], got {list(scales)}")
    pairs = []
    for index, path in enumerate(list_images(folder)):
        full = load_rgb(path).float()[None] / 255
        for scale in scales:
            clean = downscale(full, float(scale))
            if crop:
                clean = center_crop(clean, crop)
            name = path.name if scale == 1 else f"{path.name}@{scale:g}"
            pairs += [(name, key, clean, noisy) for key, noisy in fixed_noise(clean, index, seed, sigmas, degradations)]
    return pairs


def validation_pairs(data, crop: int | None = None) -> list[tuple[str, float | str, torch.Tensor, torch.Tensor]]:
    """The validation pairs of ``data`` (a ``DataConfig``): :func:`fixed_noisy_set` of ``val_dir`` at its
    sigmas, seed, view scales and degradations; ``crop`` centre-crops every view (``None``: whole)."""
    return fixed_noisy_set(data.val_dir, data.val_sigmas, data.val_seed, crop, scales=data.val_scales,
                           degradations=data.val_degradations)


def fixed_noise(clean: torch.Tensor, index: int, seed: int, sigmas: Sequence[float],
                degradations: Sequence[str] = ()) -> list[tuple[float | str, torch.Tensor]]:
    """Reproducible noisy versions ``(key, noisy)`` of image number ``index``: AWGN at each of ``sigmas`` (key:
    the sigma), then each named degradation (key: its name). The seeds depend on ``seed``, the index and the
    noise, so every set built from the same images draws the same noise."""
    versions: list[tuple[float | str, torch.Tensor]] = []
    for sigma in sigmas:
        generator = torch.Generator().manual_seed(seed + 1000 * index + int(sigma * 10))
        versions.append((float(sigma), add_noise(clean, sigma, generator, quantize=True)))
    for name in degradations:
        kind, params = eval_degradation(name)
        generator = torch.Generator().manual_seed(seed + 1000 * index + zlib.crc32(name.encode()) % 997)
        versions.append((name, apply(kind, clean[0], params, generator)[None]))
    return versions


def pair_label(key: float | str) -> str:
    """A validation pair's key as a label: ``"25"`` for AWGN at sigma 25, else the degradation's name."""
    return f"{key:g}" if isinstance(key, int | float) else key


def pair_scale(name: str) -> float:
    """The view scale a validation pair's name carries (``photo.png@0.5`` -> 0.5; no suffix -> 1)."""
    head, at, tail = name.rpartition("@")
    try:
        return float(tail) if at else 1.0
    except ValueError:  # an "@" of the file's own name (icon@2x.png), not a view suffix
        return 1.0
