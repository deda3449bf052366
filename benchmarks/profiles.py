"""The noise profiles: a checkpoint with profiles against the shipped one and FFDNet, on every noise, and the
profile the gate or a JPEG file's header chooses.

    .venv/bin/python -m benchmarks.profiles --candidate PATH [--shipped PATH] [--images DIR] [--backend auto]

On the validation photos (default ``../shared/data/photos/val-texture``; ``--images skimage``: the public
test photos), at AWGN sigma 15, 25, 50 and every named degradation of
``training.degradations.EVAL_DEGRADATIONS``, fixed seeds, 8-bit. Per noise:

- ``auto`` and ``best`` of the candidate with the pixels sent losslessly (a PNG), the sub-network ``auto`` ran,
  and for the JPEG kinds also ``auto`` as a phone sends it, a ``.jpg`` file whose header gives its quality;
- ``best`` of each of the candidate's profiles, so that what each profile choice costs is known: its regret, the
  better profile's widest minus the chosen one's;
- the confusion matrix of the choice against the profile each noise is made for (:data:`NOMINAL_PROFILE`: white
  for AWGN, Poisson-Gaussian and spatially variant noise, compressed for JPEG and downscaled noise), with the
  regret each cell costs, since a wrong profile costs more one way than the other;
- ``auto`` and ``best`` of the shipped checkpoint;
- FFDNet, given the true sigma for AWGN and the noise's RMS otherwise.

Targets (``benchmarks.targets``): ``auto`` at least FFDNet's PSNR on every noise but AWGN; on AWGN, ``auto``
and ``best`` at most ``AWGN_MAX_DROP_DB`` under the shipped checkpoint; the profile right on at least
``PROFILE_MIN_ACCURACY`` of the photos of each noise, where right means a regret of at most
``PROFILE_TOLERANCE_DB`` (the drop ``auto`` may cost against ``best``). The strict share
(the better profile chosen, however close the two) is reported beside it. Writes
``benchmarks/results/profiles.json`` (``profiles_test.json`` for the test photos), with every photo's
measurements.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks import targets
from benchmarks.common import argument_parser, command_line, print_targets, write_report
from benchmarks.quality import ffdnet_model
from model import DEFAULT_CHECKPOINT, Denoiser, Quality, load_checkpoint
from model.metrics import psnr
from service.backends import CHOICES, Runtimes
from service.settings import Settings
from training.data import fixed_noisy_set, pair_label
from training.degradations import EVAL_DEGRADATIONS, EVAL_SIGMAS, eval_degradation, noise_rms
from training.evaluate import noisy_pairs
from training.provenance import machine

JPEG_KINDS = ("jpeg", "poisson_jpeg")

# The profile each kind of noise is made for: the one a classifier of the noise would name.
NOMINAL_PROFILE = {"awgn": "white", "poisson_gaussian": "white", "variant": "white",
                   "jpeg": "compressed", "poisson_jpeg": "compressed", "downscale": "compressed"}


def nominal_profile(key: float | str) -> str:
    """The profile a noise (an AWGN sigma, or a name in ``EVAL_DEGRADATIONS``) is made for."""
    return NOMINAL_PROFILE[eval_degradation(pair_label(key))[0]]


def file_quality(key: float | str) -> int | None:
    """The quality a JPEG file of this noise would carry in its header (the last compression's); None when
    the noise is not a JPEG."""
    if isinstance(key, float) or EVAL_DEGRADATIONS[key][0] not in JPEG_KINDS:
        return None
    params = EVAL_DEGRADATIONS[key][1]
    return int(params.get("requality", params["quality"]))


@torch.inference_mode()
def measure_pair(candidate: Denoiser, shipped: Denoiser, ffdnet, key, clean: torch.Tensor, noisy: torch.Tensor,
                 engines: dict[int, Runtimes] | None = None) -> dict:
    """Every measurement of one noisy photo (PSNRs in dB, and the profiles chosen). ``engines``: each
    denoiser's (by ``id``) runtimes, as the service runs them; the sliced supernets run without."""
    def quality_of(denoiser: Denoiser, index: int) -> float:
        runtime = None if engines is None else engines[id(denoiser)][index]
        return psnr(denoiser.run(noisy, index, runtime)[0], clean).item()

    row: dict = {}
    widest = {name: quality_of(candidate, candidate.best_of(name)) for name in candidate.profiles}
    row["best by profile"] = widest
    row["right profile"] = max(widest, key=widest.get)
    row["nominal profile"] = nominal_profile(key)
    auto = candidate.select(noisy, Quality.auto)
    row["auto"], row["auto profile"] = quality_of(candidate, auto.index), auto.profile
    row["auto subnet"] = auto.index
    row["best"] = widest[auto.profile]
    row["regret"] = max(widest.values()) - widest[auto.profile]
    jpeg_quality = file_quality(key)
    if jpeg_quality is not None:
        sent = candidate.select(noisy, Quality.auto, jpeg_quality=jpeg_quality)
        row["auto as .jpg"], row["auto as .jpg profile"] = quality_of(candidate, sent.index), sent.profile
        row["auto as .jpg regret"] = max(widest.values()) - widest[sent.profile]
    row["shipped auto"] = quality_of(shipped, shipped.select(noisy, Quality.auto).index)
    row["shipped best"] = quality_of(shipped, shipped.best_index)
    sigma = key if isinstance(key, float) else noise_rms(noisy, clean)
    row["FFDNet"] = psnr(ffdnet(noisy, torch.tensor([sigma / 255.0])), clean).item()
    row["noisy"] = psnr(noisy, clean).item()
    return row


def summarize(rows: list[dict]) -> dict:
    """Means over the photos of one noise, and the shares of the profile choices."""
    summary = {name: round(float(np.mean([r[name] for r in rows])), 4)
               for name in ("auto", "best", "auto as .jpg", "shipped auto", "shipped best", "FFDNet", "noisy")
               if name in rows[0]}
    for name in rows[0]["best by profile"]:
        summary[f"best ({name})"] = round(float(np.mean([r["best by profile"][name] for r in rows])), 4)
    summary["profile right"] = share_right(rows, "regret")
    summary["profile strict"] = round(float(np.mean([r["auto profile"] == r["right profile"] for r in rows])), 4)
    summary["profile nominal"] = round(float(np.mean([r["auto profile"] == r["nominal profile"] for r in rows])), 4)
    summary["regret mean (dB)"] = round(float(np.mean([r["regret"] for r in rows])), 4)
    summary["regret max (dB)"] = round(float(np.max([r["regret"] for r in rows])), 4)
    profiles = list(rows[0]["best by profile"])
    summary["auto profiles"] = {name: sum(r["auto profile"] == name for r in rows) for name in profiles}
    summary["better profiles"] = {name: sum(r["right profile"] == name for r in rows) for name in profiles}
    if "auto subnet" in rows[0]:  # the rows of the table that auto ran, by how many photos
        picked = [r["auto subnet"] for r in rows]
        summary["auto subnets"] = {str(index): picked.count(index) for index in sorted(set(picked))}
    if "auto as .jpg profile" in rows[0]:
        summary["auto as .jpg profiles"] = {name: sum(r["auto as .jpg profile"] == name for r in rows)
                                            for name in profiles}
        summary["auto as .jpg profile right"] = share_right(rows, "auto as .jpg regret")
    summary["auto - FFDNet"] = round(summary["auto"] - summary["FFDNet"], 4)
    summary["auto - shipped auto"] = round(summary["auto"] - summary["shipped auto"], 4)
    summary["best - shipped best"] = round(summary["best"] - summary["shipped best"], 4)
    return summary


def rounded(row: dict) -> dict:
    """A photo's row for the report, its PSNRs and regrets to 4 decimals."""
    return {name: rounded(value) if isinstance(value, dict) else round(value, 4) if isinstance(value, float)
            else value for name, value in row.items()}


def share_right(rows: list[dict], regret: str) -> float:
    """The share of photos whose profile choice costs at most ``PROFILE_TOLERANCE_DB``."""
    return round(float(np.mean([r[regret] <= targets.PROFILE_TOLERANCE_DB for r in rows])), 4)


def confusion(rows: list[dict], choice: str = "auto profile", regret: str = "regret") -> dict:
    """The profile chosen against the profile each noise is made for, over ``rows`` of any noises: for each
    (nominal, chosen) pair, how many photos, and the regret they cost in all and at most (dB)."""
    matrix: dict = {}
    for row in rows:
        cell = matrix.setdefault(row["nominal profile"], {}).setdefault(
            row[choice], {"photos": 0, "regret sum (dB)": 0.0, "regret max (dB)": 0.0})
        cell["photos"] += 1
        cell["regret sum (dB)"] += row[regret]
        cell["regret max (dB)"] = max(cell["regret max (dB)"], row[regret])
    for cells in matrix.values():
        for cell in cells.values():
            cell["regret sum (dB)"] = round(cell["regret sum (dB)"], 4)
            cell["regret max (dB)"] = round(cell["regret max (dB)"], 4)
    return matrix


def check(noise: str, row: dict) -> dict[str, dict]:
    """The targets one noise's row is held to, as ``print_targets`` takes them: name -> value, bar, met."""
    checks = {f"{noise} profile right": {"value": row["profile right"], "bar": targets.PROFILE_MIN_ACCURACY}}
    if noise in EVAL_DEGRADATIONS and EVAL_DEGRADATIONS[noise][0] != "awgn":
        bar = targets.AUTO_MIN_GAIN_OVER_FFDNET_RMS_DB
        checks[f"{noise} auto - FFDNet (dB)"] = {"value": row["auto - FFDNet"], "bar": bar}
        if "auto as .jpg" in row:
            checks[f"{noise} sent as .jpg, auto - FFDNet (dB)"] = {
                "value": round(row["auto as .jpg"] - row["FFDNet"], 4), "bar": bar}
    else:
        for method in ("auto", "best"):
            checks[f"{noise} {method} - shipped {method} (dB)"] = {"value": row[f"{method} - shipped {method}"],
                                                                   "bar": -targets.AWGN_MAX_DROP_DB}
    for entry in checks.values():
        entry["met"] = entry["value"] >= entry["bar"]
    return checks


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--candidate", required=True, help="a checkpoint with profiles")
    parser.add_argument("--shipped", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--images", default="../shared/data/photos/val-texture",
                        help="a folder of photos, or 'skimage' for the public test photos")
    parser.add_argument("--sigma", type=float, nargs="+", default=list(EVAL_SIGMAS), help="AWGN sigmas")
    parser.add_argument("--degradations", nargs="*", default=[n for n, (k, _) in EVAL_DEGRADATIONS.items()
                                                              if k != "awgn"], choices=list(EVAL_DEGRADATIONS))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--backend", default="auto", choices=CHOICES,
                        help="the engines that run the sub-networks, as `ddsnet serve --backend` (every float32 "
                             "engine agrees with the supernet to 1e-4); default: auto, from the engine cache")
    parser.add_argument("--out", help="the report (default: benchmarks/results/profiles.json, or profiles_test.json "
                                      "with --images skimage)")
    args = parser.parse_args()

    candidate = Denoiser(load_checkpoint(args.candidate))
    shipped = Denoiser(load_checkpoint(args.shipped))
    ffdnet = ffdnet_model()
    started = time.perf_counter()
    if args.images == "skimage":  # the public test photos: measured once per shipped checkpoint
        pairs = noisy_pairs("skimage", args.sigma, args.seed, args.degradations)
    else:
        pairs = fixed_noisy_set(args.images, args.sigma, args.seed, degradations=args.degradations)
    engines = {id(d): Runtimes(d, args.backend, cache_dir=Settings().engine_cache_dir()) for d in (candidate, shipped)}
    by_noise: dict[str, list[dict]] = {}
    for name, key, clean, noisy in pairs:
        row = measure_pair(candidate, shipped, ffdnet, key, clean, noisy, engines)
        by_noise.setdefault(pair_label(key), []).append({"photo": name, **row})
    results = {noise: summarize(rows) for noise, rows in by_noise.items()}
    every_row = [row for rows in by_noise.values() for row in rows]
    matrices = {"auto": confusion(every_row)}
    jpeg_rows = [row for row in every_row if "auto as .jpg profile" in row]
    if jpeg_rows:
        matrices["auto as .jpg"] = confusion(jpeg_rows, "auto as .jpg profile", "auto as .jpg regret")
    checks = {name: entry for noise, row in results.items() for name, entry in check(noise, row).items()}
    for noise, row in results.items():
        print(f"{noise}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    for name, matrix in matrices.items():
        print(f"confusion, {name} (nominal -> chosen: photos, regret sum dB): " + "; ".join(
            f"{nominal} -> {chosen}: {cell['photos']}, {cell['regret sum (dB)']}"
            for nominal, cells in matrix.items() for chosen, cell in cells.items()))
    print_targets(checks)
    out = args.out or f"benchmarks/results/{'profiles_test' if args.images == 'skimage' else 'profiles'}.json"
    write_report(out, {
        "command": command_line(), "candidate": args.candidate, "shipped": args.shipped, "images": args.images,
        "seed": args.seed, "backend": args.backend, "photos": len({name for name, _, _, _ in pairs}),
        "machine": machine(),
        "seconds": round(time.perf_counter() - started, 1), "profiles": candidate.profiles,
        "noise": {name: "awgn" if name not in EVAL_DEGRADATIONS else EVAL_DEGRADATIONS[name] for name in results},
        "profile tolerance (dB)": targets.PROFILE_TOLERANCE_DB, "results": results, "confusion": matrices,
        "targets": checks,
        "photos by noise": {noise: [rounded(row) for row in rows] for noise, rows in by_noise.items()},
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
