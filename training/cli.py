"""``ddsnet train supernet|tailor|gate`` and ``ddsnet eval`` (also ``python -m training``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
RESUMABLE = {"supernet": "state.safetensors", "tailor": "finetune_state.safetensors"}  # the state each saves


def add_train_parsers(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a stage: supernet, tailor or gate")
    stages = train.add_subparsers(dest="stage", required=True)
    for stage, help_text in (
        ("supernet", "stage 1: sandwich-rule supernet training with in-place distillation"),
        ("tailor", "stage 2: greedy progressive channel tailoring into K sub-networks"),
        ("gate", "stage 3: train the gate on online labels and write the final checkpoint"),
    ):
        parser = stages.add_parser(stage, help=help_text)
        default = f"training/configs/{stage}.yaml"
        if stage in RESUMABLE:
            default += "; with --resume, the run's own out_dir/config.yaml"
        parser.add_argument("--config", help=f"YAML config file (default: {default})")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        if stage in RESUMABLE:
            parser.add_argument("--resume", action="store_true", help=f"continue from out_dir/{RESUMABLE[stage]}")
        parser.set_defaults(handler=run_train)

    evaluate = subparsers.add_parser("eval", help="measure PSNR, FLOPs and speed of every quality and sub-network")
    evaluate.add_argument("--images", default="skimage", help="a folder of clean images, or 'skimage'")
    evaluate.add_argument("--sigma", type=float, nargs="+", default=[15.0, 25.0, 50.0])
    evaluate.add_argument("--checkpoint", default="checkpoints/ddsnet-color.safetensors")
    evaluate.add_argument("--json", dest="json_out", required=True, help="where to write the JSON report")
    evaluate.add_argument("--plot", help="PNG plot path (default: next to the JSON)")
    evaluate.add_argument("--peers", default="", help="a JSON from benchmarks/quality.py whose peers to plot")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.set_defaults(handler=run_eval)


def run_train(args: argparse.Namespace) -> int:
    from training.config import GateStage, SupernetStage, TailorStage, load_config, resume_config

    command = shlex.join(["ddsnet", *sys.argv[1:]])
    config_path = args.config or str(CONFIG_DIR / f"{args.stage}.yaml")
    stage_config = {"supernet": SupernetStage, "tailor": TailorStage, "gate": GateStage}[args.stage]
    if getattr(args, "resume", False) and args.config is None:
        config, source = resume_config(stage_config, config_path, args.set)
        print(f"resuming with {source}" + (" and the --set overrides" if args.set else ""), file=sys.stderr)
    else:
        config = load_config(stage_config, config_path, args.set)
    if args.stage == "supernet":
        from training.supernet import train_supernet

        path = train_supernet(config, resume=args.resume, command=command)
    elif args.stage == "tailor":
        from training.tailor import tailor

        path = tailor(config, resume=args.resume, command=command)
    else:
        from training.gate import train_gate

        path = train_gate(config, command=command)
    print(f"wrote {path}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate

    evaluate(args.checkpoint, args.images, args.sigma, args.json_out, args.plot, args.peers, args.seed)
    print(f"wrote {args.json_out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training")
    add_train_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
