"""Image quality measures."""

from __future__ import annotations

import torch


def psnr(denoised: torch.Tensor, clean: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image.

    Args:
        denoised, clean: ``(B, C, H, W)`` (or ``(C, H, W)``) in ``[0, data_range]``; ``denoised`` is clamped.

    Returns:
        ``(B,)`` PSNR values (a scalar for unbatched input).
    """
    denoised = denoised.clamp(0, data_range)
    squared_error = (denoised.float() - clean.float()) ** 2
    mse = squared_error.flatten(start_dim=-3).mean(dim=-1).clamp_min(1e-12)
    return 10 * torch.log10(data_range**2 / mse)


def add_noise(clean: torch.Tensor, sigma: float, generator: torch.Generator | None = None, quantize: bool = True):
    """AWGN with standard deviation ``sigma`` on the 0-255 scale, optionally quantised and clipped to 8 bits.

    Quantising matches what users upload: 8-bit files.
    """
    noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype, device="cpu").to(clean.device)
    noisy = clean + noise * (sigma / 255.0)
    if quantize:
        noisy = (noisy * 255).round().clamp(0, 255) / 255
    return noisy
