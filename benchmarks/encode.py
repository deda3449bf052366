"""PNG answers: seconds and bytes per zlib level, which ``DDSNET_PNG_COMPRESS_LEVEL`` sets.

    .venv/bin/python -m benchmarks.encode [--levels 1 6 9] [--passes 5]

Each scikit-image colour photo, resized to 1632x1224 (2 MP, the largest size of ``benchmarks.serve``), is
encoded by the service's own encoder (``service.imaging.encode_image``) at each level; reported per level:
the median seconds over all photos and passes, the mean size, and both against level 6 (Pillow's default).
Writes ``benchmarks/results/encode.json``.
"""

from __future__ import annotations

import io
import statistics
import time

import numpy as np
from PIL import Image

from benchmarks.common import argument_parser, command_line, write_report
from service.imaging import decode_image, encode_image
from training.evaluate import load_clean_images
from training.provenance import machine


def photos() -> list:
    """The service's decoded image (``DecodedImage``) of each photo at 2 MP; its ``rgb`` stands in for a result."""
    decoded = []
    for _, clean in load_clean_images("skimage"):
        array = (clean[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).resize((1632, 1224), Image.BICUBIC).save(buffer, "PNG")
        decoded.append(decode_image(buffer.getvalue()))
    return decoded


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 6, 9])
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/encode.json")
    args = parser.parse_args()
    items = photos()
    rows = {}
    for level in args.levels:
        seconds, sizes = [], []
        for _ in range(args.passes):
            for source in items:
                started = time.perf_counter()
                encoded = encode_image(source.rgb, source, "png", level)
                seconds.append(time.perf_counter() - started)
                sizes.append(len(encoded))
        rows[str(level)] = {"seconds": round(statistics.median(seconds), 4), "bytes": round(statistics.mean(sizes))}
    if "6" in rows:
        for row in rows.values():
            row["time_vs_6"] = round(row["seconds"] / rows["6"]["seconds"], 3)
            row["size_vs_6"] = round(row["bytes"] / rows["6"]["bytes"], 3)
    report = {"command": command_line(), "machine": machine(), "photos": len(items), "size": [1632, 1224],
              "passes": args.passes, "levels": rows}
    for level, row in rows.items():
        print(f"level {level}: {row}")
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
