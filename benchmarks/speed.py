"""Speed: ddsnet's qualities against FFDNet through the CLI's code path, and every backend per sub-network.

    .venv/bin/python -m benchmarks.speed [--checkpoint PATH] [--passes 3] [--backend auto] [--no-compile]

1. **Backends.** Each sub-network on one 512x512 image: the sliced supernet in NCHW (torch without an engine),
   then every engine installed for the device (``service.backends``: torch channels-last, ONNX Runtime,
   OpenVINO) and ``torch.compile``, with the seconds each took to build; median of ``--passes`` runs.
2. **Batches.** Sub-network 2's seconds per 512x512 window in batches of 1, 2 and 4, per backend: the CPU
   default (one window at a time) is the fastest of these.
3. **The CLI's code path** (``model.Denoiser.denoise`` with the engines ``--backend`` picks, as ``ddsnet
   denoise`` runs it) on the 7 scikit-image colour photos with AWGN at sigma 25, against FFDNet given the true
   sigma, alternating pass by pass so that both see the same machine state. Reported per method: MPix/s (the
   median pass), the ratio to FFDNet, and GFLOP/s (FLOPs spent, tile margins included, per second).
4. **Time against FLOPs**: each width's time on its chosen engine over the widest's, against its FLOPs share.

Needs the ``bench`` extra for FFDNet. Writes ``benchmarks/results/speed.json`` and prints the targets of
:mod:`benchmarks.targets` (``SPEED_*``) as met or missed.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch

from benchmarks import targets
from benchmarks.common import argument_parser, command_line, print_targets, write_report
from benchmarks.quality import ffdnet_model
from model import DEFAULT_CHECKPOINT, Denoiser, Quality, load_checkpoint
from service import backends
from training.evaluate import noisy_pairs
from training.provenance import machine


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


@torch.inference_mode()
def cli_path(denoiser: Denoiser, engines: backends.Runtimes, pairs: list, passes: int) -> dict:
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
                spent += denoiser.denoise(noisy, Quality(quality), engines).flops
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


def median_seconds(function, passes: int) -> float:
    function()  # warm-up: a first call at a new shape pays for allocation and shape compilation
    return statistics.median(timed(function) for _ in range(passes))


@torch.inference_mode()
def backend_table(denoiser: Denoiser, passes: int, with_compile: bool) -> list[dict]:
    """Seconds per 512x512 image of every sub-network on every backend, and what each took to build.

    ``supernet_nchw`` is the sliced supernet on an NCHW tensor, as torch runs it without an engine;
    ``torch.compile`` compiles the channels-last static copy for this one shape (it recompiles per shape, so
    it is measured here and not offered as a backend)."""
    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    bound = backends.shape_bound(denoiser, max_batch=4)
    widest = denoiser.subnets[denoiser.best_index].mflops_per_pixel
    rows = []
    for index, subnet in enumerate(denoiser.subnets):
        row = {"subnet": index, "flops_fraction": round(subnet.mflops_per_pixel / widest, 4), "seconds": {},
               "build_seconds": {}}
        denoiser.net.to(memory_format=torch.contiguous_format)
        row["seconds"]["supernet_nchw"] = round(
            median_seconds(lambda widths=subnet.widths: denoiser.net(image, widths), passes), 4)
        denoiser.net.to(memory_format=torch.channels_last)
        for name in backends.candidates(denoiser.device):
            engine = backends.build_runtime(denoiser, index, name, bound)
            row["build_seconds"][name] = round(engine.build_seconds, 2)
            row["seconds"][name] = round(median_seconds(lambda engine=engine: engine(image), passes), 4)
        if with_compile:
            static = denoiser.net.export(subnet.widths).eval().to(memory_format=torch.channels_last)
            compiled = torch.compile(static, dynamic=False)
            run = functools.partial(compiled, image.contiguous(memory_format=torch.channels_last))
            row["build_seconds"]["torch.compile"] = round(timed(run), 2)
            row["seconds"]["torch.compile"] = round(median_seconds(run, passes), 4)
        rows.append(row)
        print(f"sub-network {index}: {row}", flush=True)
    return rows


@torch.inference_mode()
def batch_table(denoiser: Denoiser, passes: int, index: int) -> dict:
    """Seconds per 512x512 window of sub-network ``index`` in batches of 1, 2 and 4, per backend."""
    bound = backends.shape_bound(denoiser, max_batch=4)
    table = {}
    for name in backends.candidates(denoiser.device):
        engine = backends.build_runtime(denoiser, index, name, bound)
        table[name] = {}
        for size in (1, 2, 4):
            batch = torch.rand(size, 3, 512, 512, generator=torch.Generator().manual_seed(size))
            table[name][str(size)] = round(median_seconds(functools.partial(engine, batch), passes) / size, 4)
    return table


def check(report: dict) -> dict:
    """The speed targets: auto and fast against FFDNet, and every width's time (on the engine ``auto`` chose)
    against its FLOPs."""
    path = report["cli_path"]
    chosen = {row["subnet"]: row["backend"] for row in report["engines"]["subnets"]}
    rows = report["backends"]
    best = next(row for row in rows if row["flops_fraction"] == 1.0)
    deviations = {row["subnet"]: round(row["seconds"][chosen[row["subnet"]]] / best["seconds"][chosen[best["subnet"]]]
                                       / row["flops_fraction"] - 1, 3) for row in rows}
    report["time_vs_flops"] = deviations
    worst = max(abs(value) for value in deviations.values())
    checks = {
        f"auto >= {targets.SPEED_AUTO_VS_FFDNET:g}x FFDNet": (path["auto"]["vs_ffdnet"], targets.SPEED_AUTO_VS_FFDNET),
        f"fast >= {targets.SPEED_FAST_VS_FFDNET:g}x FFDNet": (path["fast"]["vs_ffdnet"], targets.SPEED_FAST_VS_FFDNET),
    }
    result = {name: {"value": value, "bar": bar, "met": value >= bar} for name, (value, bar) in checks.items()}
    result["every width within 25% of proportional to its FLOPs"] = {
        "value": worst, "bar": targets.SPEED_MAX_DEVIATION_FROM_FLOPS,
        "met": worst <= targets.SPEED_MAX_DEVIATION_FROM_FLOPS}
    return result


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--backend", default="auto", choices=backends.CHOICES, help="engines for the CLI path")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the backend table")
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    denoiser = Denoiser(load_checkpoint(args.checkpoint))
    report = {"command": command_line(), "checkpoint": args.checkpoint, "machine": machine(), "passes": args.passes,
              "backends": backend_table(denoiser, args.passes, not args.no_compile),
              "batch_seconds_per_window": batch_table(denoiser, args.passes,
                                                         index=min(2, len(denoiser.subnets) - 1))}
    print(f"batches, seconds per window: {report['batch_seconds_per_window']}", flush=True)
    engines = backends.Runtimes(denoiser, args.backend)
    engines.build_all()
    report["engines"] = engines.summary()
    report["cli_path"] = cli_path(denoiser, engines, noisy_pairs("skimage", [25.0], 0), args.passes)
    report["targets"] = check(report)
    write_report(args.out, report)
    for method, row in report["cli_path"].items():
        print(f"{method}: {row}")
    print(f"time against FLOPs, per sub-network: {report['time_vs_flops']}")
    print_targets(report["targets"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
