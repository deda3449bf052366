"""Serving benchmark: the raw model loop (no HTTP) vs the HTTP service at concurrency 1, 4 and 16, with
batching on and off, on mixed image sizes (256x256 to 2 MP).

    .venv/bin/python -m benchmarks.serve [--checkpoint PATH] [--requests 20] [--quality auto] [--tile PIXELS]

Each service configuration runs in its own ``python -m service.cli serve`` process on 127.0.0.1, with the
same tile size as the raw loop. Reports throughput in megapixels per second and p50/p95/p99 latency, checks
HTTP throughput at the highest concurrency against ``benchmarks.targets.SERVE_MIN_FRACTION_OF_RAW`` (met or
missed), and writes ``benchmarks/results/serve.json``.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import torch
from PIL import Image

from benchmarks import targets
from benchmarks.common import argument_parser, command_line, running_server, write_report
from model import DEFAULT_CHECKPOINT, Denoiser, load_checkpoint
from model.metrics import add_noise
from model.tiling import DEFAULT_TILE
from training.evaluate import load_clean_images, machine

SIZES = [(256, 256), (640, 480), (1024, 768), (1280, 960), (1632, 1224)]  # up to 2.0 MP


def workload(count: int, seed: int) -> list[tuple[bytes, torch.Tensor]]:
    """``count`` noisy PNGs (sigma 25) cycling through SIZES, cut from the skimage photos."""
    photos = [image for _, image in load_clean_images("skimage")]
    generator = torch.Generator().manual_seed(seed)
    items = []
    for index in range(count):
        width, height = SIZES[index % len(SIZES)]
        source = photos[index % len(photos)][0].permute(1, 2, 0).numpy()
        resized = Image.fromarray((source * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
        clean = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)[None].float() / 255
        noisy = add_noise(clean, 25, generator)
        buffer = io.BytesIO()
        Image.fromarray((noisy[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buffer, "PNG")
        items.append((buffer.getvalue(), noisy))
    return items


def percentiles(latencies: list[float]) -> dict:
    return {f"p{q}": round(float(np.percentile(latencies, q)), 3) for q in (50, 95, 99)}


def raw_loop(checkpoint: str, items, quality: str, tile: int = DEFAULT_TILE) -> dict:
    """Denoise ``items`` one after another in this process: throughput and latency percentiles."""
    denoiser = Denoiser(load_checkpoint(checkpoint), tile=tile)
    denoiser.denoise(items[0][1][..., :64, :64], quality)  # warm-up
    latencies, pixels = [], 0
    started = time.perf_counter()
    for _, noisy in items:
        begin = time.perf_counter()
        denoiser.denoise(noisy, quality)
        latencies.append(time.perf_counter() - begin)
        pixels += noisy.shape[-1] * noisy.shape[-2]
    wall = time.perf_counter() - started
    return {"mpix_per_s": round(pixels / wall / 1e6, 4), "seconds": round(wall, 2), **percentiles(latencies)}


def http_run(checkpoint: str, items, quality: str, concurrency: int, batch_tiles: int,
             tile: int = DEFAULT_TILE) -> dict:
    """Send ``items`` to a fresh server from ``concurrency`` clients at once: throughput and latency percentiles."""
    env = {"DDSNET_MAX_BATCH_TILES": str(batch_tiles), "DDSNET_MAX_WAIT_MS": "5", "DDSNET_TILE": str(tile),
           "DDSNET_MAX_QUEUE_TILES": "4096", "DDSNET_REQUEST_TIMEOUT_S": "1200"}
    with running_server(checkpoint, env) as base, httpx.Client(timeout=1200) as client:

        def send(item) -> tuple[float, int]:
            begin = time.perf_counter()
            response = client.post(f"{base}/denoise", params={"quality": quality},
                                   files={"file": ("x.png", item[0], "image/png")})
            response.raise_for_status()
            return time.perf_counter() - begin, item[1].shape[-1] * item[1].shape[-2]

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(send, items))
        wall = time.perf_counter() - started
    pixels = sum(p for _, p in results)
    return {"mpix_per_s": round(pixels / wall / 1e6, 4), "seconds": round(wall, 2),
            **percentiles([latency for latency, _ in results])}


def check_target(report: dict) -> dict:
    """HTTP throughput at the highest concurrency run (the better batching setting) vs the raw loop's.

    Args:
        report: with ``raw_loop`` (``mpix_per_s``) and ``http`` rows (``concurrency``, ``mpix_per_s``).

    Returns:
        ``name``, ``value`` (the fraction of the raw loop's throughput), ``bar`` and ``met``.
    """
    saturation = max(row["concurrency"] for row in report["http"])
    fastest = max(row["mpix_per_s"] for row in report["http"] if row["concurrency"] == saturation)
    fraction = fastest / report["raw_loop"]["mpix_per_s"]
    bar = targets.SERVE_MIN_FRACTION_OF_RAW
    return {"name": f"HTTP at concurrency {saturation} >= {100 * bar:g}% of the raw loop",
            "value": round(fraction, 3), "bar": bar, "met": fraction >= bar}


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--quality", default="auto")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE, help="tile core side, raw loop and server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/serve.json")
    args = parser.parse_args()
    print(f"command: {command_line()}")
    print(f"machine: {machine()}")
    items = workload(args.requests, args.seed)
    megapixels = sum(n.shape[-1] * n.shape[-2] for _, n in items) / 1e6
    report = {"command": command_line(), "machine": machine(), "checkpoint": args.checkpoint,
              "quality": args.quality, "tile": args.tile, "requests": args.requests,
              "megapixels": round(megapixels, 3), "sizes": SIZES, "seed": args.seed}
    report["raw_loop"] = raw_loop(args.checkpoint, items, args.quality, args.tile)
    print("raw loop:", report["raw_loop"])
    report["http"] = []
    for batch_tiles in (4, 1):
        for concurrency in args.concurrency:
            row = {"batching": batch_tiles > 1, "max_batch_tiles": batch_tiles, "concurrency": concurrency,
                   **http_run(args.checkpoint, items, args.quality, concurrency, batch_tiles, args.tile)}
            row["vs_raw"] = round(row["mpix_per_s"] / report["raw_loop"]["mpix_per_s"], 3)
            print(row)
            report["http"].append(row)
    report["target"] = check_target(report)
    target = report["target"]
    print(f"target {target['name']}: {target['value']} vs bar {target['bar']}: "
          f"{'met' if target['met'] else 'missed'}")
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
