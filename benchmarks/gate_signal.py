"""How much per-image signal is there for a gate? Sub-network PSNR drops on photo-sized views.

    .venv/bin/python -m benchmarks.gate_signal [--checkpoint PATH] [--images DIR] [--views 4]

Each photo of ``--images`` (default: the training photos) is area-downscaled to a random 40-65% of its
size, so a 1024-pixel wallpaper becomes a 410-670-pixel photo like the skimage test images, and gets AWGN
at a random sigma in [0, 55], quantised to 8 bits. Every sub-network denoises the whole view. Reported:

- each sub-network's PSNR drop below the widest, overall and per sigma band;
- how well a least-squares model on sigma and the clean view's gradient energy (what a gate could at
  best estimate from the noisy input) predicts those drops, leave-one-photo-out;
- the PSNR-FLOPs points of the oracle label rule (smallest within delta of the widest), of routing on
  the model's predicted drops, and of the checkpoint's own gate.

Writes ``benchmarks/results/gate_signal.json``. Never run on test images: it reads training photos.
"""

from __future__ import annotations

import json
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.common import argument_parser, command_line, write_report
from model import DEFAULT_CHECKPOINT, load_checkpoint
from model.metrics import add_noise, psnr
from model.tiling import denoise_whole
from training.data import PatchSampler, list_images, load_rgb
from training.gate import smallest_within
from training.provenance import machine

SIGMA_BANDS = [(0, 10), (10, 20), (20, 30), (30, 40), (40, 55)]
DELTAS = [0.02, 0.05, 0.08, 0.1, 0.15, 0.2]


def features(sigmas: np.ndarray, textures: np.ndarray) -> np.ndarray:
    s, t = sigmas / 55, textures * 10
    return np.stack([np.ones_like(s), s, s**2, t, t**2, s * t], axis=1)


def leave_one_photo_out(x: np.ndarray, y: np.ndarray, photos: np.ndarray) -> np.ndarray:
    """Predictions of ``y`` from ``x`` by least squares fitted without the row's own photo."""
    predicted = np.zeros_like(y)
    for photo in np.unique(photos):
        held = photos == photo
        weights, *_ = np.linalg.lstsq(x[~held], y[~held], rcond=None)
        predicted[held] = x[held] @ weights
    return predicted


def point(drops: np.ndarray, picks: np.ndarray, relative: np.ndarray) -> dict:
    rows = np.arange(len(picks))
    return {"drop_db": round(float(drops[rows, picks].mean()), 4),
            "flops_fraction": round(float(relative[picks].mean()), 4),
            "histogram": np.bincount(picks, minlength=drops.shape[1]).tolist()}


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--images", default="../shared/data/photos/train")
    parser.add_argument("--views", type=int, default=4, help="views per photo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/gate_signal.json")
    args = parser.parse_args()
    if args.views < 1:
        parser.error("--views must be >= 1")

    checkpoint = load_checkpoint(args.checkpoint)
    net, gate, subnets = checkpoint.net, checkpoint.gate, checkpoint.subnets
    mflops = np.array([s.mflops_per_pixel for s in subnets])
    relative = mflops / mflops.max()
    widest = int(mflops.argmax())
    rng, generator = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    photos, sigmas, textures, table, gate_picks = [], [], [], [], []
    started = time.time()
    paths = list_images(args.images)
    with torch.inference_mode():
        for path in tqdm(paths, desc="views"):
            image = load_rgb(path).float()[None]
            for _ in range(args.views):
                scale, sigma = rng.uniform(0.4, 0.65), rng.uniform(0, 55)
                size = (round(image.shape[-2] * scale), round(image.shape[-1] * scale))
                clean = F.interpolate(image, size=size, mode="bilinear", antialias=True).round().clamp(0, 255) / 255
                noisy = add_noise(clean, sigma, generator, quantize=True)
                table.append([psnr(denoise_whole(net, noisy, s.widths).clamp(0, 1), clean).item() for s in subnets])
                gate_picks.append(int(gate(noisy).argmax()))
                photos.append(path.name)
                sigmas.append(sigma)
                textures.append(PatchSampler.texture(clean[0]))
    table_np = np.array(table)
    drops = table_np[:, widest : widest + 1] - table_np
    sigmas_np, photos_np = np.array(sigmas), np.array(photos)
    predicted = leave_one_photo_out(features(sigmas_np, np.array(textures)), drops, photos_np)

    bands = {}
    for low, high in SIGMA_BANDS:
        mask = (sigmas_np >= low) & (sigmas_np < high)
        if mask.any():
            bands[f"{low}-{high}"] = {"views": int(mask.sum()),
                                      "mean_drop_db": drops[mask].mean(axis=0).round(4).tolist(),
                                      "std_drop_db": drops[mask].std(axis=0).round(4).tolist()}
    predictability = []
    for k in range(len(subnets)):
        if k == widest:
            predictability.append(None)
            continue
        corr = np.corrcoef(predicted[:, k], drops[:, k])[0, 1]
        predictability.append({"correlation": round(float(corr), 3),
                               "residual_std_db": round(float((predicted[:, k] - drops[:, k]).std()), 4),
                               "std_db": round(float(drops[:, k].std()), 4)})
    def label_rule(losses: np.ndarray, delta: float) -> np.ndarray:
        """Stage 3's label rule on PSNR losses below the widest (the widest's own loss is 0)."""
        return smallest_within(torch.from_numpy(-losses), torch.from_numpy(mflops), delta).numpy()

    routing = {f"{delta:g}": {"oracle": point(drops, label_rule(drops, delta), relative),
                              "predicted": point(drops, label_rule(predicted, delta), relative)}
               for delta in DELTAS}

    result = {
        "command": command_line(),
        "checkpoint": args.checkpoint,
        "images": args.images,
        "views": len(table),
        "seed": args.seed,
        "machine": machine(),
        "seconds": round(time.time() - started, 1),
        "subnets_mflops_per_pixel": mflops.round(6).tolist(),
        "mean_drop_db": drops.mean(axis=0).round(4).tolist(),
        "drop_by_sigma": bands,
        "drop_predictability_leave_one_photo_out": predictability,
        "routing_by_delta": routing,
        "constant": [point(drops, np.full(len(drops), k), relative) for k in range(len(subnets))],
        "shipped_gate": point(drops, np.array(gate_picks), relative),
    }
    print(json.dumps({key: result[key] for key in ("mean_drop_db", "drop_predictability_leave_one_photo_out",
                                                   "shipped_gate")}, indent=1))
    write_report(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
