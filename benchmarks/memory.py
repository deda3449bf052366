"""Peak memory of whole-image inference on a 24-megapixel photo (6000x4000), tiled.

    .venv/bin/python -m benchmarks.memory [--checkpoint PATH] [--quality fast] [--side 6000 4000] [--tile PIXELS]
        [--allocator keep|system]

Reports peak resident memory (ru_maxrss) before and after, the time, and the memory the image itself
needs (input and output float32 tensors), and writes ``benchmarks/results/memory.json``. The process runs
under the allocator setting ``ddsnet`` runs under (``model.allocator``; default ``keep``).
"""

from __future__ import annotations

import json
import resource
import time

import numpy as np
import torch
from PIL import Image

from benchmarks.common import argument_parser, command_line, write_report
from model import DEFAULT_CHECKPOINT, Denoiser, Quality, load_checkpoint
from model.allocator import ALLOCATOR_MODES, tune_allocator
from model.metrics import add_noise
from model.tiling import DEFAULT_TILE
from training.evaluate import load_clean_images
from training.provenance import machine


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--quality", default="fast")
    parser.add_argument("--side", type=int, nargs=2, default=[6000, 4000], metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE, help="tile core side in pixels (multiple of 8)")
    parser.add_argument("--allocator", default="keep", choices=ALLOCATOR_MODES)
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    args = parser.parse_args()
    tune_allocator(args.allocator)
    width, height = args.side
    photo = load_clean_images("skimage")[0][1][0].permute(1, 2, 0).numpy()
    big = Image.fromarray((photo * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    clean = torch.from_numpy(np.asarray(big).copy()).permute(2, 0, 1)[None].float() / 255
    del big
    noisy = add_noise(clean, 25, torch.Generator().manual_seed(0))
    del clean
    denoiser = Denoiser(load_checkpoint(args.checkpoint), tile=args.tile)
    before = peak_rss_mib()
    started = time.perf_counter()
    result = denoiser.denoise(noisy, Quality(args.quality))
    seconds = time.perf_counter() - started
    after = peak_rss_mib()
    image_mib = 2 * noisy.numel() * 4 / 2**20  # the input and the stitched output, float32
    report = {
        "command": command_line(), "machine": machine(), "checkpoint": args.checkpoint,
        "allocator": args.allocator, "width": width, "height": height, "quality": args.quality, "subnet": result.subnet,
        "tile": denoiser.tile, "margin": denoiser.margin, "seconds": round(seconds, 2),
        "peak_rss_before_mib": round(before, 1), "peak_rss_after_mib": round(after, 1),
        "image_tensors_mib": round(image_mib, 1), "gflops": round(result.flops / 1e9, 1),
    }
    print(json.dumps(report, indent=2))
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
