"""Where does a served request's time go? One 2 MP image: server compute vs the raw loop, plus codec time.

    .venv/bin/python -m benchmarks.serve_probe [--checkpoint PATH] [--quality auto]

Prints how long decoding and encoding the largest image of ``benchmarks.serve``'s workload (a 1632x1224
PNG) take here, the HTTP time and the server's ``DDSNet-Compute-Ms`` for that image, and the raw loop's time
for the same image. Writes nothing.
"""

from __future__ import annotations

import time

import httpx

from benchmarks.common import argument_parser, command_line, running_server
from benchmarks.serve import raw_loop, workload
from model import DEFAULT_CHECKPOINT
from service.imaging import decode_image, encode_image


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--quality", default="auto")
    args = parser.parse_args()
    print(f"command: {command_line()}")
    payload, noisy = workload(5, 0)[4]
    started = time.perf_counter()
    decoded = decode_image(payload)
    decode_s = time.perf_counter() - started
    started = time.perf_counter()
    encode_image(decoded.rgb, decoded, "png")
    encode_s = time.perf_counter() - started
    print(f"image {tuple(noisy.shape[-2:])}: PNG decode {decode_s:.2f} s, encode {encode_s:.2f} s")
    with running_server(args.checkpoint) as base:
        started = time.perf_counter()
        response = httpx.post(f"{base}/denoise", params={"quality": args.quality},
                              files={"file": ("x.png", payload)}, timeout=600)
        response.raise_for_status()
        total = time.perf_counter() - started
    print(f"HTTP: {total:.2f} s total, server compute {response.headers['DDSNet-Compute-Ms']} ms, "
          f"sub-network {response.headers['DDSNet-Subnet']}")
    print("raw loop, same image:", raw_loop(args.checkpoint, [(payload, noisy)], args.quality))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
