"""Plot stage 1's validation PSNR against training step from its JSON-lines logs.

    .venv/bin/python benchmarks/training_curve.py [--log LOG [LOG ...]] [--out PNG]

Several logs are runs that followed one another (a later run started from the earlier one's weights with
``init_from``, possibly after stage-2 fine-tunes in between): their steps are laid end to end, and a dotted
line marks where each run began.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOGS = Path(__file__).resolve().parents[1] / "checkpoints" / "logs"


def committed_logs(folder: Path = LOGS) -> list[Path]:
    """The committed stage-1 logs in run order: ``supernet.jsonl`` (the first run), then ``supernet-N.jsonl``
    by N."""
    def run_number(path: Path) -> int:
        suffix = path.stem.removeprefix("supernet").removeprefix("-")
        return int(suffix) if suffix else 1

    return sorted(folder.glob("supernet*.jsonl"), key=run_number)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", nargs="+", default=[str(path) for path in committed_logs()],
                        help="default: every checkpoints/logs/supernet*.jsonl, in run order")
    parser.add_argument("--out", default="benchmarks/results/supernet_curve.png")
    args = parser.parse_args()
    if not args.log:
        raise SystemExit(f"error: no supernet*.jsonl in {LOGS}; name the logs with --log")
    records, starts, offset = [], [], 0
    for log in args.log:
        if not Path(log).is_file():
            raise SystemExit(f"error: no log at {log}")
        lines = Path(log).read_text().splitlines()
        run = [json.loads(line) for line in lines if "val_psnr_widest" in line]
        if not run:
            raise SystemExit(f"error: no validation records in {log}")
        starts.append(offset)
        records += [{**r, "step": r["step"] + offset, "run": log} for r in run]
        offset = records[-1]["step"]
    steps = [r["step"] for r in records]
    figure, axis = plt.subplots(figsize=(7, 4))
    for start in starts[1:]:
        axis.axvline(start, color="grey", linestyle=":", linewidth=1)
    for sigma in records[0]["val_psnr_widest"]:
        axis.plot(steps, [r["val_psnr_widest"][sigma] for r in records], "o-", label=f"widest, sigma {sigma}")
        axis.plot(steps, [r["val_psnr_slimmest"][sigma] for r in records], "x--", label=f"slimmest, sigma {sigma}")
    axis.set_xlabel("step")
    axis.set_ylabel("validation PSNR (dB, 256x256 centre crops)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    for record in records:
        print(record["step"], record["run"], record["val_psnr_widest"], record["val_psnr_slimmest"])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
