"""Peak memory of whole-image inference on a 24-megapixel photo (6000x4000), tiled.

    .venv/bin/python benchmarks/memory.py [--checkpoint PATH] [--quality fast] [--side 6000 4000]

Reports peak resident memory (ru_maxrss) before and after, the time, and the memory the image itself
needs (input and output float32 tensors), and writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import Denoiser, load_checkpoint  # noqa: E402
from model.metrics import add_noise  # noqa: E402
from training.evaluate import load_clean_images, machine  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/ddsnet-color.safetensors")
    parser.add_argument("--quality", default="fast")
    parser.add_argument("--side", type=int, nargs=2, default=[6000, 4000], metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    args = parser.parse_args()
    width, height = args.side
    photo = load_clean_images("skimage")[0][1][0].permute(1, 2, 0).numpy()
    big = Image.fromarray((photo * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    clean = torch.from_numpy(np.asarray(big).copy()).permute(2, 0, 1)[None].float() / 255
    del big
    noisy = add_noise(clean, 25, torch.Generator().manual_seed(0))
    del clean
    denoiser = Denoiser(load_checkpoint(args.checkpoint))
    before = peak_rss_mib()
    started = time.perf_counter()
    result = denoiser.denoise(noisy, args.quality)
    seconds = time.perf_counter() - started
    after = peak_rss_mib()
    image_mib = 2 * noisy.numel() * 4 / 2**20  # the input and the stitched output, float32
    report = {
        "command": shlex.join(["python", *sys.argv]), "machine": machine(), "checkpoint": args.checkpoint,
        "width": width, "height": height, "quality": args.quality, "subnet": result.subnet,
        "tile": denoiser.tile, "margin": denoiser.margin, "seconds": round(seconds, 2),
        "peak_rss_before_mib": round(before, 1), "peak_rss_after_mib": round(after, 1),
        "image_tensors_mib": round(image_mib, 1), "gflops": round(result.flops / 1e9, 1),
    }
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
