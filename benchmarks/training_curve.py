"""Plot stage 1's validation PSNR (widest and slimmest sub-network) against training step.

    .venv/bin/python -m benchmarks.training_curve --log RUN/log.jsonl [RUN2/log.jsonl ...] [--out PNG]

Reads the ``log.jsonl`` that ``ddsnet-train supernet`` writes into its ``out_dir`` (``runs/supernet`` by
default). Several logs are runs that followed one another (a later run started from the earlier one's weights
with ``init_from``): their steps are laid end to end, and a dotted line marks where each run began. Writes
``benchmarks/results/supernet_curve.png`` unless told otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.common import argument_parser


class LogError(Exception):
    """A log that is missing or holds no validation records."""


def read_runs(logs: list[str]) -> tuple[list[dict], list[int]]:
    """The validation records of ``logs`` with steps laid end to end, and the step each run starts at.

    Raises:
        LogError: no logs are given, one is missing, or one has no ``val_psnr_widest`` record.
    """
    if not logs:
        raise LogError("no training logs given; name each run's log.jsonl with --log (e.g. runs/supernet/log.jsonl)")
    records, starts, offset = [], [], 0
    for log in logs:
        path = Path(log)
        if not path.is_file():
            raise LogError(f"no log at {log}")
        run = [json.loads(line) for line in path.read_text().splitlines() if "val_psnr_widest" in line]
        if not run:
            raise LogError(f"no validation records (val_psnr_widest) in {log}")
        starts.append(offset)
        records += [{**record, "step": record["step"] + offset, "run": log} for record in run]
        offset = records[-1]["step"]
    return records, starts


def plot(records: list[dict], starts: list[int], out: Path) -> None:
    """Widest and slimmest validation PSNR per sigma against step; run starts as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [record["step"] for record in records]
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
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--log", nargs="+", default=[], metavar="PATH",
                        help="log.jsonl of each stage-1 run, in run order")
    parser.add_argument("--out", default="benchmarks/results/supernet_curve.png")
    args = parser.parse_args()
    try:
        records, starts = read_runs(args.log)
    except LogError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    plot(records, starts, Path(args.out))
    for record in records:
        print(record["step"], record["run"], record["val_psnr_widest"], record["val_psnr_slimmest"])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
