"""Speed: ddsnet's qualities against FFDNet through the CLI's code path, and each sub-network's layout cost.

    .venv/bin/python -m benchmarks.speed [--checkpoint PATH] [--passes 3]

1. **The CLI's code path** (``model.Denoiser.denoise``, as ``ddsnet denoise`` runs it) on the 7 scikit-image
   colour photos with AWGN at sigma 25, against FFDNet given the true sigma, alternating pass by pass so that
   both see the same machine state. Reported per method: MPix/s (the median pass), the ratio to FFDNet, and
   GFLOP/s (FLOPs spent, tile margins included, per second).
2. **Layout.** Each sub-network on one 512x512 image, one tile, with its input and weights in NCHW and in
   channels-last (what ``Denoiser`` uses); median seconds of ``--passes`` runs, and each width's time against
   its share of the widest's FLOPs.

Needs the ``bench`` extra for FFDNet. Writes ``benchmarks/results/speed.json`` and prints the targets of
:mod:`benchmarks.targets` (``SPEED_*``) as met or missed.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks import targets
from benchmarks.common import argument_parser, command_line, write_report
from benchmarks.quality import ffdnet_model
from model import DEFAULT_CHECKPOINT, Denoiser, load_checkpoint
from training.evaluate import machine, noisy_pairs


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


@torch.inference_mode()
def cli_path(denoiser: Denoiser, pairs: list, passes: int) -> dict:
    """Median MPix/s and GFLOP/s per method over ``passes`` alternating passes of the photos."""
    ffdnet = ffdnet_model()
    pixels = sum(clean.shape[-1] * clean.shape[-2] for _, _, clean, _ in pairs)
    seconds: dict[str, list[float]] = {m: [] for m in ("auto", "best", "fast", "FFDNet")}
    flops: dict[str, float] = {}
    for _ in range(passes):
        for quality in ("auto", "best", "fast"):
            spent = 0.0
            started = time.perf_counter()
            for _, _, _, noisy in pairs:
                spent += denoiser.denoise(noisy, quality).flops
            seconds[quality].append(time.perf_counter() - started)
            flops[quality] = spent
        started = time.perf_counter()
        for _, sigma, _, noisy in pairs:
            ffdnet(noisy, torch.tensor([sigma / 255.0]))
        seconds["FFDNet"].append(time.perf_counter() - started)
    report = {}
    for method, runs in seconds.items():
        median = statistics.median(runs)
        report[method] = {"mpix_per_s": round(pixels / median / 1e6, 4), "seconds": round(median, 3)}
        if method in flops:
            report[method]["gflop_per_s"] = round(flops[method] / median / 1e9, 2)
    for method in ("auto", "best", "fast"):
        report[method]["vs_ffdnet"] = round(report[method]["mpix_per_s"] / report["FFDNet"]["mpix_per_s"], 3)
    return report


@torch.inference_mode()
def layouts(denoiser: Denoiser, passes: int) -> list[dict]:
    """Seconds per 512x512 image of every sub-network, NCHW against channels-last."""
    image = torch.rand(1, 3, 512, 512)
    widest = denoiser.subnets[denoiser.best_index].mflops_per_pixel
    rows = []
    for index, subnet in enumerate(denoiser.subnets):
        result = {}
        for layout, memory_format in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            denoiser.net.to(memory_format=memory_format)
            window = image.contiguous(memory_format=memory_format)
            def run(window=window, widths=subnet.widths):
                denoiser.net(window, widths)

            run()  # warm-up
            result[layout] = round(statistics.median(timed(run) for _ in range(passes)), 4)
        rows.append({"subnet": index, "flops_fraction": round(subnet.mflops_per_pixel / widest, 4), **result})
    denoiser.net.to(memory_format=torch.channels_last)
    for row in rows:
        row["time_fraction"] = round(row["channels_last"] / rows[denoiser.best_index]["channels_last"], 4)
    return rows


def check(report: dict) -> dict:
    """The speed targets: auto and fast against FFDNet, and every width's time against its FLOPs."""
    path, rows = report["cli_path"], report["layouts"]
    worst = max(abs(row["time_fraction"] / row["flops_fraction"] - 1) for row in rows)
    checks = {
        f"auto >= {targets.SPEED_AUTO_VS_FFDNET:g}x FFDNet": (path["auto"]["vs_ffdnet"], targets.SPEED_AUTO_VS_FFDNET),
        f"fast >= {targets.SPEED_FAST_VS_FFDNET:g}x FFDNet": (path["fast"]["vs_ffdnet"], targets.SPEED_FAST_VS_FFDNET),
    }
    result = {name: {"value": value, "bar": bar, "met": value >= bar} for name, (value, bar) in checks.items()}
    result["every width within 25% of proportional to its FLOPs"] = {
        "value": round(worst, 3), "bar": targets.SPEED_MAX_DEVIATION_FROM_FLOPS,
        "met": worst <= targets.SPEED_MAX_DEVIATION_FROM_FLOPS}
    return result


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    denoiser = Denoiser(load_checkpoint(args.checkpoint))
    pairs = noisy_pairs("skimage", [25.0], 0)
    report = {"command": command_line(), "checkpoint": args.checkpoint, "machine": machine(), "passes": args.passes,
              "cli_path": cli_path(denoiser, pairs, args.passes), "layouts": layouts(denoiser, args.passes)}
    report["targets"] = check(report)
    write_report(args.out, report)
    for method, row in report["cli_path"].items():
        print(f"{method}: {row}")
    for row in report["layouts"]:
        print(f"sub-network {row['subnet']}: {row}")
    for name, result in report["targets"].items():
        print(f"target {name}: {result['value']} vs {result['bar']}: {'met' if result['met'] else 'missed'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
