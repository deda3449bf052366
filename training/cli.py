"""The ``ddsnet-train`` command (also ``python -m training``): the three training stages and ``eval``.

``torchrun --nproc-per-node N -m training supernet|tailor|profile ...`` trains those stages data-parallel over N
processes (:mod:`training.distributed`); every other command runs in one process.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from model.allocator import tune_allocator
from model.checkpoint import DEFAULT_CHECKPOINT
from model.inference import resolve_device
from training.config import CONFIG_DIR
from training.degradations import EVAL_DEGRADATIONS, EVAL_SIGMAS, NON_AWGN
from training.distributed import World, process_group

# The state each resumable stage saves in its out_dir.
RESUMABLE = {"supernet": "state.safetensors", "tailor": "finetune_state.safetensors",
             "profile": "finetune_state.safetensors"}
# The stages that train data-parallel under torchrun.
DATA_PARALLEL = ("supernet", "tailor", "profile")
STAGES = (
    ("supernet", "stage 1: sandwich-rule supernet training with in-place distillation"),
    ("tailor", "stage 2: greedy progressive channel tailoring into K sub-networks"),
    ("profile", "a second set of weights (default: for compressed noise) fine-tuned from a tailored checkpoint"),
    ("gate", "stage 3: train the gate on online labels and write the final checkpoint"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddsnet-train", description="Train and evaluate ddsnet checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    for stage, help_text in STAGES:
        stage_parser = commands.add_parser(stage, help=help_text)
        default = f"training/configs/{stage}.yaml"
        if stage in RESUMABLE:
            default += "; with --resume, the run's own out_dir/config.yaml"
        stage_parser.add_argument("--config", help=f"YAML config file (default: {default})")
        stage_parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                                  help="override a config key")
        stage_parser.add_argument("--print-config", action="store_true",
                                  help="print the effective config (every key) as YAML and exit")
        if stage in RESUMABLE:
            stage_parser.add_argument("--resume", action="store_true",
                                      help=f"continue from out_dir/{RESUMABLE[stage]}")
        stage_parser.set_defaults(handler=run_train, stage=stage)

    pipeline = commands.add_parser("pipeline", help="all three stages in one command, from a profile (gpu, smoke)")
    pipeline.add_argument("--profile", default="gpu", help="gpu, smoke, or a profile YAML (training/recipes/)")
    pipeline.add_argument("--photos", required=True, help="a folder with train/ and val/")
    pipeline.add_argument("--out", required=True, help="the folder every stage writes into")
    pipeline.add_argument("--static", action="store_true",
                          help="train static networks of OUT/tailor's shapes from scratch instead")
    pipeline.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                          help="override a stage's config, e.g. supernet.steps=100")
    pipeline.set_defaults(handler=run_pipeline_command)

    evaluate = commands.add_parser("eval", help="measure PSNR, FLOPs and speed of every quality and sub-network")
    evaluate.add_argument("--images", default="skimage", help="a folder of clean images, or 'skimage'")
    evaluate.add_argument("--sigma", type=float, nargs="+", default=list(EVAL_SIGMAS), help="AWGN sigmas")
    evaluate.add_argument("--degradations", nargs="*", default=list(NON_AWGN), choices=list(EVAL_DEGRADATIONS),
                          metavar="NAME", help=f"other noises, by name (default: {' '.join(NON_AWGN)}; "
                                               "none when given without names)")
    evaluate.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    evaluate.add_argument("--json", dest="json_out", required=True, help="where to write the JSON report")
    evaluate.add_argument("--plot", help="PNG plot path (default: next to the JSON)")
    evaluate.add_argument("--peers", default="", help="a JSON from benchmarks.quality whose peers to plot")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.set_defaults(handler=run_eval)
    return parser


def run_train(args: argparse.Namespace) -> int:
    from training.config import (
        GateStage,
        ProfileStage,
        SupernetStage,
        TailorStage,
        config_yaml,
        load_config,
        resume_config,
    )

    config_path = args.config or str(CONFIG_DIR / f"{args.stage}.yaml")
    stage_config = {"supernet": SupernetStage, "tailor": TailorStage, "profile": ProfileStage,
                    "gate": GateStage}[args.stage]
    if getattr(args, "resume", False) and args.config is None:
        config, source = resume_config(stage_config, config_path, args.set)
        print(f"resuming with {source}" + (" and the --set overrides" if args.set else ""), file=sys.stderr)
    else:
        config = load_config(stage_config, config_path, args.set)
    if args.print_config:
        print(config_yaml(config), end="")
        return 0
    world = World.from_env()
    with process_group(world, world.place(resolve_device(config.compute.device))):
        if args.stage == "supernet":
            from training.supernet import train_supernet

            path = train_supernet(config, resume=args.resume, world=world)
        elif args.stage in ("tailor", "profile"):
            from training.tailor import tailor

            path = tailor(config, resume=args.resume, world=world)
        else:
            from training.gate import train_gate

            path = train_gate(config)
    if world.main:
        print(f"wrote {path}")
    return 0


def run_pipeline_command(args: argparse.Namespace) -> int:
    from training.pipeline import run_pipeline

    path = run_pipeline(args.profile, args.photos, args.out, args.set, static=args.static)
    print(f"wrote {path}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate

    command = shlex.join(["ddsnet-train", *args.argv])
    evaluate(args.checkpoint, args.images, args.sigma, args.json_out, args.plot, args.peers, args.seed, command,
             args.degradations)
    print(f"wrote {args.json_out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from model import CheckpointError

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    processes = World.from_env().size
    if processes > 1 and getattr(args, "stage", None) not in DATA_PARALLEL:
        print(f"error: ddsnet-train {args.command} runs in one process, but torchrun started {processes}; "
              f"only {', '.join(DATA_PARALLEL)} train data-parallel, so run it without torchrun", file=sys.stderr)
        return 2
    try:
        # Training's feature maps are freed and made again at every step: keep them in the heap (model.allocator).
        tune_allocator(os.environ.get("DDSNET_ALLOCATOR", "keep"))
        return args.handler(args)
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
