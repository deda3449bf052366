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

BACKEND_HELP = ("engine per sub-network: auto takes the installed one expected to finish the job first, from "
                "speeds measured on this machine (default: $DDSNET_BACKEND or auto)")
CACHE_HELP = ("the engine cache's folder (default: $DDSNET_CACHE_DIR, else $XDG_CACHE_HOME/ddsnet); "
              "DDSNET_CACHE=off keeps no cache")
# A `ddsnet denoise` job has the machine to itself, so it runs larger windows than the service, which shares the
# machine between requests one tile at a time. The margin of a tile is fixed by the receptive radius (104 pixels),
# so its share shrinks as the tile grows: an inner tile runs 1.45x its pixels at 1024 against 1.98x at 512, and
# images up to 1232 pixels a side run whole. It costs memory: a 12-megapixel photo at the widest sub-network
# peaks at 2.6 GB against 1.4 GB (docs/PERFORMANCE.md). Tiles overlap by the receptive radius, so every tile
# size gives the whole-image result up to float rounding.
CLI_TILE = 1024
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


def _pixels(path: str) -> int:
    """An image file's pixel count from its header (0 when it cannot be read: decoding will say why)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.width * image.height
    except Exception:  # noqa: BLE001 - any unreadable file; its own decode reports the error
        return 0


class JobSize:
    """What ``auto`` engines expect of this run (see :class:`service.backends.Runtimes`): for a sub-network,
    the pixels of the images still to do, times the share of images that went to it so far (counting the
    one at hand)."""

    def __init__(self, inputs: list[str]) -> None:
        self.sizes = [_pixels(path) for path in inputs]
        self.position = 0
        self.done: dict[int, int] = {}

    def __call__(self, index: int) -> float:
        remaining = sum(self.sizes[self.position:])
        return remaining * (self.done.get(index, 0) + 1) / (self.position + 1)

    def finished(self, index: int | None) -> None:
        """One image done, on sub-network ``index`` (``None``: it failed)."""
        if index is not None:
            self.done[index] = self.done.get(index, 0) + 1
        self.position += 1


def run_denoise(args: argparse.Namespace) -> int:
    from model import Noise, Quality
    from model.allocator import tune_allocator
    from service.backends import Runtimes, use_threads
    from service.settings import Settings

    targets = _output_paths(args.inputs, args.output)
    settings = Settings(**({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    tune_allocator(settings.allocator)
    use_threads(settings.torch_threads)
    denoiser = load_denoiser(args.checkpoint, tile=args.tile)
    # The service's runtimes (the same backend gives the same output as `ddsnet serve`), with its window bound,
    # so that the two share engine cache entries. Built on first use, each chosen for this job's size.
    job = JobSize(args.inputs)
    runtimes = Runtimes(denoiser, args.backend or settings.backend, settings.max_batch_tiles, settings.torch_threads,
                        cache_dir=settings.engine_cache_dir(), work=job)
    quality, noise = Quality(args.quality), Noise(args.noise)
    denoiser.check_noise(noise)  # a profile the checkpoint lacks: one error line, before any image
    try:
        return _denoise_each(args, targets, denoiser, runtimes, job, quality, noise)
    finally:
        runtimes.save_measurements()


def _denoise_each(args, targets, denoiser, runtimes, job: JobSize, quality, noise) -> int:
    from service.imaging import ImageError, decode_image, encode_image

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
            job.finished(None)
            failures += 1
            message = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            print(f"error: {source}: {message}", file=sys.stderr)
            continue
        job.finished(result.subnet)
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
        # A profile is validated on its own kinds of noise only; the others are left blank.
        psnrs = "  ".join(f"{row['val_psnr'][key]:{len(column)}.2f}" if key in row["val_psnr"]
                          else f"{'-':>{len(column)}}" for key, column in zip(noises, columns))
        print(f"{index:>2}  {row['profile']:<10}  {row['mflops_per_pixel']:10.4f}  "
              f"{100 * row['mflops_per_pixel'] / best:8.1f}%  {psnrs}")
        print(f"    widths: {row['widths']}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from service.app import serve

    return serve(args.host, args.port, args.checkpoint, args.backend, args.cache_dir)


def run_cache(args: argparse.Namespace) -> int:
    from model.allocator import tune_allocator
    from service import engine_cache
    from service.backends import Runtimes, use_threads
    from service.settings import Settings

    settings = Settings(**({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    root = Path(settings.cache_dir) if settings.cache_dir else engine_cache.default_root()
    if args.action == "clear":
        print(f"removed {engine_cache.clear(root)} entries from {root}")
        return 0
    if args.action == "warm":
        # What `ddsnet serve` builds at start, with its settings, and the same for the CLI's tile: the two
        # window bounds are two entries. Afterwards the service and the CLI start warm.
        tune_allocator(settings.allocator)
        use_threads(settings.torch_threads)
        tiles = {"serve": [settings.tile], "denoise": [CLI_TILE], "both": sorted({settings.tile, CLI_TILE})}
        for tile in tiles[args.warm_for]:
            denoiser = load_denoiser(args.checkpoint or settings.checkpoint, tile=tile)
            started = time.perf_counter()
            runtimes = Runtimes(denoiser, args.backend or settings.backend, settings.max_batch_tiles,
                                settings.torch_threads, cache_dir=root)
            runtimes.build_all()
            summary = runtimes.summary()
            engines = ", ".join(f"{row['subnet']}: {row['backend']} ({row['source']})" for row in summary["subnets"])
            print(f"{runtimes.cache.folder} (tile {tile}): {engines}; {time.perf_counter() - started:.1f} s")
        return 0
    found = engine_cache.entries(root)
    if args.json:
        print(json.dumps({"root": str(root), "entries": found}, indent=2))
        return 0
    print(f"engine cache: {root} ({len(found)} entries, {sum(e['bytes'] for e in found) / 1e6:.1f} MB)")
    for entry in found:
        key = entry["key"] or {}
        if entry["stale"]:
            print(f"  {Path(entry['folder']).name}: unused (an older layout; `ddsnet cache clear` removes it); "
                  f"{entry['bytes'] / 1e6:.1f} MB")
            continue
        print(f"  {Path(entry['folder']).name}: {', '.join(entry['engines']) or 'measurements only'}; "
              f"checkpoint {str(key.get('checkpoint', '?'))[:12]}, tile {key.get('tile', '?')}, "
              f"{key.get('threads', '?')} threads, "
              f"measured under {', '.join(entry['measured_under']) or 'nothing yet'}, "
              f"{key.get('cpu', '?')}; {entry['bytes'] / 1e6:.1f} MB")
    return 0


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
    denoise.add_argument("--tile", type=int, default=CLI_TILE,
                         help=f"tile core side in pixels, a multiple of 8 (default: {CLI_TILE}; the service's "
                              f"DDSNET_TILE is {DEFAULT_TILE}, which takes less memory)")
    denoise.add_argument("--backend", choices=BACKEND_CHOICES, default=None, help=BACKEND_HELP)
    denoise.add_argument("--cache-dir", default=None, help=CACHE_HELP)
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
    serve.add_argument("--cache-dir", default=None, help=CACHE_HELP)
    serve.set_defaults(handler=run_serve)

    cache = commands.add_parser("cache", help="the engine cache: show it, fill it, or empty it")
    cache.add_argument("action", choices=["info", "warm", "clear"],
                       help="info: its entries; warm: build and time every engine as `ddsnet serve` would, for "
                            "the service and the CLI; "
                            "clear: remove every entry")
    cache.add_argument("--cache-dir", default=None, help=CACHE_HELP)
    cache.add_argument("--checkpoint", default=None, help=f"warm: default $DDSNET_CHECKPOINT or {DEFAULT_CHECKPOINT}")
    cache.add_argument("--backend", choices=BACKEND_CHOICES, default=None, help="warm: " + BACKEND_HELP)
    cache.add_argument("--for", dest="warm_for", choices=["serve", "denoise", "both"], default="both",
                       help="warm: the engines of `ddsnet serve` (its DDSNET_TILE), of `ddsnet denoise` (its default "
                            "tile), or both (default)")
    cache.add_argument("--json", action="store_true", help="info: as JSON")
    cache.set_defaults(handler=run_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from model import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValidationError as error:  # a DDSNET_* variable out of range: one line per setting
        for problem in error.errors():
            setting = ".".join(map(str, problem["loc"]))
            print(f"error: DDSNET_{setting.upper()}: {problem['msg']}", file=sys.stderr)
        return 2
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
