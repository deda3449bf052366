"""Where does a served request's time go? One 2 MP image: server compute vs the raw loop, plus codec time.

    .venv/bin/python benchmarks/serve_probe.py

Prints the server's DDSNet-Compute-Ms for the largest image of benchmarks/serve.py's workload, the raw
loop's time for the same image, and how long decoding and encoding a 1632x1224 PNG take here.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve import free_port, raw_loop, wait_ready, workload  # noqa: E402

from service.imaging import decode_image, encode_image  # noqa: E402


def main() -> int:
    checkpoint = "checkpoints/ddsnet-color.safetensors"
    payload, noisy = workload(5, 0)[4]
    started = time.perf_counter()
    decoded = decode_image(payload)
    decode_s = time.perf_counter() - started
    started = time.perf_counter()
    encode_image(decoded.rgb, decoded, "png")
    encode_s = time.perf_counter() - started
    print(f"image {tuple(noisy.shape[-2:])}: PNG decode {decode_s:.2f} s, encode {encode_s:.2f} s")
    port = free_port()
    server = subprocess.Popen([str(ROOT / ".venv/bin/ddsnet"), "serve", "--port", str(port), "--checkpoint",
                               checkpoint], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        started = time.perf_counter()
        response = httpx.post(f"http://127.0.0.1:{port}/denoise", params={"quality": "auto"},
                              files={"file": ("x.png", payload)}, timeout=600)
        total = time.perf_counter() - started
        print(f"HTTP: {total:.2f} s total, server compute {response.headers['DDSNet-Compute-Ms']} ms, "
              f"sub-network {response.headers['DDSNet-Subnet']}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("raw loop, same image:", raw_loop(checkpoint, [(payload, noisy)], "auto"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
