"""Where do we trail FFDNet? Every sub-network vs FFDNet on the validation photos, full size and downscaled.

    .venv/bin/python -m benchmarks.val_gap [--checkpoint PATH] [--images DIR] [--scales 1.0 0.5] [--bm3d-sigma 25]

The quality targets are checked on the skimage test photos, which must never steer training. This runs on
the validation photos instead (default ``../shared/data/photos/val``), at each ``--scale``: 1.0 is the
1024-pixel wallpaper itself, 0.5 an area-downscaled view whose texture is as dense as a 512-pixel photo's.
AWGN at sigma 15, 25, 50, quantised to 8 bits, and the named degradations of ``--degradations``, with fixed
seeds. FFDNet gets the true sigma for AWGN and the noise's RMS for the other degradations.

Writes ``benchmarks/results/val_gap.json``: per scale and sigma, PSNR of ``best``, ``auto``, ``fast``, every
sub-network and FFDNet, and ``best`` and ``auto`` minus FFDNet. Each AWGN row prints whether ``best`` clears FFDNet by
``benchmarks.targets.BEST_MIN_GAIN_OVER_FFDNET_DB``, each other row whether ``auto`` clears it by
``AUTO_MIN_GAIN_OVER_FFDNET_RMS_DB`` (met or missed). ``noisy`` is the input's PSNR. At each ``--bm3d-sigma``
(none by default: it is slow) CBM3D runs too, given the true sigma, and the row adds ``fast - CBM3D`` and whether
``fast`` clears it by ``FAST_MIN_GAIN_OVER_CBM3D_DB``.
"""

from __future__ import annotations

from benchmarks import targets
from benchmarks.common import argument_parser, command_line, write_report
from benchmarks.quality import measure_cbm3d, measure_ffdnet
from model import DEFAULT_CHECKPOINT, Denoiser, load_checkpoint
from training.data import fixed_noisy_set
from training.degradations import EVAL_DEGRADATIONS, EVAL_SIGMAS, NON_AWGN
from training.evaluate import measure_denoiser
from training.provenance import machine


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--images", default="../shared/data/photos/val")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--sigma", type=float, nargs="+", default=list(EVAL_SIGMAS), help="AWGN sigmas")
    parser.add_argument("--degradations", nargs="*", default=list(NON_AWGN), choices=list(EVAL_DEGRADATIONS),
                        metavar="NAME", help="other noises by name; FFDNet gets their RMS as its sigma")
    parser.add_argument("--bm3d-sigma", type=float, nargs="*", default=[], help="CBM3D at these AWGN sigmas")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default="benchmarks/results/val_gap.json")
    args = parser.parse_args()
    if any(not 0 < scale <= 1 for scale in args.scales):
        parser.error("--scales must lie in (0, 1]")

    denoiser = Denoiser(load_checkpoint(args.checkpoint))
    report = {"command": command_line(), "checkpoint": args.checkpoint, "images": args.images,
              "sigmas": args.sigma, "degradations": {name: EVAL_DEGRADATIONS[name] for name in args.degradations},
              "seed": args.seed, "machine": machine(), "scales": {}}
    for scale in args.scales:
        pairs = fixed_noisy_set(args.images, args.sigma, args.seed, scales=[scale], degradations=args.degradations)
        ours = measure_denoiser(denoiser, pairs)
        ffdnet = measure_ffdnet(pairs)
        cbm3d = measure_cbm3d(pairs, set(args.bm3d_sigma))
        rows = {}
        for sigma, methods in ours.items():
            row = {method: result["psnr"] for method, result in methods.items()}
            row["FFDNet"] = ffdnet[sigma]["psnr"]
            row["best - FFDNet"] = round(row["best"] - row["FFDNet"], 4)
            row["auto - FFDNet"] = round(row["auto"] - row["FFDNet"], 4)
            if sigma in cbm3d:
                row["CBM3D"] = cbm3d[sigma]["psnr"]
                row["fast - CBM3D"] = round(row["fast"] - row["CBM3D"], 4)
            rows[sigma] = row
            if sigma in EVAL_DEGRADATIONS:
                gain = row["auto - FFDNet"]
                checks = {"auto >= FFDNet (noise RMS)": gain >= targets.AUTO_MIN_GAIN_OVER_FFDNET_RMS_DB}
            else:
                checks = {"best >= FFDNet": row["best - FFDNet"] >= targets.BEST_MIN_GAIN_OVER_FFDNET_DB}
            if "CBM3D" in row:
                checks["fast >= CBM3D"] = row["fast - CBM3D"] >= targets.FAST_MIN_GAIN_OVER_CBM3D_DB
            print(f"scale {scale:g} {sigma}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()) + "; "
                  + "; ".join(f"{name}: {'met' if met else 'missed'}" for name, met in checks.items()), flush=True)
        report["scales"][f"{scale:g}"] = {"sizes": sorted({tuple(c.shape[-2:]) for _, _, c, _ in pairs}),
                                          "results": rows}
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
