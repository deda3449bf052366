"""Pieces the three stages share: JSON-lines logs, evaluation on fixed validation pairs, the LR schedule."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from model.metrics import psnr
from model.supernet import SlimUNet, WidthConfig
from model.tiling import denoise_whole


class JsonLog:
    """Appends one JSON object per line; every record gets wall-clock ``time``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: object) -> None:
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def cosine_lr(step: int, total: int, peak: float, floor: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


@torch.inference_mode()
def psnr_by_sigma(net: SlimUNet, widths: WidthConfig, pairs: list) -> dict[str, float]:
    """Mean PSNR per sigma (keys are sigma strings, e.g. ``"25"``) of ``net`` at ``widths`` on fixed pairs."""
    sums: dict[str, list[float]] = {}
    for _, sigma, clean, noisy in pairs:
        value = psnr(denoise_whole(net, noisy, widths), clean).item()
        sums.setdefault(f"{sigma:g}", []).append(value)
    return {key: round(sum(values) / len(values), 4) for key, values in sums.items()}
