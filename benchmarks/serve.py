"""Serving benchmark: the raw model loop (no HTTP) vs the HTTP service at concurrency 1, 4 and 16, with
batching on and off, on mixed image sizes (256x256 to 2 MP).

    .venv/bin/python benchmarks/serve.py [--checkpoint PATH] [--requests 24] [--quality auto]

Each service configuration runs in its own `ddsnet serve` process on 127.0.0.1. Reports throughput in
megapixels per second and p50/p95/p99 latency; writes ``benchmarks/results/serve.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import Denoiser, load_checkpoint  # noqa: E402
from model.metrics import add_noise  # noqa: E402
from training.evaluate import load_clean_images, machine  # noqa: E402

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


def raw_loop(checkpoint: str, items, quality: str) -> dict:
    denoiser = Denoiser(load_checkpoint(checkpoint))
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(base: str, seconds: float = 120) -> None:
    """Poll ``base``/readyz until it answers 200, or raise ``TimeoutError``."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base} did not become ready in {seconds} s")


def http_run(checkpoint: str, items, quality: str, concurrency: int, batch_tiles: int) -> dict:
    port = free_port()
    env = {**os.environ, "DDSNET_MAX_BATCH_TILES": str(batch_tiles), "DDSNET_MAX_WAIT_MS": "5",
           "DDSNET_MAX_QUEUE_TILES": "4096", "DDSNET_REQUEST_TIMEOUT_S": "1200"}
    server = subprocess.Popen([str(ROOT / ".venv/bin/ddsnet"), "serve", "--port", str(port), "--checkpoint",
                               checkpoint], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base)
        with httpx.Client(timeout=1200) as client:

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
    finally:
        server.terminate()
        server.wait(timeout=30)
    pixels = sum(p for _, p in results)
    return {"mpix_per_s": round(pixels / wall / 1e6, 4), "seconds": round(wall, 2),
            **percentiles([latency for latency, _ in results])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/ddsnet-color.safetensors")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--quality", default="auto")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/serve.json")
    args = parser.parse_args()
    print(f"command: {shlex.join(['python', *sys.argv])}")
    print(f"machine: {machine()}")
    items = workload(args.requests, args.seed)
    megapixels = sum(n.shape[-1] * n.shape[-2] for _, n in items) / 1e6
    report = {"command": shlex.join(["python", *sys.argv]), "machine": machine(), "checkpoint": args.checkpoint,
              "quality": args.quality, "requests": args.requests, "megapixels": round(megapixels, 3),
              "sizes": SIZES, "seed": args.seed}
    report["raw_loop"] = raw_loop(args.checkpoint, items, args.quality)
    print("raw loop:", report["raw_loop"])
    report["http"] = []
    for batch_tiles in (4, 1):
        for concurrency in args.concurrency:
            row = {"batching": batch_tiles > 1, "max_batch_tiles": batch_tiles, "concurrency": concurrency,
                   **http_run(args.checkpoint, items, args.quality, concurrency, batch_tiles)}
            row["vs_raw"] = round(row["mpix_per_s"] / report["raw_loop"]["mpix_per_s"], 3)
            print(row)
            report["http"].append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
