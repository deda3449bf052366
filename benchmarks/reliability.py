"""Reliability: mutated uploads and overload against a live ``ddsnet serve``, with the server's memory.

    .venv/bin/python -m benchmarks.reliability [--checkpoint PATH] [--uploads 1000] [--rounds 3]

1. **Fuzzed uploads.** ``--uploads`` corruptions (flipped bytes, cuts, spliced repeats, overwritten header
   fields; seed 0) of small PNG, JPEG, WebP, TIFF and BMP files, one at a time. Reported: the count per
   status (a 5xx is a failure), the longest answer, and the server's peak RSS.
2. **Overload.** ``--rounds`` rounds of ``--clients`` concurrent clients posting 512x512 noisy photos for
   ``--seconds`` each, against a queue bound of ``--queue-tiles``. Reported per round: the count per status
   and the server's RSS before and after (after the queue has drained).

Writes ``benchmarks/results/reliability.json``.
"""

from __future__ import annotations

import io
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.common import (
    argument_parser,
    base_url,
    command_line,
    free_port,
    mutate,
    seed_files,
    start_server,
    stop_server,
    wait_ready,
    write_report,
)
from model import DEFAULT_CHECKPOINT


def rss_mib(pid: int) -> dict[str, float]:
    """The process's current and peak resident memory, MiB (Linux ``/proc``)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss": int(fields["VmRSS"].split()[0]) / 1024, "peak": int(fields["VmHWM"].split()[0]) / 1024}


def fuzz(url: str, count: int, seed: int) -> dict:
    rng = random.Random(seed)
    seeds = seed_files()
    statuses: dict[str, int] = {}
    longest = 0.0
    with httpx.Client(base_url=url, timeout=120) as client:
        for _ in range(count):
            name, data = rng.choice(seeds)
            started = time.perf_counter()
            status = client.post("/denoise", files={"file": (name, mutate(data, rng))}).status_code
            longest = max(longest, time.perf_counter() - started)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {"uploads": count, "statuses": statuses, "server_errors": sum(v for k, v in statuses.items()
                                                                        if k.startswith("5")),
            "longest_answer_s": round(longest, 3)}


def overload(url: str, clients: int, seconds: float) -> dict[str, int]:
    photo = np.random.default_rng(1).integers(0, 255, (512, 512, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "PNG")
    payload = buffer.getvalue()
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    stop_at = time.time() + seconds

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=300) as client:
            while time.time() < stop_at:
                try:
                    status = str(client.post("/denoise", files={"file": ("x.png", payload)}).status_code)
                except httpx.HTTPError as error:
                    status = type(error).__name__
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1

    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client_loop) for _ in range(clients)]:
            future.result()
    return statuses


def drained(url: str, timeout: float = 600) -> None:
    """Wait until the server's queue is empty and nothing is in flight."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = httpx.get(f"{url}/metrics").text
        busy = [line for line in text.splitlines()
                if line.startswith(("ddsnet_queue_tiles{", "ddsnet_requests_in_flight ")) and float(line.split()[-1])]
        if not busy:
            return
        time.sleep(0.5)


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--uploads", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--queue-tiles", type=int, default=8, help="DDSNET_MAX_QUEUE_TILES during the overload")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/reliability.json")
    args = parser.parse_args()

    port = free_port()
    server = start_server(args.checkpoint, port, env={"DDSNET_MAX_QUEUE_TILES": str(args.queue_tiles)})
    try:
        wait_ready(port, 120, server)
        url = base_url(port)
        report = {"command": command_line(), "checkpoint": args.checkpoint, "rss_at_start_mib": rss_mib(server.pid)}
        report["fuzz"] = fuzz(url, args.uploads, args.seed) | {"peak_rss_mib": rss_mib(server.pid)["peak"]}
        print(f"fuzz: {report['fuzz']}", flush=True)
        rounds = []
        for index in range(args.rounds):
            before = rss_mib(server.pid)["rss"]
            statuses = overload(url, args.clients, args.seconds)
            drained(url)
            rounds.append({"clients": args.clients, "seconds": args.seconds, "statuses": statuses,
                           "rss_before_mib": round(before, 1), "rss_after_mib": round(rss_mib(server.pid)["rss"], 1)})
            print(f"overload round {index + 1}: {rounds[-1]}", flush=True)
        report["overload"] = rounds
        report["alive_after"] = httpx.get(f"{url}/healthz").status_code == 200
    finally:
        stop_server(server)
    write_report(args.out, report)
    return 0 if report["fuzz"]["server_errors"] == 0 and report["alive_after"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
