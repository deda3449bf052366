"""``ddsnet-train eval``: PSNR, FLOPs and speed of every quality and every fixed sub-network, and a plot."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import load_checkpoint
from model.inference import Denoiser, Quality
from model.metrics import psnr
from training.data import fixed_noise, list_images, load_rgb, pair_label
from training.degradations import EVAL_DEGRADATIONS, noise_rms
from training.provenance import machine

# scikit-image's bundled colour photographs (no download needed); synthetic and medical images left out.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "stereo_motorcycle")


def load_clean_images(images: str) -> list[tuple[str, torch.Tensor]]:
    """``[(name, (1, 3, H, W) in [0, 1])]`` from a folder, or ``"skimage"`` for the bundled photos."""
    if images == "skimage":
        from skimage import data

        loaded = []
        for name in SKIMAGE_PHOTOS:
            array = getattr(data, name)()
            array = array[0] if isinstance(array, tuple) else array
            loaded.append((name, torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1)[None]))
        return [(name, image.float() / 255) for name, image in loaded]
    return [(path.stem, load_rgb(path).float()[None] / 255) for path in list_images(images)]


Pair = tuple[str, float | str, torch.Tensor, torch.Tensor]


def noisy_pairs(images: str, sigmas: list[float], seed: int, degradations: tuple[str, ...] | list[str] = (),
                ) -> list[Pair]:
    """Fixed-seed, 8-bit noisy versions of every image: AWGN at every sigma, then every named degradation.

    Returns ``(image name, key, clean, noisy)``: the key is the sigma (a float) or the degradation's name
    (see ``training.degradations.EVAL_DEGRADATIONS``).
    """
    return [(name, key, clean, noisy) for index, (name, clean) in enumerate(load_clean_images(images))
            for key, noisy in fixed_noise(clean, index, seed, sigmas, degradations)]


@torch.inference_mode()
def measure_denoiser(denoiser: Denoiser, pairs: list) -> dict[str, dict[str, dict]]:
    """Per noise and method (``auto``, ``fast``, ``best``, ``subnet_k``): PSNR, MFLOPs/pixel, images/s.

    Noises are labelled as :func:`training.data.pair_label` does (``"25"``, ``"jpeg80-awgn15"``); each
    also gets ``noisy`` (the input's PSNR and its noise RMS on the 0-255 scale).

    Every sub-network runs on every image once; ``auto`` is the gate's pick among those runs, its time the
    gate's time plus that run's, and its FLOPs the gate's plus that run's. The inputs count as sent
    losslessly (no JPEG header to read).
    """
    rows: dict[str, dict[str, list]] = {}
    inputs: dict[str, dict[str, list]] = {}
    for _, key, clean, noisy in pairs:
        sigma = pair_label(key)
        row = inputs.setdefault(sigma, {"psnr": [], "noise_rms": []})
        row["psnr"].append(psnr(noisy, clean).item())
        row["noise_rms"].append(noise_rms(noisy, clean))
        pixels = clean.shape[-1] * clean.shape[-2]
        runs = []
        for index in range(len(denoiser.subnets)):
            started = time.perf_counter()
            denoised, macs = denoiser.run(noisy, index)
            runs.append((psnr(denoised, clean).item(), 2 * macs / pixels / 1e6, time.perf_counter() - started))
        started = time.perf_counter()
        chosen = denoiser.select(noisy, Quality.auto)
        gate_seconds = time.perf_counter() - started
        pick = chosen.index
        psnr_auto, mflops_auto, seconds_auto = runs[pick]
        per_method = {f"subnet_{k}": run for k, run in enumerate(runs)}
        # ``best`` and ``fast`` are the widest and slimmest of the profile chosen for the image.
        per_method["best"] = runs[denoiser.best_of(chosen.profile)]
        per_method["fast"] = runs[denoiser.fast_of(chosen.profile)]
        gate_mflops = 2 * chosen.gate_macs / pixels / 1e6
        per_method["auto"] = (psnr_auto, mflops_auto + gate_mflops, seconds_auto + gate_seconds)
        for method, (value, mflops, seconds) in per_method.items():
            row = rows.setdefault(sigma, {}).setdefault(method, {"psnr": [], "mflops": [], "seconds": []})
            row["psnr"].append(value)
            row["mflops"].append(mflops)
            row["seconds"].append(seconds)
        rows[sigma]["auto"].setdefault("picks", []).append(pick)
    summary: dict[str, dict[str, dict]] = {}
    for sigma, methods in rows.items():
        for method, row in methods.items():
            entry = {
                "psnr": round(float(np.mean(row["psnr"])), 4),
                "mflops_per_pixel": round(float(np.mean(row["mflops"])), 6),
                "images_per_second": round(len(row["seconds"]) / float(np.sum(row["seconds"])), 4),
            }
            if "picks" in row:
                entry["subnet_histogram"] = np.bincount(row["picks"], minlength=len(denoiser.subnets)).tolist()
            summary.setdefault(sigma, {})[method] = entry
        summary[sigma]["noisy"] = {name: round(float(np.mean(values)), 4) for name, values in inputs[sigma].items()}
    return summary


def plot(report: dict, path: str | Path) -> None:
    """PSNR vs GFLOPs per megapixel for each sigma: fixed sub-networks, auto, and peers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = list(report["results"])
    figure, axes = plt.subplots(1, len(sigmas), figsize=(5 * len(sigmas), 4), squeeze=False)
    for axis, sigma in zip(axes[0], sigmas):
        methods = report["results"][sigma]
        subnets = sorted((m for m in methods if m.startswith("subnet_")), key=lambda m: methods[m]["mflops_per_pixel"])
        axis.plot([methods[m]["mflops_per_pixel"] * 1000 for m in subnets], [methods[m]["psnr"] for m in subnets],
                  "o-", label="ddsnet fixed sub-networks")
        axis.plot(methods["auto"]["mflops_per_pixel"] * 1000, methods["auto"]["psnr"], "r*", markersize=14,
                  label="ddsnet auto (gate)")
        for peer, result in report.get("peers", {}).get(sigma, {}).items():
            if result.get("mflops_per_pixel"):
                axis.plot(result["mflops_per_pixel"] * 1000, result["psnr"], "s", label=peer)
            else:
                axis.axhline(result["psnr"], linestyle="--", color="gray", label=f"{peer} (FLOPs not counted)")
        axis.set_title(f"sigma = {sigma}" if sigma.replace(".", "").isdigit() else sigma)
        axis.set_xlabel("GFLOPs per megapixel")
        axis.set_ylabel("PSNR (dB)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def evaluate(checkpoint: str, images: str, sigmas: list[float], json_out: str, plot_out: str | None = None,
             peers: str = "", seed: int = 0, command: str = "", degradations: list[str] | None = None) -> dict:
    """Measure a checkpoint on ``images`` under AWGN at ``sigmas`` and each of ``degradations`` (names of
    ``EVAL_DEGRADATIONS``); write the JSON report and the plot.

    ``command`` is recorded in the report as the command line that made it.
    """
    denoiser = Denoiser(load_checkpoint(checkpoint))
    torch.manual_seed(seed)
    pairs = noisy_pairs(images, sigmas, seed, degradations or [])
    report = {
        "command": command,
        "checkpoint": checkpoint,
        "images": images,
        "image_names": sorted({name for name, *_ in pairs}),
        "sigmas": sigmas,
        "degradations": {name: EVAL_DEGRADATIONS[name] for name in degradations or []},
        "seed": seed,
        "machine": machine(),
        "subnets": [s.to_dict() for s in denoiser.subnets],
        "results": measure_denoiser(denoiser, pairs),
    }
    if peers:
        report["peers"] = json.loads(Path(peers).read_text()).get("peers", {})
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(json_out).write_text(json.dumps(report, indent=2))
    plot(report, plot_out or Path(json_out).with_suffix(".png"))
    return report
