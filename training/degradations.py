"""The noise that photos people send carry: one degradation pipeline for training, validation and evaluation.

Five kinds, each applied to clean ``(B, 3, H, W)`` images in [0, 1] and ending in 8-bit quantisation:

- ``awgn``: additive white Gaussian noise, σ uniform in the data's ``[sigma_min, sigma_max]`` (0-255 scale).
- ``poisson_gaussian``: shot noise of a sensor that counts ``photons`` at white, plus Gaussian read noise
  of σ in ``read_sigma``; the noise grows with brightness.
- ``variant``: AWGN whose σ ramps linearly across the image, in a random direction, between two values
  drawn from ``variant_sigma``.
- ``jpeg``: AWGN of σ in ``jpeg_sigma``, then JPEG compression at a quality in ``jpeg_quality``, as a phone
  or an upload form would store it. The noise comes out spatially correlated and blocky.
- ``poisson_jpeg``: ``poisson_gaussian``'s sensor noise, then JPEG as ``jpeg``: a phone's own photo.
- For both JPEG kinds, ``jpeg_double`` of the draws are compressed a second time, at a second quality from
  ``jpeg_quality``, on a block grid shifted by 1-7 pixels each way: a photo cropped and saved again.
- A JPEG quality is drawn uniformly in ``jpeg_quality`` (``jpeg_quality_draw: uniform``), or with its quantiser
  step log-uniform (``step``): libjpeg scales its tables by 5000/q below quality 50 and by 200 - 2q above, so
  ``step`` draws each doubling of the step equally often, and puts more draws where the step is small and the
  artefacts are faint (q 90-98) than a uniform quality does.
- ``downscale``: AWGN of σ in ``downscale_sigma`` on the image at ``1 / factor`` of its size, then an area
  downscale by ``factor`` (in ``downscale_factor``), as when a noisy photo is resized before it is sent.
  Downscaling is linear, so this equals adding the downscaled noise field to the clean image.

``mix`` weighs the kinds; the default, AWGN alone, draws exactly the noise that :func:`blind_noisy` draws.
Without quantisation (``quantize: false``) only AWGN is allowed: every other kind models an 8-bit file.
:data:`EVAL_DEGRADATIONS` are fixed settings of each kind for validation and evaluation.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.metrics import add_noise

KINDS = ("awgn", "poisson_gaussian", "variant", "jpeg", "downscale", "poisson_jpeg")
JPEG_QUALITY_DRAWS = ("uniform", "step")
JPEG_BLOCK = 8  # the side of a JPEG block: a shifted grid moves by less than this


@dataclass
class DegradationConfig:
    """Which degradations training draws, how often, and over which ranges (σ on the 0-255 scale)."""

    mix: dict[str, float] = field(default_factory=lambda: {"awgn": 1.0})
    photons: list[float] = field(default_factory=lambda: [20.0, 400.0])
    read_sigma: list[float] = field(default_factory=lambda: [0.0, 10.0])
    variant_sigma: list[float] = field(default_factory=lambda: [0.0, 55.0])
    jpeg_sigma: list[float] = field(default_factory=lambda: [3.0, 30.0])
    jpeg_quality: list[int] = field(default_factory=lambda: [60, 95])
    downscale_sigma: list[float] = field(default_factory=lambda: [5.0, 55.0])
    downscale_factor: list[float] = field(default_factory=lambda: [0.5, 0.9])
    # The share of JPEG draws (``jpeg``, ``poisson_jpeg``) compressed twice, the second time on a shifted grid.
    jpeg_double: float = 0.0
    # How a JPEG quality is drawn from ``jpeg_quality``: ``uniform``, or ``step`` (its quantiser step log-uniform).
    jpeg_quality_draw: str = "uniform"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.mix) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown degradation(s) {', '.join(unknown)}; the kinds are {', '.join(KINDS)}")
        if not self.mix or any(not (isinstance(w, int | float) and w >= 0) for w in self.mix.values()) \
                or sum(self.mix.values()) <= 0:
            raise ValueError(f"mix needs non-negative weights with a positive sum, got {self.mix}")
        for name in ("photons", "read_sigma", "variant_sigma", "jpeg_sigma", "jpeg_quality",
                     "downscale_sigma", "downscale_factor"):
            low, high = _range(self, name)
            if low < 0 or low > high:
                raise ValueError(f"{name} must be [low, high] with 0 <= low <= high, got {getattr(self, name)}")
        if not 0 <= self.jpeg_double <= 1:
            raise ValueError(f"jpeg_double must be a share in [0, 1], got {self.jpeg_double}")
        if self.jpeg_quality_draw not in JPEG_QUALITY_DRAWS:
            raise ValueError(f"jpeg_quality_draw must be one of {', '.join(JPEG_QUALITY_DRAWS)}, "
                             f"got {self.jpeg_quality_draw!r}")
        if _range(self, "photons")[0] <= 0:
            raise ValueError("photons must be positive")
        if not 1 <= _range(self, "jpeg_quality")[0] <= _range(self, "jpeg_quality")[1] <= 100:
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")
        if not 0 < _range(self, "downscale_factor")[0] <= _range(self, "downscale_factor")[1] <= 1:
            raise ValueError(f"downscale_factor must lie in (0, 1], got {self.downscale_factor}")

    @property
    def awgn_only(self) -> bool:
        return all(weight == 0 for kind, weight in self.mix.items() if kind != "awgn")


def _range(config: DegradationConfig, name: str) -> tuple[float, float]:
    value = getattr(config, name)
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError(f"{name} must be a [low, high] pair, got {value!r}")
    return float(value[0]), float(value[1])


def quantiser_scale(quality: float) -> float:
    """libjpeg's scale of its quantisation tables, in percent, at ``quality`` (1-100); at least 1, so that a
    step is never zero."""
    quality = min(max(quality, 1.0), 100.0)
    return 5000.0 / quality if quality < 50 else max(200.0 - 2.0 * quality, 1.0)


def quality_of_scale(scale: float) -> float:
    """The inverse of :func:`quantiser_scale`."""
    return 5000.0 / scale if scale > 100 else (200.0 - scale) / 2.0


def quantize(image: torch.Tensor) -> torch.Tensor:
    """Round and clip to 8 bits, as an image file stores it."""
    return (image * 255).round().clamp(0, 255) / 255


def awgn(clean: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``clean`` plus Gaussian noise of σ ``sigma`` (0-255 scale, a number or a broadcastable tensor)."""
    noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype)
    return clean + noise * (torch.as_tensor(sigma, dtype=clean.dtype) / 255.0)


def poisson_gaussian(clean: torch.Tensor, photons: float, read_sigma: float,
                     generator: torch.Generator) -> torch.Tensor:
    """Shot noise of a sensor counting ``photons`` at white, plus read noise of σ ``read_sigma`` (0-255)."""
    counts = torch.poisson(clean.clamp_min(0) * photons, generator=generator)
    return awgn(counts / photons, read_sigma, generator)


def ramp(height: int, width: int, low: float, high: float, angle: float) -> torch.Tensor:
    """``(1, H, W)`` σ map rising linearly from ``low`` to ``high`` across the image along ``angle`` (rad)."""
    ys = torch.linspace(-1, 1, height)[:, None]
    xs = torch.linspace(-1, 1, width)[None, :]
    along = xs * math.cos(angle) + ys * math.sin(angle)
    along = (along - along.min()) / (along.max() - along.min()).clamp_min(1e-12)
    return (low + (high - low) * along)[None]


def jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """``(3, H, W)`` in [0, 1] through an 8-bit JPEG at ``quality`` (Pillow's default 4:2:0 chroma)."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return torch.from_numpy(np.asarray(decoded.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def double_jpeg(image: torch.Tensor, first: int, second: int, shift: tuple[int, int]) -> torch.Tensor:
    """``(3, H, W)`` through JPEG at quality ``first``, then the part below and right of ``shift`` = ``(dy, dx)``
    through JPEG again at ``second``, so that its second block grid is offset from the first."""
    once = jpeg(image, first)
    dy, dx = shift
    twice = once.clone()
    twice[:, dy:, dx:] = jpeg(once[:, dy:, dx:], second)
    return twice


def _compress(image: torch.Tensor, params: dict) -> torch.Tensor:
    """An 8-bit image through the JPEG of ``params``: ``quality``, and for a double JPEG ``requality`` and
    ``shift``."""
    if "requality" in params:
        return double_jpeg(image, params["quality"], params["requality"], tuple(params["shift"]))
    return jpeg(image, params["quality"])


def downscaled_noise(clean: torch.Tensor, sigma: float, factor: float, generator: torch.Generator) -> torch.Tensor:
    """``clean`` (an already downscaled image) plus AWGN of σ ``sigma`` drawn at ``1 / factor`` of its size
    and area-downscaled with it."""
    height, width = clean.shape[-2:]
    big = (max(height, round(height / factor)), max(width, round(width / factor)))
    noise = torch.randn((*clean.shape[:-2], *big), generator=generator, dtype=clean.dtype) * (sigma / 255.0)
    small = F.interpolate(noise.reshape(-1, 1, *big), size=(height, width), mode="area").reshape(clean.shape)
    return clean + small


def apply(kind: str, clean: torch.Tensor, params: dict, generator: torch.Generator) -> torch.Tensor:
    """One image ``(3, H, W)`` through one degradation with fixed ``params``; quantised to 8 bits.

    ``params`` per kind: awgn ``sigma``; poisson_gaussian ``photons``, ``read_sigma``; variant ``low``,
    ``high``, ``angle``; jpeg ``sigma``, ``quality``; downscale ``sigma``, ``factor``; poisson_jpeg
    ``photons``, ``read_sigma``, ``quality``. A double JPEG adds ``requality`` and ``shift`` ``[dy, dx]``.
    """
    if kind == "awgn":
        return quantize(awgn(clean, params["sigma"], generator))
    if kind == "poisson_gaussian":
        return quantize(poisson_gaussian(clean, params["photons"], params["read_sigma"], generator))
    if kind == "variant":
        sigma = ramp(*clean.shape[-2:], params["low"], params["high"], params["angle"])
        return quantize(awgn(clean, sigma, generator))
    if kind == "jpeg":
        return _compress(quantize(awgn(clean, params["sigma"], generator)), params)
    if kind == "poisson_jpeg":
        return _compress(quantize(poisson_gaussian(clean, params["photons"], params["read_sigma"], generator)), params)
    if kind == "downscale":
        return quantize(downscaled_noise(clean, params["sigma"], params["factor"], generator))
    raise ValueError(f"unknown degradation {kind!r}; the kinds are {', '.join(KINDS)}")


def draw(config: DegradationConfig, sigma: tuple[float, float], rng: random.Random) -> tuple[str, dict]:
    """A random degradation: its kind (by ``mix``) and its parameters (uniform in the configured ranges;
    ``sigma`` is AWGN's)."""
    kinds = [kind for kind in KINDS if config.mix.get(kind, 0) > 0]
    kind = rng.choices(kinds, weights=[config.mix[kind] for kind in kinds])[0]

    def uniform(name: str) -> float:
        return rng.uniform(*_range(config, name))

    def quality() -> int:
        low, high = _range(config, "jpeg_quality")
        if config.jpeg_quality_draw == "uniform":
            return rng.randint(int(low), int(high))
        small, large = math.log(quantiser_scale(high)), math.log(quantiser_scale(low))
        drawn = quality_of_scale(math.exp(rng.uniform(small, large)))
        return min(max(round(drawn), int(low)), int(high))

    def photons() -> float:  # photon counts spread over orders of magnitude: drawn log-uniformly
        low, high = _range(config, "photons")
        return math.exp(rng.uniform(math.log(low), math.log(high)))

    if kind == "awgn":
        return kind, {"sigma": rng.uniform(*sigma)}
    if kind == "poisson_gaussian":
        return kind, {"photons": photons(), "read_sigma": uniform("read_sigma")}
    if kind == "variant":
        return kind, {"low": uniform("variant_sigma"), "high": uniform("variant_sigma"),
                      "angle": rng.uniform(0, 2 * math.pi)}
    if kind == "downscale":
        return kind, {"sigma": uniform("downscale_sigma"), "factor": uniform("downscale_factor")}
    if kind == "jpeg":
        params = {"sigma": uniform("jpeg_sigma"), "quality": quality()}
    else:
        params = {"photons": photons(), "read_sigma": uniform("read_sigma"), "quality": quality()}
    # Drawn only when asked for, so that a mix without double JPEG draws what it always drew.
    if config.jpeg_double > 0 and rng.random() < config.jpeg_double:
        params |= {"requality": quality(), "shift": [rng.randint(1, JPEG_BLOCK - 1), rng.randint(1, JPEG_BLOCK - 1)]}
    return kind, params


def degrade(clean: torch.Tensor, config: DegradationConfig, sigma: tuple[float, float], quantize_8bit: bool,
            generator: torch.Generator, rng: random.Random) -> torch.Tensor:
    """A training batch's noisy inputs: each image of ``(B, 3, H, W)`` through a degradation drawn by ``rng``.

    Args:
        clean: ``(B, 3, H, W)`` in [0, 1].
        config: the mix and the ranges of the kinds other than AWGN.
        sigma: AWGN's σ range ``(low, high)``, 0-255 scale.
        quantize_8bit: round and clip to 8 bits (required by every kind but AWGN).
        generator: the noise's random numbers.
        rng: which kind, and its parameters.

    With AWGN alone (the default ``mix``), this is :func:`blind_noisy` exactly: the same draws from
    ``generator``, and ``rng`` untouched.
    """
    if config.awgn_only:
        return blind_noisy(clean, sigma[0], sigma[1], quantize_8bit, generator)[0]
    if not quantize_8bit:
        raise ValueError("degradations other than awgn make 8-bit images; set quantize: true")
    noisy = []
    for image in clean:
        kind, params = draw(config, sigma, rng)
        noisy.append(apply(kind, image, params, generator))
    return torch.stack(noisy)


def blind_noisy(clean: torch.Tensor, sigma_min: float, sigma_max: float, quantize_8bit: bool,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image σ drawn uniformly from ``[sigma_min, sigma_max]``; returns ``(noisy, sigmas)``."""
    sigmas = torch.empty(clean.shape[0], 1, 1, 1).uniform_(sigma_min, sigma_max, generator=generator)
    return add_noise(clean, sigmas, generator, quantize_8bit), sigmas.flatten()


# The AWGN levels (0-255 scale) that validation, the tables and the benchmarks measure.
EVAL_SIGMAS = (15.0, 25.0, 50.0)

# Fixed settings of each kind for validation and evaluation: name -> (kind, params).
EVAL_DEGRADATIONS: dict[str, tuple[str, dict]] = {
    "awgn15": ("awgn", {"sigma": 15.0}),
    "awgn25": ("awgn", {"sigma": 25.0}),
    "awgn50": ("awgn", {"sigma": 50.0}),
    "poisson40": ("poisson_gaussian", {"photons": 40.0, "read_sigma": 2.0}),
    "ramp5-40": ("variant", {"low": 5.0, "high": 40.0, "angle": 0.0}),
    "jpeg80-awgn15": ("jpeg", {"sigma": 15.0, "quality": 80}),
    "jpeg30-awgn10": ("jpeg", {"sigma": 10.0, "quality": 30}),
    "jpeg60-awgn10": ("jpeg", {"sigma": 10.0, "quality": 60}),
    "jpeg95-awgn10": ("jpeg", {"sigma": 10.0, "quality": 95}),
    "jpeg90x75-awgn10": ("jpeg", {"sigma": 10.0, "quality": 90, "requality": 75, "shift": [3, 5]}),
    "poisson40-jpeg80": ("poisson_jpeg", {"photons": 40.0, "read_sigma": 2.0, "quality": 80}),
    "down0.7-awgn30": ("downscale", {"sigma": 30.0, "factor": 0.7}),
}


# The named evaluation degradations other than AWGN, which ``--sigma`` covers.
NON_AWGN = tuple(name for name, (kind, _) in EVAL_DEGRADATIONS.items() if kind != "awgn")


def eval_degradation(name: str) -> tuple[str, dict]:
    """The kind and parameters of a named evaluation degradation; a plain number means AWGN at that σ."""
    if name in EVAL_DEGRADATIONS:
        return EVAL_DEGRADATIONS[name]
    try:
        return "awgn", {"sigma": float(name)}
    except ValueError:
        raise ValueError(f"unknown degradation {name!r}; the named ones are {', '.join(EVAL_DEGRADATIONS)}, "
                         "or give a number for AWGN at that sigma") from None


def noise_rms(noisy: torch.Tensor, clean: torch.Tensor) -> float:
    """The RMS of ``noisy - clean`` on the 0-255 scale: the σ a non-blind denoiser is given."""
    return float(((noisy.float() - clean.float()) ** 2).mean().sqrt() * 255)
