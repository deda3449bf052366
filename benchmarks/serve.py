"""Serving benchmark: the HTTP service against the same engines in-process, on identical decoded tensors.

    .venv/bin/python -m benchmarks.serve [--checkpoint PATH] [--requests 20] [--quality auto] [--backend auto]

The workload is ``--requests`` noisy PNGs (sigma 25) of mixed sizes, 256x256 to 2 MP, cut from the skimage
photos, so that the larger ones tile. Every image is decoded once by the service's own decoder
(``service.imaging.decode_image``), so the in-process runs see exactly the tensors, in exactly the memory
layout, that the server decodes.

* **In-process**, with the engines ``--backend`` picks, one image after another: ``model`` runs
  ``Denoiser.denoise`` on the decoded tensors; ``cli_path`` also decodes each PNG and encodes the answer, as
  ``ddsnet denoise`` does.
* **HTTP**: one ``ddsnet serve`` process on 127.0.0.1 with the same backend and the latency controller off
  (under load it would run ``auto`` slimmer), sent the PNGs by 1, 4 and 16 clients at once. Its time to
  ``/readyz`` 200 from the process start is measured too.

Reports MPix/s and p50/p95/p99 latency per run. HTTP at concurrency 1 is held to the CLI's path (both decode and
encode), HTTP at the highest concurrency to the model alone. Checks the ``SERVE_*`` targets of :mod:`benchmarks.targets`
(met or missed) and writes ``benchmarks/results/serve.json``.
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
from benchmarks.common import argument_parser, command_line, print_targets, running_server, write_report
from model import DEFAULT_CHECKPOINT, Denoiser, Quality, load_checkpoint
from model.metrics import add_noise
from model.tiling import DEFAULT_TILE
from service.backends import CHOICES, Runtimes
from service.imaging import decode_image, encode_image
from training.evaluate import load_clean_images
from training.provenance import machine

SIZES = [(256, 256), (640, 480), (1024, 768), (1280, 960), (1632, 1224)]  # up to 2.0 MP


def workload(count: int, seed: int) -> list[tuple[bytes, torch.Tensor]]:
    """``count`` noisy PNGs (sigma 25) cycling through SIZES, each with the tensor the service decodes from it."""
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
        items.append((buffer.getvalue(), decode_image(buffer.getvalue()).rgb))
    return items


def percentiles(latencies: list[float]) -> dict:
    return {f"p{q}": round(float(np.percentile(latencies, q)), 3) for q in (50, 95, 99)}


def in_process(checkpoint: str, items, quality: str, backend: str, tile: int = DEFAULT_TILE) -> dict:
    """One after another in this process, with the CLI's engines: ``model`` denoises the decoded tensors only;
    ``cli_path`` also decodes each PNG and encodes the answer, as ``ddsnet denoise`` does (files aside)."""
    denoiser = Denoiser(load_checkpoint(checkpoint), tile=tile)
    engines = Runtimes(denoiser, backend)
    engines.build_all()
    quality = Quality(quality)
    denoiser.denoise(items[0][1], quality, engines)  # warm-up

    def cli_step(payload: bytes) -> None:
        decoded = decode_image(payload)
        encode_image(denoiser.denoise(decoded.rgb, quality, engines).denoised, decoded, "png")

    report = {"engines": {row["subnet"]: row["backend"] for row in engines.summary()["subnets"]}}
    for name, step in (("model", lambda item: denoiser.denoise(item[1], quality, engines)),
                       ("cli_path", lambda item: cli_step(item[0]))):
        latencies, pixels = [], 0
        started = time.perf_counter()
        for item in items:
            begin = time.perf_counter()
            step(item)
            latencies.append(time.perf_counter() - begin)
            pixels += item[1].shape[-1] * item[1].shape[-2]
        wall = time.perf_counter() - started
        report[name] = {"mpix_per_s": round(pixels / wall / 1e6, 4), "seconds": round(wall, 2),
                        **percentiles(latencies)}
    return report


def http_run(base: str, items, quality: str, concurrency: int) -> dict:
    """Send ``items`` to the server from ``concurrency`` clients at once: throughput and latency percentiles."""
    with httpx.Client(timeout=1200) as client:

        def send(item) -> tuple[float, int]:
            begin = time.perf_counter()
            response = client.post(f"{base}/denoise", params={"quality": quality},
                                   files={"file": ("x.png", item[0], "image/png")})
            response.raise_for_status()
            return time.perf_counter() - begin, item[1].shape[-1] * item[1].shape[-2]

        send(items[0])  # warm-up: the first request at a new window shape pays for shape compilation
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(send, items))
        wall = time.perf_counter() - started
    pixels = sum(p for _, p in results)
    return {"mpix_per_s": round(pixels / wall / 1e6, 4), "seconds": round(wall, 2),
            **percentiles([latency for latency, _ in results])}


def check_targets(report: dict) -> dict:
    """HTTP at concurrency 1 against the CLI's path, HTTP at saturation against in-process, and readiness.

    Args:
        report: with ``in_process`` (``mpix_per_s``), ``http`` rows (``concurrency``, ``mpix_per_s``) and
            ``ready_seconds``.

    Returns:
        Per target: ``value``, ``bar`` and ``met``.
    """
    by_concurrency = {row["concurrency"]: row["mpix_per_s"] for row in report["http"]}
    saturation = max(by_concurrency)
    model, cli = report["in_process"]["model"]["mpix_per_s"], report["in_process"]["cli_path"]["mpix_per_s"]
    checks = {
        f"HTTP at concurrency 1 >= {targets.SERVE_MIN_FRACTION_OF_CLI:g} of the CLI path":
            (by_concurrency.get(1, 0.0) / cli, targets.SERVE_MIN_FRACTION_OF_CLI, True),
        f"HTTP at concurrency {saturation} >= {targets.SERVE_MIN_FRACTION_OF_RAW:g} of the model in-process":
            (by_concurrency[saturation] / model, targets.SERVE_MIN_FRACTION_OF_RAW, True),
        f"ready within {targets.SERVE_MAX_READY_SECONDS:g} s": (report["ready_seconds"],
                                                                 targets.SERVE_MAX_READY_SECONDS, False),
    }
    return {name: {"value": round(value, 3), "bar": bar, "met": value >= bar if higher else value <= bar}
            for name, (value, bar, higher) in checks.items()}


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--quality", default="auto")
    parser.add_argument("--backend", default="auto", choices=CHOICES)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/serve.json")
    args = parser.parse_args()
    print(f"command: {command_line()}")
    items = workload(args.requests, args.seed)
    megapixels = sum(n.shape[-1] * n.shape[-2] for _, n in items) / 1e6
    report = {"command": command_line(), "machine": machine(), "checkpoint": args.checkpoint,
              "quality": args.quality, "backend": args.backend, "tile": DEFAULT_TILE, "requests": args.requests,
              "megapixels": round(megapixels, 3), "sizes": SIZES, "seed": args.seed}
    report["in_process"] = in_process(args.checkpoint, items, args.quality, args.backend)
    print("in-process:", report["in_process"], flush=True)
    # The latency controller off: under load it would run auto slimmer, and this compares like with like.
    env = {"DDSNET_MAX_QUEUE_TILES": "4096", "DDSNET_REQUEST_TIMEOUT_S": "1200", "DDSNET_BACKEND": args.backend,
           "DDSNET_LATENCY_TARGET_MS": "0"}
    started = time.perf_counter()
    with running_server(args.checkpoint, env, timeout=300) as base:
        report["ready_seconds"] = round(time.perf_counter() - started, 2)  # from the process's start
        report["server_engines"] = {row["subnet"]: row["backend"]
                                    for row in httpx.get(f"{base}/info").json()["engines"]["subnets"]}
        print(f"ready in {report['ready_seconds']} s; engines {report['server_engines']}", flush=True)
        report["http"] = []
        for concurrency in args.concurrency:
            row = {"concurrency": concurrency, **http_run(base, items, args.quality, concurrency)}
            row["vs_model"] = round(row["mpix_per_s"] / report["in_process"]["model"]["mpix_per_s"], 3)
            row["vs_cli_path"] = round(row["mpix_per_s"] / report["in_process"]["cli_path"]["mpix_per_s"], 3)
            print(row, flush=True)
            report["http"].append(row)
    report["targets"] = check_targets(report)
    print_targets(report["targets"])
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
