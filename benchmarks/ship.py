"""Does a candidate checkpoint replace the shipped one? Decided on the validation photos only.

    .venv/bin/python -m benchmarks.ship CANDIDATE_VAL_GAP.json [--shipped benchmarks/results/val_gap.json]

Both files are reports of ``python -m benchmarks.val_gap`` (the validation photos at full and half size,
AWGN and the named degradations, fixed seeds). The candidate ships when:

- on AWGN, at every sigma and view scale, neither ``best`` nor ``auto`` falls more than
  ``benchmarks.targets.AWGN_MAX_DROP_DB`` below the shipped checkpoint's; and
- over every noise both reports measured, ``auto``'s mean PSNR is higher than the shipped one's.

The public test photos never enter this decision: ``benchmarks.quality`` measures them once a checkpoint has
shipped. Prints each comparison and the verdict; exits 0 when the candidate ships, 1 when it does not.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import targets
from benchmarks.common import argument_parser
from training.degradations import EVAL_DEGRADATIONS


def rows(report: dict) -> dict[tuple[str, str], dict]:
    """``(scale, noise) -> row`` of a val_gap report."""
    return {(scale, noise): row for scale, view in report["scales"].items() for noise, row in view["results"].items()}


def decide(candidate: dict, shipped: dict) -> tuple[bool, list[str]]:
    """The verdict, and one line per comparison that made it."""
    ours, theirs = rows(candidate), rows(shipped)
    common = sorted(ours.keys() & theirs.keys())
    if not common:
        raise ValueError("the two reports share no (scale, noise) row; run both with the same settings")
    lines, awgn_ok = [], True
    for key in common:
        if key[1] in EVAL_DEGRADATIONS and EVAL_DEGRADATIONS[key[1]][0] != "awgn":
            continue
        for method in ("best", "auto"):
            drop = theirs[key][method] - ours[key][method]
            ok = drop <= targets.AWGN_MAX_DROP_DB
            awgn_ok &= ok
            lines.append(f"scale {key[0]} sigma {key[1]} {method}: {ours[key][method]:.4f} vs shipped "
                         f"{theirs[key][method]:.4f} ({-drop:+.4f} dB): {'ok' if ok else 'too low'}")
    mean_ours = sum(ours[key]["auto"] for key in common) / len(common)
    mean_theirs = sum(theirs[key]["auto"] for key in common) / len(common)
    better = mean_ours > mean_theirs
    lines.append(f"auto, mean over {len(common)} rows: {mean_ours:.4f} vs shipped {mean_theirs:.4f} "
                 f"({mean_ours - mean_theirs:+.4f} dB): {'higher' if better else 'not higher'}")
    return awgn_ok and better, lines


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("candidate", help="the candidate's val_gap report")
    parser.add_argument("--shipped", default="benchmarks/results/val_gap.json", help="the shipped one's")
    args = parser.parse_args()
    candidate, shipped = (json.loads(Path(path).read_text()) for path in (args.candidate, args.shipped))
    ships, lines = decide(candidate, shipped)
    print("\n".join(lines))
    print("verdict: " + ("ship the candidate" if ships else "keep the shipped checkpoint"))
    return 0 if ships else 1


if __name__ == "__main__":
    raise SystemExit(main())
