"""Load: what ``quality=auto`` does past the rate it can sustain, with the latency controller off and on.

    .venv/bin/python -m benchmarks.load [--checkpoint PATH] [--duration 30] [--loads 1 2 4] [--side 256]

1. **Inputs.** Noisy images (AWGN, sigma 25, seeded) cut as ``--side`` squares from the 7 scikit-image colour
   photos, so that every answer's PSNR can be computed against its clean crop.
2. **Unloaded auto.** Each input sent once, one at a time, to the server with the controller on: the PSNR that
   ``auto`` reaches with nothing queued.
3. **Sustainable rate.** With the controller off, 4 clients send back to back for ``--duration`` seconds: the
   answers per second are the rate that ``auto`` sustains.
4. **Open-loop load** at ``--loads`` times that rate (arrivals seeded and evenly spread) for ``--duration``
   seconds, controller off (``DDSNET_LATENCY_TARGET_MS=0``) and on (the server's default target, or
   ``--target-ms``), one fresh ``ddsnet serve`` per mode. Every request is waited for.

Reported per mode and load: goodput (200s per second, from the first request sent to the last answer),
p50/p95/p99 latency of the 200s, the share of 503s, the share downgraded for load, and the mean PSNR of the
answered images against unloaded ``auto`` on the same images. Checks the ``LOAD_*`` targets of
:mod:`benchmarks.targets` at 2x, writes ``benchmarks/results/load.json`` and plots latency and PSNR against
offered load to ``load.png`` beside it.
"""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from benchmarks import targets
from benchmarks.common import argument_parser, command_line, print_targets, running_server, write_report
from model import DEFAULT_CHECKPOINT
from model.metrics import add_noise, psnr
from service.settings import Settings
from training.evaluate import load_clean_images
from training.provenance import machine


def inputs(side: int, seed: int) -> list[tuple[bytes, torch.Tensor]]:
    """(noisy PNG, clean tensor) for every ``side`` square on a grid over each skimage photo."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for _, clean in load_clean_images("skimage"):
        height, width = clean.shape[-2:]
        for top in range(0, height - side + 1, side):
            for left in range(0, width - side + 1, side):
                crop = clean[..., top:top + side, left:left + side]
                noisy = add_noise(crop, 25, generator)
                buffer = io.BytesIO()
                Image.fromarray((noisy[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buffer, "PNG")
                items.append((buffer.getvalue(), crop))
    return items


def answer_psnr(content: bytes, clean: torch.Tensor) -> float:
    denoised = torch.from_numpy(np.asarray(Image.open(io.BytesIO(content))).copy()).permute(2, 0, 1)[None].float()
    return float(psnr(denoised / 255, clean))


async def send(client: httpx.AsyncClient, base: str, index: int, payload: bytes) -> dict:
    begin = time.perf_counter()
    try:
        response = await client.post(f"{base}/denoise", files={"file": ("x.png", payload, "image/png")})
    except httpx.HTTPError as error:
        return {"index": index, "status": 0, "seconds": time.perf_counter() - begin, "error": type(error).__name__}
    record = {"index": index, "status": response.status_code, "seconds": time.perf_counter() - begin}
    if response.status_code == 200:
        record.update(subnet=int(response.headers["DDSNet-Subnet"]), reason=response.headers["DDSNet-Reason"],
                      content=response.content)
    return record


async def closed_loop(base: str, items, clients: int, duration: float) -> float:
    """Answers per second from ``clients`` sending back to back for ``duration`` seconds."""
    done = 0
    deadline = time.perf_counter() + duration

    async def client_loop(offset: int, http: httpx.AsyncClient) -> None:
        nonlocal done
        index = offset
        while time.perf_counter() < deadline:
            record = await send(http, base, index, items[index % len(items)][0])
            done += record["status"] == 200
            index += clients

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=300) as http:
        await asyncio.gather(*(client_loop(offset, http) for offset in range(clients)))
    return done / (time.perf_counter() - started)


async def open_loop(base: str, items, rate: float, duration: float) -> tuple[list[dict], float]:
    """Requests at ``rate`` per second for ``duration`` seconds, each awaited; returns the records and the
    run's length, from the first request sent to the last answer received."""
    count = max(1, round(rate * duration))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        started = time.perf_counter()
        tasks = []
        for index in range(count):
            delay = started + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(http, base, index, items[index % len(items)][0])))
        records = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    return list(records), elapsed


def summarize(records: list[dict], seconds: float, items, unloaded: dict[int, float]) -> dict:
    answered = [r for r in records if r["status"] == 200]
    latencies = [r["seconds"] for r in answered]
    psnrs = [answer_psnr(r["content"], items[r["index"] % len(items)][1]) for r in answered]
    reference = [unloaded[r["index"] % len(items)] for r in answered]
    row = {
        "requests": len(records),
        "goodput_per_s": round(len(answered) / seconds, 3),
        "answered_share": round(len(answered) / len(records), 4),
        "share_503": round(sum(r["status"] == 503 for r in records) / len(records), 4),
        "share_other_errors": round(sum(r["status"] not in (200, 503) for r in records) / len(records), 4),
        "downgraded_share": round(sum(r.get("reason") == "load" for r in answered) / max(1, len(answered)), 4),
        "subnets": {str(s): sum(r.get("subnet") == s for r in answered)
                    for s in sorted({r["subnet"] for r in answered})},
    }
    if answered:
        row.update({f"p{q}_s": round(float(np.percentile(latencies, q)), 3) for q in (50, 95, 99)})
        row["mean_psnr"] = round(float(np.mean(psnrs)), 3)
        row["psnr_loss_vs_unloaded"] = round(float(np.mean(reference) - np.mean(psnrs)), 3)
    return row


def check(report: dict) -> dict:
    """The targets at 2x the sustainable rate, controller on."""
    row = next((r for r in report["runs"] if r["controller"] == "on" and r["load"] == 2), None)
    if row is None:
        return {}
    target_s = report["latency_target_ms"] / 1000
    checks = {
        f"answered 200 >= {targets.LOAD_MIN_ANSWERED:g}": (row["answered_share"], targets.LOAD_MIN_ANSWERED, True),
        f"p95 <= {targets.LOAD_MAX_P95_OVER_TARGET:g}x the target": (
            row.get("p95_s", float("inf")) / target_s, targets.LOAD_MAX_P95_OVER_TARGET, False),
        f"PSNR loss <= {targets.LOAD_MAX_PSNR_LOSS_DB:g} dB": (
            row.get("psnr_loss_vs_unloaded", float("inf")), targets.LOAD_MAX_PSNR_LOSS_DB, False),
    }
    return {name: {"value": round(value, 3), "bar": bar, "met": value >= bar if higher else value <= bar}
            for name, (value, bar, higher) in checks.items()}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, quality) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("off", "o--"), ("on", "s-")):
        rows = [r for r in report["runs"] if r["controller"] == mode]
        loads = [r["load"] for r in rows]
        latency.plot(loads, [r.get("p95_s", np.nan) for r in rows], style, label=f"controller {mode}, p95")
        latency.plot(loads, [r.get("p50_s", np.nan) for r in rows], style, alpha=0.4, label=f"controller {mode}, p50")
        quality.plot(loads, [r.get("mean_psnr", np.nan) for r in rows], style, label=f"controller {mode}")
    latency.axhline(report["latency_target_ms"] / 1000, color="grey", lw=1, label="latency target")
    quality.axhline(report["unloaded_psnr"], color="grey", lw=1, label="unloaded auto")
    latency.set(xlabel="offered load (x the rate auto sustains)", ylabel="latency (s)", yscale="log")
    quality.set(xlabel="offered load (x the rate auto sustains)", ylabel="mean PSNR of answers (dB)")
    latency.legend(fontsize=7)
    quality.legend(fontsize=7)
    figure.suptitle(f"{report['command']} ({report['side']}x{report['side']}, sigma 25)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per run")
    parser.add_argument("--loads", type=float, nargs="+", default=[1, 2, 4], help="multiples of the sustained rate")
    parser.add_argument("--side", type=int, default=256, help="side of the square inputs")
    parser.add_argument("--target-ms", type=float, default=None, help="latency target (default: the server's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/load.json")
    args = parser.parse_args()
    items = inputs(args.side, args.seed)
    target_ms = args.target_ms if args.target_ms is not None else Settings().latency_target_ms
    report = {"command": command_line(), "machine": machine(), "checkpoint": args.checkpoint, "side": args.side,
              "inputs": len(items), "duration_s": args.duration, "latency_target_ms": target_ms, "runs": []}
    unloaded: dict[int, float] = {}  # PSNR of unloaded auto per input, measured with the controller on
    for mode in ("off", "on"):
        env = {"DDSNET_REQUEST_TIMEOUT_S": "300", "DDSNET_LATENCY_TARGET_MS": f"{0 if mode == 'off' else target_ms:g}"}
        with running_server(args.checkpoint, env, timeout=300) as base:
            if mode == "off":
                report["sustained_per_s"] = round(asyncio.run(closed_loop(base, items, 4, args.duration)), 3)
                print(f"auto sustains {report['sustained_per_s']} answers/s", flush=True)
            else:
                with httpx.Client(timeout=300) as http:
                    for index, (payload, clean) in enumerate(items):
                        response = http.post(f"{base}/denoise", files={"file": ("x.png", payload, "image/png")})
                        if response.status_code != 200:
                            raise SystemExit(f"error: unloaded request {index} got {response.status_code}: "
                                             f"{response.text[:200]}")
                        unloaded[index] = answer_psnr(response.content, clean)
                report["unloaded_psnr"] = round(float(np.mean(list(unloaded.values()))), 3)
                print(f"unloaded auto: {report['unloaded_psnr']} dB", flush=True)
            for load in args.loads:
                records, seconds = asyncio.run(open_loop(base, items, load * report["sustained_per_s"], args.duration))
                report["runs"].append({"controller": mode, "load": load, "records": records, "seconds": seconds})
                print(f"controller {mode}, {load:g}x: {len(records)} requests sent", flush=True)
    for run in report["runs"]:
        records, seconds = run.pop("records"), run.pop("seconds")
        run.update(summarize(records, seconds, items, unloaded))
        print(run, flush=True)
    report["targets"] = check(report)
    print_targets(report["targets"], prefix="at 2x, controller on, ")
    out = write_report(args.out, report)
    plot(report, Path(out).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
