"""Speed: ddsnet's qualities against FFDNet through the CLI's code path, and every backend per sub-network.

    .venv/bin/python -m benchmarks.speed [--checkpoint PATH] [--passes 3] [--backend auto] [--no-compile]
    .venv/bin/python -m benchmarks.speed --cold [--checkpoint PATH] [--passes 3]
    ... [--allocator keep|system]

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

With ``--cold``, instead: **what a user waits for**, from outside the processes. Over the 16 validation photos
(``val-texture/``) with AWGN at sigma 25, written as PNGs: one ``ddsnet denoise`` process per quality for the
whole folder (``--backend auto`` and ``--backend torch``, their order alternating), its wall time, with the
engine cache empty and then warm (after one ``ddsnet cache warm``), against FFDNet in this process (true sigma);
one 512x512 photo from a fresh process, auto on a warm cache against torch; one 12-megapixel photo (4000x3000),
fast and best on a warm cache, at the CLI's default tile and at the service's, its wall time and peak memory; and
the seconds from starting ``ddsnet serve`` to ``/readyz`` answering 200, cold and warm.
Writes ``benchmarks/results/speed_cold.json``.

Everything runs under one allocator setting (``model.allocator``): this process, FFDNet in it, and every
``ddsnet`` process it starts (``DDSNET_ALLOCATOR``). The default, ``keep``, is what ``ddsnet`` runs under; it
speeds up eager torch, FFDNet included, by sparing page faults. ``--allocator system`` measures glibc's defaults.

Needs the ``bench`` extra for FFDNet. Writes ``benchmarks/results/speed.json`` and prints the targets of
:mod:`benchmarks.targets` (``SPEED_*``) as met or missed.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import targets
from benchmarks.common import (
    argument_parser,
    command_line,
    free_port,
    print_targets,
    stop_server,
    wait_ready,
    write_report,
)
from benchmarks.quality import ffdnet_model
from model import DEFAULT_CHECKPOINT, Denoiser, Quality, load_checkpoint
from model.allocator import ALLOCATOR_MODES, tune_allocator
from model.tiling import DEFAULT_TILE
from service import backends
from service.cli import CLI_TILE
from training.evaluate import noisy_pairs
from training.provenance import machine

DEFAULT_OUT = "benchmarks/results/speed.json"
VAL_TEXTURE = "../shared/data/photos/val-texture"


def ddsnet() -> list[str]:
    """The ``ddsnet`` command as a user runs it: the console script beside this interpreter."""
    script = Path(sys.executable).parent / "ddsnet"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


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


def _noisy_folder(folder: Path, photos: str, sigma: float) -> tuple[list[Path], list[torch.Tensor], int]:
    """Each photo of ``photos`` with AWGN at ``sigma`` (seeded), as a PNG in ``folder``; the paths, the noisy
    tensors and the pixels in all."""
    from PIL import Image

    from training.data import list_images, load_rgb

    paths, tensors = [], []
    generator = torch.Generator().manual_seed(int(sigma))
    for source in list_images(photos):
        clean = load_rgb(source).float()[None] / 255
        noisy = (clean + torch.randn(clean.shape, generator=generator) * sigma / 255).clamp(0, 1)
        noisy = (noisy * 255).round() / 255
        path = folder / source.name
        Image.fromarray((noisy[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
        paths.append(path)
        tensors.append(noisy)
    return paths, tensors, sum(t.shape[-1] * t.shape[-2] for t in tensors)


def _wall_and_peak(command: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MiB) of one child process; its stderr is in the error it fails with."""
    with tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            stderr.seek(0)
            message = stderr.read().decode(errors="replace")
            raise subprocess.CalledProcessError(child.returncode, command, stderr=message)
    return seconds, usage.ru_maxrss / 1024


def _wall(command: list[str], env: dict) -> float:
    return _wall_and_peak(command, env)[0]


def _phone_photo(path: Path, source: Path, size: tuple[int, int] = (4000, 3000), sigma: float = 25.0) -> int:
    """``source`` resized to a phone camera's 12 megapixels, with AWGN at ``sigma`` (seeded), as a PNG; its
    pixels. Its content is smooth, but the time and memory of a window do not depend on it."""
    import numpy as np
    from PIL import Image

    with Image.open(source) as image:
        big = np.asarray(image.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32)
    noisy = big + np.random.default_rng(int(sigma)).normal(0, sigma, big.shape)
    Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8)).save(path)
    return size[0] * size[1]


def _ready_seconds(checkpoint: str, cache: Path, env: dict) -> float:
    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen([*ddsnet(), "serve", "--port", str(port), "--checkpoint", checkpoint,
                               "--cache-dir", str(cache)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, timeout=600, server=server)
        return time.perf_counter() - started
    finally:
        stop_server(server)


@torch.inference_mode()
def cold_report(checkpoint: str, passes: int, photos: str, allocator: str) -> dict:
    """The ``--cold`` measurements (see the module's docstring); each the median of ``passes``."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "DDSNET_ALLOCATOR": allocator}
    denoise = [*ddsnet(), "denoise"]
    ffdnet = ffdnet_model()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "in").mkdir()
        paths, tensors, pixels = _noisy_folder(scratch / "in", photos, 25.0)
        cache = scratch / "cache"

        def folder_run(quality: str, backend: str) -> float:
            return _wall([*denoise, *map(str, paths), "-o", str(scratch / "out"), "--quality", quality,
                          "--backend", backend, "--checkpoint", checkpoint, "--cache-dir", str(cache)], env)

        def ffdnet_seconds() -> float:
            started = time.perf_counter()
            for noisy in tensors:
                ffdnet(noisy, torch.tensor([25.0 / 255]))
            return time.perf_counter() - started

        rows: dict[str, dict[str, dict]] = {"cold": {}, "warm": {}}
        ffdnet_runs = []
        for state in ("cold", "warm"):
            if state == "warm":  # once: what later runs add to the cache only refines it
                subprocess.run([*ddsnet(), "cache", "warm", "--checkpoint", checkpoint, "--cache-dir", str(cache)],
                               check=True, env=env, stdout=subprocess.DEVNULL)
            for quality in ("auto", "fast", "best"):
                runs: dict[str, list[float]] = {"auto": [], "torch": []}
                for index in range(passes):
                    # Of two processes run back to back, the first tends to be the slower: the order alternates.
                    for backend in ("auto", "torch") if index % 2 == 0 else ("torch", "auto"):
                        if state == "cold":
                            shutil.rmtree(cache, ignore_errors=True)
                        runs[backend].append(folder_run(quality, backend))
                    ffdnet_runs.append(ffdnet_seconds())
                rows[state][quality] = {backend: {"seconds": round(statistics.median(r), 3),
                                                  "mpix_per_s": round(pixels / statistics.median(r) / 1e6, 4)}
                                        for backend, r in runs.items()}
        ffdnet_mpix = pixels / statistics.median(ffdnet_runs) / 1e6
        for state in rows.values():
            for row in state.values():
                for backend in ("auto", "torch"):
                    row[backend]["vs_ffdnet"] = round(row[backend]["mpix_per_s"] / ffdnet_mpix, 3)
                row["auto_over_torch_seconds"] = round(row["auto"]["seconds"] / row["torch"]["seconds"], 3)

        one = scratch / "one.png"
        from PIL import Image

        Image.open(paths[0]).crop((0, 0, 512, 512)).save(one)
        single = {"auto": [], "torch": []}
        for _ in range(passes):
            for backend in single:
                single[backend].append(_wall([*denoise, str(one), "-o", str(scratch / "one.out.png"), "--backend",
                                              backend, "--checkpoint", checkpoint, "--cache-dir", str(cache)], env))
        one_photo = {backend: round(statistics.median(r), 3) for backend, r in single.items()}
        one_photo["auto_over_torch"] = round(one_photo["auto"] / one_photo["torch"], 3)

        # A 12-megapixel photo, warm cache: the CLI's default tile against the service's, time and memory.
        phone = scratch / "phone.png"
        phone_pixels = _phone_photo(phone, paths[0])
        phone_runs: dict[str, dict[str, list]] = {}
        for _ in range(passes):
            for quality in ("fast", "best"):
                for tile in (str(CLI_TILE), str(DEFAULT_TILE)):
                    seconds, peak = _wall_and_peak(
                        [*denoise, str(phone), "-o", str(scratch / "phone.out.png"), "--quality", quality, "--tile",
                         tile, "--checkpoint", checkpoint, "--cache-dir", str(cache)], env)
                    runs = phone_runs.setdefault(f"{quality}, tile {tile}", {"seconds": [], "peak_rss_mib": []})
                    runs["seconds"].append(seconds)
                    runs["peak_rss_mib"].append(peak)
        phone_photo = {"megapixels": round(phone_pixels / 1e6, 2), **{
            name: {"seconds": round(statistics.median(r["seconds"]), 2),
                   "peak_rss_mib": round(statistics.median(r["peak_rss_mib"]))} for name, r in phone_runs.items()}}

        ready = {"cold": [], "warm": []}
        for _ in range(passes):
            shutil.rmtree(cache, ignore_errors=True)
            ready["cold"].append(_ready_seconds(checkpoint, cache, env))
            ready["warm"].append(_ready_seconds(checkpoint, cache, env))
    return {"photos": photos, "images": len(paths), "megapixels": round(pixels / 1e6, 3),
            "ffdnet_mpix_per_s": round(ffdnet_mpix, 4), "folder": rows, "one_512_photo_seconds": one_photo,
            "phone_photo_warm": phone_photo,
            "serve_ready_seconds": {state: round(statistics.median(r), 2) for state, r in ready.items()}}


def check_cold(report: dict) -> dict:
    """The cold-process targets (``COLD_*`` in :mod:`benchmarks.targets`)."""
    warm, cold = report["folder"]["warm"], report["folder"]["cold"]
    checks = {
        f"warm cache: auto >= {targets.COLD_AUTO_VS_FFDNET:g}x FFDNet": (
            warm["auto"]["auto"]["vs_ffdnet"], targets.COLD_AUTO_VS_FFDNET, ">="),
        f"warm cache: fast >= {targets.COLD_FAST_VS_FFDNET:g}x FFDNet": (
            warm["fast"]["auto"]["vs_ffdnet"], targets.COLD_FAST_VS_FFDNET, ">="),
        "cold cache: auto no slower than --backend torch, every quality": (
            max(row["auto_over_torch_seconds"] for row in cold.values()), 1.0, "<="),
        f"one 512x512 photo, warm cache: <= {targets.COLD_ONE_PHOTO_VS_TORCH:g}x torch's wall time": (
            report["one_512_photo_seconds"]["auto_over_torch"], targets.COLD_ONE_PHOTO_VS_TORCH, "<="),
        f"serve ready within {targets.COLD_SERVE_READY_S:g} s on a warm cache": (
            report["serve_ready_seconds"]["warm"], targets.COLD_SERVE_READY_S, "<="),
    }
    return {name: {"value": value, "bar": bar, "met": value >= bar if sense == ">=" else value <= bar}
            for name, (value, bar, sense) in checks.items()}


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--backend", default="auto", choices=backends.CHOICES, help="engines for the CLI path")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the backend table")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--cold", action="store_true", help="measure fresh processes from outside instead")
    parser.add_argument("--photos", default=VAL_TEXTURE, help="--cold: the folder of photos")
    parser.add_argument("--allocator", default="keep", choices=ALLOCATOR_MODES,
                        help="the allocator setting of this process and of the ddsnet processes it starts")
    args = parser.parse_args()
    tune_allocator(args.allocator)
    torch.manual_seed(0)
    if args.cold:
        report = {"command": command_line(), "checkpoint": args.checkpoint, "machine": machine(),
                  "passes": args.passes, "allocator": args.allocator,
                  **cold_report(args.checkpoint, args.passes, args.photos, args.allocator)}
        report["targets"] = check_cold(report)
        out = args.out if args.out != DEFAULT_OUT else "benchmarks/results/speed_cold.json"
        write_report(out, report)
        print(json.dumps({k: report[k] for k in ("folder", "one_512_photo_seconds", "phone_photo_warm",
                                                 "serve_ready_seconds")},
                         indent=1))
        print_targets(report["targets"])
        return 0
    denoiser = Denoiser(load_checkpoint(args.checkpoint))
    report = {"command": command_line(), "checkpoint": args.checkpoint, "machine": machine(), "passes": args.passes,
              "allocator": args.allocator, "backends": backend_table(denoiser, args.passes, not args.no_compile),
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
