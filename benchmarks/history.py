"""Print the shipped checkpoint's history (markdown): σ=25 quality at every commit that changed it.

    .venv/bin/python benchmarks/history.py

Each row is read from ``benchmarks/results/quality.json`` as committed together with the checkpoint, so
it needs this repository's git history (a shallow clone gives only the last row). Nothing is re-measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = "checkpoints/ddsnet-color.safetensors"
QUALITY = "benchmarks/results/quality.json"


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout


def shipped_commits() -> list[tuple[str, str]]:
    """(short hash, date) of every commit that changed the shipped checkpoint, oldest first."""
    log = git("log", "--reverse", "--format=%h %ad", "--date=short", "--", CHECKPOINT)
    return [tuple(line.split(" ", 1)) for line in log.splitlines() if line.strip()]


def history_row(report: dict) -> dict:
    """σ=25 figures of one quality report: PSNR of best, fast and auto, auto's FLOPs fraction, targets met."""
    results = report["results"]["25"]
    best, fast, auto = (results[name] for name in ("best", "fast", "auto"))
    targets = report.get("targets_sigma_25", {})
    return {"best": best["psnr"], "fast": fast["psnr"], "auto": auto["psnr"],
            "auto_flops_fraction": auto["mflops_per_pixel"] / best["mflops_per_pixel"],
            "subnets": sum(1 for name in results if name.startswith("subnet_")),
            "targets_met": sum(1 for check in targets.values() if check["met"]), "targets": len(targets)}


def main() -> int:
    try:
        commits = shipped_commits()
    except (OSError, subprocess.CalledProcessError) as error:
        print(f"error: cannot read the git history of {ROOT}: {error}", file=sys.stderr)
        return 1
    peers = json.loads((ROOT / QUALITY).read_text())["peers"]["25"]
    print(f"FFDNet {peers['FFDNet']['psnr']:.2f} dB and CBM3D {peers['CBM3D']['psnr']:.2f} dB at σ=25.\n")
    print("| # | commit | date | K | best | fast | auto | auto FLOPs / best's | targets met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for number, (commit, date) in enumerate(commits, 1):
        try:
            row = history_row(json.loads(git("show", f"{commit}:{QUALITY}")))
        except subprocess.CalledProcessError:
            print(f"| {number} | `{commit}` | {date} | no {QUALITY} in this commit |" + " |" * 5)
            continue
        print(f"| {number} | `{commit}` | {date} | {row['subnets']} | {row['best']:.2f} | {row['fast']:.2f} | "
              f"{row['auto']:.2f} | {100 * row['auto_flops_fraction']:.1f}% | "
              f"{row['targets_met']} of {row['targets']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
