"""The ``ddsnet`` command: denoise, info and serve. Training and evaluation are ``ddsnet-train``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from model.checkpoint import DEFAULT_CHECKPOINT
from model.tiling import DEFAULT_TILE

BACKEND_HELP = ("engine per sub-network: auto times the installed ones and keeps the fastest "
                "(default: $DDSNET_BACKEND or auto)")
MISSING_HELP = (
    "make one with the three training stages (see README, 'Training'): "
    "ddsnet-train supernet && ddsnet-train tailor && ddsnet-train gate; or pass --checkpoint PATH"
)


def load_denoiser(path: str, device: str = "cpu", tile: int | None = None):
    """Load a checkpoint into a :class:`model.Denoiser`, with a helpful message when it is missing."""
    from model import CheckpointError, Denoiser, load_checkpoint

    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint not found: {path}; {MISSING_HELP}")
    return Denoiser(load_checkpoint(path, device), tile=tile or DEFAULT_TILE)


def _output_paths(inputs: list[str], output: str | None) -> list[Path]:
    """Where each input's result goes. Refuses (ValueError) before any work is done if two results would
    land on the same file, or a result would overwrite one of the inputs it did not come from."""
    if len(inputs) == 1:
        source = Path(inputs[0])
        return [Path(output) if output else source.with_name(f"{source.stem}.denoised.png")]
    if output:
        targets = [Path(output) / f"{Path(p).stem}.png" for p in inputs]
    else:
        targets = [Path(p).with_name(f"{Path(p).stem}.denoised.png") for p in inputs]
    resolved = [t.resolve() for t in targets]
    sources = {Path(p).resolve(): p for p in inputs}
    seen: dict[Path, str] = {}
    for source, target in zip(inputs, resolved):
        if target in seen:
            raise ValueError(f"{seen[target]} and {source} would both be written to {target}; "
                             "denoise them in separate runs or rename one")
        if target in sources:
            raise ValueError(f"the result of {source} would overwrite the input {sources[target]}; "
                             "choose another output folder")
        seen[target] = source
    if output:
        Path(output).mkdir(parents=True, exist_ok=True)
    return targets


def run_denoise(args: argparse.Namespace) -> int:
    from model import Noise, Quality
    from service.backends import Runtimes
    from service.imaging import ImageError, decode_image, encode_image
    from service.settings import Settings

    targets = _output_paths(args.inputs, args.output)
    denoiser = load_denoiser(args.checkpoint, tile=args.tile)
    # The service's runtimes: the same backend gives the same output as `ddsnet serve`. Built on first use.
    runtimes = Runtimes(denoiser, args.backend or Settings().backend, max_batch=1)
    quality, noise = Quality(args.quality), Noise(args.noise)
    denoiser.check_noise(noise)  # a profile the checkpoint lacks: one error line, before any image
    failures = 0
    for source, target in zip(args.inputs, targets):
        started = time.perf_counter()
        try:
            decoded = decode_image(Path(source).read_bytes())
            result = denoiser.denoise(decoded.rgb, quality, runtimes, noise, decoded.jpeg_quality)
            encoded = encode_image(result.denoised, decoded, target.suffix.lstrip(".") or "png")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(encoded)
        except (OSError, ImageError) as error:
            failures += 1
            message = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            print(f"error: {source}: {message}", file=sys.stderr)
            continue
        seconds = time.perf_counter() - started
        width, height = decoded.size
        if args.json:
            record = {
                "input": source,
                "output": str(target),
                "subnet": result.subnet,
                "profile": result.profile,
                "quality": args.quality,
                "width": width,
                "height": height,
                "mflops_per_pixel": round(result.flops / (width * height) / 1e6, 6),
                "gflops": round(result.flops / 1e9, 3),
                "seconds": round(seconds, 4),
            }
            print(json.dumps(record), flush=True)
        else:
            cost = f"sub-network {result.subnet} ({result.profile}), {result.flops / 1e9:.1f} GFLOPs, {seconds:.2f} s"
            print(f"{source} -> {target} ({cost})")
    return 1 if failures else 0


def run_info(args: argparse.Namespace) -> int:
    summary = load_denoiser(args.checkpoint).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"checkpoint: {args.checkpoint}")
    print(f"gate: {summary['gate_mflops_per_pixel']:.5f} MFLOPs/pixel at 256x256, trained: {summary['gate_trained']}")
    # Validation noises in table order: AWGN sigmas ("15", ...), then named degradations ("jpeg80-awgn15", ...).
    noises = list(dict.fromkeys(key for row in summary["subnets"] for key in row["val_psnr"]))
    columns = [f"PSNR@{key:>3}" for key in noises]
    header = f"{'#':>2}  {'profile':<10}  {'MFLOPs/px':>10}  {'% of best':>9}  " + "  ".join(columns)
    print(header)
    best = max(row["mflops_per_pixel"] for row in summary["subnets"])
    for index, row in enumerate(summary["subnets"]):
        psnrs = "  ".join(f"{row['val_psnr'].get(key, float('nan')):{len(column)}.2f}"
                          for key, column in zip(noises, columns))
        print(f"{index:>2}  {row['profile']:<10}  {row['mflops_per_pixel']:10.4f}  "
              f"{100 * row['mflops_per_pixel'] / best:8.1f}%  {psnrs}")
        print(f"    widths: {row['widths']}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from service.app import serve

    return serve(args.host, args.port, args.checkpoint, args.backend)


def build_parser() -> argparse.ArgumentParser:
    from model import Noise, Quality
    from service.backends import CHOICES as BACKEND_CHOICES

    parser = argparse.ArgumentParser(prog="ddsnet", description="Dynamic slimmable image denoising.")
    commands = parser.add_subparsers(dest="command", required=True)

    denoise = commands.add_parser("denoise", help="denoise image files")
    denoise.add_argument("inputs", nargs="+", metavar="INPUT", help="PNG, JPEG, TIFF, WebP or BMP files")
    denoise.add_argument("-o", "--output", help="output file (one input) or folder (several inputs)")
    denoise.add_argument("--quality", choices=[q.value for q in Quality], default="auto",
                         help="auto: the gate picks; fast: slimmest; best: widest (default: auto)")
    denoise.add_argument("--noise", choices=[n.value for n in Noise], default="auto",
                         help="which profile's weights: auto (a JPEG file's header, else the gate, decides), white "
                              "(sensor or added noise) or compressed (JPEG-compressed or correlated noise)")
    denoise.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    denoise.add_argument("--json", action="store_true", help="print one JSON object per image")
    denoise.add_argument("--tile", type=int, default=DEFAULT_TILE, help="tile core side in pixels (multiple of 8)")
    denoise.add_argument("--backend", choices=BACKEND_CHOICES, default=None, help=BACKEND_HELP)
    denoise.set_defaults(handler=run_denoise)

    info = commands.add_parser("info", help="print the sub-network table of a checkpoint")
    info.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    info.add_argument("--json", action="store_true")
    info.set_defaults(handler=run_info)

    serve = commands.add_parser("serve", help="serve POST /denoise over HTTP")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--checkpoint", default=None, help=f"default: $DDSNET_CHECKPOINT or {DEFAULT_CHECKPOINT}")
    serve.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                       help=BACKEND_HELP)
    serve.set_defaults(handler=run_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    from model import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `ddsnet info | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
