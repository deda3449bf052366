"""Load: what ``quality=auto`` does past the rate it can sustain, with the latency controller off and on; and
(``--scenario mixed``) small photos beside one client's stream of large ones, with fair sharing on and off.

    .venv/bin/python -m benchmarks.load [--checkpoint PATH] [--duration 30] [--loads 1 2 4] [--side 256]
    .venv/bin/python -m benchmarks.load --scenario mixed [--large-mp 20] [--small-rate 2] [--deadline-ms MS]

1. **Inputs.** Noisy images (AWGN, sigma 25, seeded) cut as ``--side`` squares from the 7 scikit-image colour
   photos, so that every answer's PSNR can be computed against its clean crop.
2. **Unloaded auto.** Each input sent once, one at a time, to the server with the controller on: the PSNR that
   ``auto`` reaches with nothing queued.
3. **Sustainable rate.** With the controller off, 4 clients send back to back for ``--duration`` seconds: the
   answers per second are the rate that ``auto`` sustains.
4. **Open-loop load** at ``--loads`` times that rate (arrivals seeded and evenly spread) for ``--duration``
   seconds, one fresh ``ddsnet serve`` per mode: the controller ``off`` (``DDSNET_LATENCY_TARGET_MS=0``);
   ``width``, the controller on (the server's default target, or ``--target-ms``) giving up width only
   (``DDSNET_SHED_WAIT_FACTOR=0``); and ``shed``, the server's defaults, where ``auto`` work that would wait past
   the target even at the slimmest width is refused at once. Every request is waited for.

Reported per mode and load: goodput (200s per second, from the first request sent to the last answer),
p50/p95/p99 latency of the 200s, the share of 503s, the share downgraded for load, and the mean PSNR of the
answered images against unloaded ``auto`` on the same images. Checks the ``LOAD_*`` targets of
:mod:`benchmarks.targets` at 2x, with the server's defaults, writes ``benchmarks/results/load.json`` and
plots latency and PSNR against offered load to ``load.png`` beside it.

The mixed scenario, one fresh ``ddsnet serve`` per mode (``DDSNET_FAIR_SHARE`` true and false):

1. **Alone.** Each ``--side`` input sent once, one at a time: the small photos' latency with nothing else
   queued.
2. **Mixed.** For ``--duration`` seconds, one client (its own source address, 127.0.0.2, so that the server
   counts it as another client) sends ``--large-mp`` megapixel photos back to back (skimage's astronaut,
   scaled, AWGN sigma 25, JPEG quality 90), while small photos arrive open loop at ``--small-rate`` per second
   from 127.0.0.1, each with ``deadline_ms`` when ``--deadline-ms`` is given. Every request is waited for.

Reported per mode and size class: p50/p95 latency of the 200s, the answers by status (refusals: 503, 429,
413), and goodput (200s and megapixels per second). Checks the ``MIXED_*`` targets with fairness on and
writes ``benchmarks/results/load_mixed.json``.
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


MODES = {  # the controller's mode: DDSNET_LATENCY_TARGET_MS (None: the target) and DDSNET_SHED_WAIT_FACTOR
    "off": (0.0, 0.0),
    "width": (None, 0.0),
    "shed": (None, None),  # the server's default factor
}


def check(report: dict) -> dict:
    """The targets at 2x the sustainable rate, with the server's defaults (``shed``)."""
    row = next((r for r in report["runs"] if r["controller"] == "shed" and r["load"] == 2), None)
    if row is None:
        return {}
    width = next((r for r in report["runs"] if r["controller"] == "width" and r["load"] == 2), None)
    target_s = report["latency_target_ms"] / 1000
    checks = {
        f"goodput >= {targets.LOAD_MIN_GOODPUT_VS_WIDTH:g}x width-only": (
            row["goodput_per_s"] / width["goodput_per_s"] if width else float("nan"),
            targets.LOAD_MIN_GOODPUT_VS_WIDTH, True),
        "answers other than 200 and 503": (row["share_other_errors"], 0.0, False),
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
    for mode, style in (("off", "o--"), ("width", "s:"), ("shed", "^-")):
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


def large_photo(megapixels: float, seed: int) -> bytes:
    """A noisy photo of about ``megapixels`` (3:2), JPEG quality 90: skimage's astronaut scaled up, AWGN
    sigma 25."""
    _, clean = next(iter(load_clean_images("skimage")))
    width = round((megapixels * 1e6 * 1.5) ** 0.5)
    height = round(width / 1.5)
    photo = Image.fromarray((clean[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    pixels = np.asarray(photo.resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels += np.random.default_rng(seed).standard_normal(pixels.shape, dtype=np.float32) * 25
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


async def timed_post(client: httpx.AsyncClient, base: str, size_class: str, payload: bytes, name: str,
                     params: dict) -> dict:
    """One ``POST /denoise``: its size class, status and seconds (the answer itself is not kept)."""
    begin = time.perf_counter()
    try:
        response = await client.post(f"{base}/denoise", params=params, files={"file": (name, payload)})
        status = response.status_code
    except httpx.HTTPError:
        status = 0
    return {"class": size_class, "status": status, "seconds": time.perf_counter() - begin}


async def mixed_run(base: str, small: list[bytes], large: bytes, small_rate: float, duration: float,
                    deadline_ms: float | None) -> tuple[list[dict], float]:
    """Small photos open loop at ``small_rate`` per second beside one client sending ``large`` back to back,
    for ``duration`` seconds; returns the records and the run's length, to the last answer."""
    small_params = {"format": "png", **({"deadline_ms": f"{deadline_ms:g}"} if deadline_ms else {})}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    large_transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(timeout=600, limits=limits) as http, \
            httpx.AsyncClient(timeout=600, transport=large_transport) as large_http:
        started = time.perf_counter()
        end = started + duration

        async def large_loop() -> list[dict]:
            records = []
            while time.perf_counter() < end:
                records.append(await timed_post(large_http, base, "large", large, "large.jpg", {"format": "jpeg"}))
            return records

        large_task = asyncio.create_task(large_loop())
        await asyncio.sleep(min(1.0, duration / 10))  # the large photo is in flight when the small ones come
        small_started = time.perf_counter()
        tasks = []
        for index in range(max(1, round(small_rate * (end - small_started)))):
            delay = small_started + index / small_rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(timed_post(http, base, "small", small[index % len(small)], "x.png",
                                                        small_params)))
        records = [*await asyncio.gather(*tasks), *await large_task]
        return records, time.perf_counter() - started


def summarize_classes(records: list[dict], seconds: float, megapixels: dict[str, float]) -> dict:
    """Per size class: requests, answers by status, p50/p95 of the 200s, and goodput (200s and megapixels
    per second)."""
    rows = {}
    for size_class in sorted({r["class"] for r in records}):
        mine = [r for r in records if r["class"] == size_class]
        answered = [r["seconds"] for r in mine if r["status"] == 200]
        row = {"requests": len(mine),
               "statuses": {str(status): sum(r["status"] == status for r in mine)
                            for status in sorted({r["status"] for r in mine})},
               "refused": sum(r["status"] in (413, 429, 503) for r in mine),
               "goodput_per_s": round(len(answered) / seconds, 3),
               "goodput_mpix_per_s": round(len(answered) * megapixels[size_class] / seconds, 3)}
        if answered:
            row.update({f"p{q}_s": round(float(np.percentile(answered, q)), 3) for q in (50, 95)})
        rows[size_class] = row
    return rows


def check_mixed(report: dict) -> dict:
    """With fair sharing on: small photos answered within max(MIXED_SMALL_MAX_S, MIXED_SMALL_MAX_OVER_ALONE x
    their time alone) at p95, and the large photos still answered."""
    row = next((r for r in report["runs"] if r["fair_share"]), None)
    if row is None or "p95_s" not in row["classes"].get("small", {}):
        return {}
    bar = max(targets.MIXED_SMALL_MAX_S, targets.MIXED_SMALL_MAX_OVER_ALONE * report["small_alone_p50_s"])
    large = row["classes"].get("large", {})
    checks = {"small p95 within max(3 s, 10x alone)": (row["classes"]["small"]["p95_s"], bar, False),
              "large photos answered": (large.get("statuses", {}).get("200", 0), 1, True)}
    return {name: {"value": round(value, 3), "bar": round(bar, 3), "met": value >= bar if higher else value <= bar}
            for name, (value, bar, higher) in checks.items()}


def mixed(args) -> int:
    """The mixed scenario (see the module docstring)."""
    small = [payload for payload, _ in inputs(args.side, args.seed)]
    large = large_photo(args.large_mp, args.seed)
    report = {"command": command_line(), "machine": machine(), "checkpoint": args.checkpoint, "side": args.side,
              "large_mp": args.large_mp, "large_bytes": len(large), "small_rate_per_s": args.small_rate,
              "duration_s": args.duration, "deadline_ms": args.deadline_ms, "runs": []}
    megapixels = {"small": args.side * args.side / 1e6, "large": args.large_mp}
    for fair in (True, False):
        env = {"DDSNET_FAIR_SHARE": str(fair).lower(), "DDSNET_REQUEST_TIMEOUT_S": "600"}
        with running_server(args.checkpoint, env, timeout=300) as base:
            if fair:
                with httpx.Client(timeout=300) as http:
                    alone = []
                    for payload in small:
                        begin = time.perf_counter()
                        response = http.post(f"{base}/denoise", files={"file": ("x.png", payload, "image/png")})
                        if response.status_code != 200:
                            raise SystemExit(f"error: a small photo alone got {response.status_code}: "
                                             f"{response.text[:200]}")
                        alone.append(time.perf_counter() - begin)
                report["small_alone_p50_s"] = round(float(np.median(alone)), 3)
                print(f"a small photo alone: {report['small_alone_p50_s']} s", flush=True)
            records, seconds = asyncio.run(mixed_run(base, small, large, args.small_rate, args.duration,
                                                     args.deadline_ms))
        run = {"fair_share": fair, "seconds": round(seconds, 3),
               "classes": summarize_classes(records, seconds, megapixels)}
        report["runs"].append(run)
        print(run, flush=True)
    report["targets"] = check_mixed(report)
    print_targets(report["targets"], prefix="mixed, fair sharing on, ")
    write_report(args.out or "benchmarks/results/load_mixed.json", report)
    return 0


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--scenario", choices=("overload", "mixed"), default="overload")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per run")
    parser.add_argument("--loads", type=float, nargs="+", default=[1, 2, 4], help="multiples of the sustained rate")
    parser.add_argument("--side", type=int, default=256, help="side of the square inputs")
    parser.add_argument("--target-ms", type=float, default=None, help="latency target (default: the server's)")
    parser.add_argument("--large-mp", type=float, default=20.0, help="mixed: megapixels of the large photos")
    parser.add_argument("--small-rate", type=float, default=2.0, help="mixed: small photos per second")
    parser.add_argument("--deadline-ms", type=float, default=None, help="mixed: the small photos' deadline_ms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/load.json (mixed: load_mixed.json)")
    args = parser.parse_args()
    if args.scenario == "mixed":
        return mixed(args)
    args.out = args.out or "benchmarks/results/load.json"
    items = inputs(args.side, args.seed)
    target_ms = args.target_ms if args.target_ms is not None else Settings().latency_target_ms
    report = {"command": command_line(), "machine": machine(), "checkpoint": args.checkpoint, "side": args.side,
              "inputs": len(items), "duration_s": args.duration, "latency_target_ms": target_ms, "runs": []}
    unloaded: dict[int, float] = {}  # PSNR of unloaded auto per input, measured with the controller on
    for mode, (mode_target_ms, shed_factor) in MODES.items():
        env = {"DDSNET_REQUEST_TIMEOUT_S": "300",
               "DDSNET_LATENCY_TARGET_MS": f"{target_ms if mode_target_ms is None else mode_target_ms:g}"}
        if shed_factor is not None:
            env["DDSNET_SHED_WAIT_FACTOR"] = f"{shed_factor:g}"
        with running_server(args.checkpoint, env, timeout=300) as base:
            if mode == "off":
                report["sustained_per_s"] = round(asyncio.run(closed_loop(base, items, 4, args.duration)), 3)
                print(f"auto sustains {report['sustained_per_s']} answers/s", flush=True)
            elif not unloaded:
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
    print_targets(report["targets"], prefix="at 2x, server defaults, ")
    out = write_report(args.out, report)
    plot(report, Path(out).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
