"""Print the result tables (markdown): the checkpoint's sub-network table and the benchmark JSONs.

    .venv/bin/python -m benchmarks.tables [--checkpoint PATH] [--results DIR]

The sub-network table (widths, MFLOPs per pixel, validation PSNR) is read from the checkpoint's own metadata.
The others are rendered from ``quality.json``, ``speed.json``, ``serve.json``, ``load.json``,
``val_gap_texture.json``, ``val_gap.json``, ``profiles.json`` and ``profiles_test.json`` in ``--results`` where
they exist, with the targets each benchmark judged met or missed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks import targets
from benchmarks.common import argument_parser
from benchmarks.quality import check_targets
from model import DEFAULT_CHECKPOINT, CheckpointError, Subnet, load_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"


def _is_sigma(label: str) -> bool:
    try:
        float(label)
    except ValueError:
        return False
    return True


def subnet_table(subnets: list[Subnet]) -> str:
    """The checkpoint's sub-network table: its profile (where there are several), MFLOPs per pixel, share of
    the widest's, validation PSNR (AWGN sigmas in order, then the other noises as the rows list them),
    widths."""
    labels = list(dict.fromkeys(label for subnet in subnets for label in subnet.val_psnr))
    labels = sorted(filter(_is_sigma, labels), key=float) + [label for label in labels if not _is_sigma(label)]
    profiles = len({subnet.profile for subnet in subnets}) > 1
    widest = max(subnet.mflops_per_pixel for subnet in subnets)
    heads = [f"val PSNR σ={label}" if _is_sigma(label) else f"val PSNR {label}" for label in labels]
    lines = ["| # | " + ("profile | " if profiles else "") + "MFLOPs/px | of widest | " + " | ".join(heads)
             + " | widths |",
             "|---|" + ("---|" if profiles else "") + "---|---|" + "---|" * len(labels) + "---|"]
    for index, subnet in enumerate(subnets):
        psnrs = " | ".join(f"{subnet.val_psnr[s]:.2f}" if s in subnet.val_psnr else "n/a" for s in labels)
        profile = f"{subnet.profile} | " if profiles else ""
        share = f"{100 * subnet.mflops_per_pixel / widest:.1f}%"
        lines.append(f"| {index} | {profile}{subnet.mflops_per_pixel:.3f} | {share} | {psnrs} | "
                     f"{', '.join(map(str, subnet.widths))} |")
    return "\n".join(lines)


def quality_table(report: dict) -> str:
    """ddsnet's qualities, its sub-networks and the peers per sigma, then the targets, met or missed."""
    sigmas = list(report["results"])
    speed_sigma = f"{targets.TARGET_SIGMA:g}" if f"{targets.TARGET_SIGMA:g}" in sigmas else sigmas[0]
    methods = ["auto", "fast", "best"] + sorted((m for m in report["results"][sigmas[0]] if m.startswith("subnet_")),
                                                 key=lambda m: int(m.split("_")[1]))
    heads = [f"PSNR σ={s}" if _is_sigma(s) else f"PSNR {s}" for s in sigmas]
    lines = ["| method | MFLOPs/px | " + " | ".join(heads) + f" | images/s (σ={speed_sigma}) |",
             "|---|---|" + "---|" * len(sigmas) + "---|"]
    for method in methods:
        rows = [report["results"][s][method] for s in sigmas]
        mflops = sum(r["mflops_per_pixel"] for r in rows) / len(rows)
        speed = report["results"][speed_sigma][method]["images_per_second"]
        lines.append(f"| ddsnet {method} | {mflops:.3f} | " + " | ".join(f"{r['psnr']:.2f}" for r in rows)
                     + f" | {speed:.2f} |")
    peers = sorted({p for s in sigmas for p in report.get("peers", {}).get(s, {})})
    for peer in peers:
        cells, mflops, speed = [], "n/a", "n/a"
        for s in sigmas:
            row = report["peers"].get(s, {}).get(peer)
            cells.append(f"{row['psnr']:.2f}" if row else "not run")
            if row and row.get("mflops_per_pixel"):
                mflops = f"{row['mflops_per_pixel']:.3f}"
            if row and s == speed_sigma:
                speed = f"{row['images_per_second']:.2f}"
        lines.append(f"| {peer} | {mflops} | " + " | ".join(cells) + f" | {speed} |")
    auto = {s: report["results"][s]["auto"] for s in sigmas}
    histogram = {s: row.get("subnet_histogram", row.get("width_histogram")) for s, row in auto.items()}
    lines.append("")
    lines.append("`auto` picked sub-networks (count per index, widest first): "
                 + "; ".join(f"σ={s}: {h}" for s, h in histogram.items()))
    checks = check_targets(report["results"], report.get("peers", {}))
    if checks:
        lines += ["", f"| target at σ={targets.TARGET_SIGMA:g} | value | bar | met |", "|---|---|---|---|"]
        for name, check in checks.items():
            lines.append(f"| {name} | {check['value']} | {check['bar']} | {'met' if check['met'] else 'missed'} |")
    return "\n".join(lines)


def noise_label(key: str) -> str:
    """``"25"`` -> ``AWGN σ=25``; a named degradation stays as it is."""
    return f"AWGN σ={key}" if key.replace(".", "", 1).isdigit() else key


def val_gap_table(report: dict) -> str:
    """Ours vs FFDNet on the validation photos, per view scale and noise (FFDNet: the true sigma for AWGN,
    the noise's RMS for the other degradations)."""
    lines = ["| view | noise | noisy | best | auto | fast | FFDNet | auto − FFDNet |",
             "|---|---|---|---|---|---|---|---|"]
    for scale, view in report["scales"].items():
        for noise, row in view["results"].items():
            noisy = f"{row['noisy']:.2f}" if "noisy" in row else "n/a"
            lines.append(f"| scale {scale} | {noise_label(noise)} | {noisy} | {row['best']:.2f} | {row['auto']:.2f} | "
                         f"{row['fast']:.2f} | {row['FFDNet']:.2f} | {row['auto'] - row['FFDNet']:+.2f} |")
    return "\n".join(lines)


def noise_table(report: dict) -> str:
    """Per noise on the test photos: the input, ddsnet's three qualities and FFDNet (true sigma for AWGN,
    the noise's RMS for the other degradations)."""
    lines = ["| noise | noisy input | ddsnet `auto` | `best` | `fast` | FFDNet | auto − FFDNet |",
             "|---|---|---|---|---|---|---|"]
    for noise, methods in report["results"].items():
        peer = report.get("peers", {}).get(noise, {}).get("FFDNet")
        noisy = methods.get("noisy", {}).get("psnr")
        cells = [f"{noisy:.2f}" if noisy is not None else "n/a"] + [
            f"{methods[m]['psnr']:.2f}" for m in ("auto", "best", "fast")]
        cells += [f"{peer['psnr']:.2f}", f"{methods['auto']['psnr'] - peer['psnr']:+.2f}"] if peer else ["not run"] * 2
        lines.append(f"| {noise_label(noise)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profiles_table(report: dict) -> str:
    """Per noise, from benchmarks.profiles: the input, the checkpoint's ``auto`` and ``best``, ``auto`` on the
    upload sent as a ``.jpg`` where the noise is a JPEG, FFDNet (true sigma for AWGN, the noise's RMS
    otherwise), the profiles the gate chose and what the choice cost against the better profile."""
    names = report["profiles"]
    lines = ["| noise | noisy | best | auto | auto, sent as .jpg | FFDNet | auto − FFDNet | chosen ("
             + " / ".join(names) + ") | right | regret mean / max (dB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for noise, row in report["results"].items():
        jpg = f"{row['auto as .jpg']:.2f}" if "auto as .jpg" in row else ""
        chosen = " / ".join(str(row["auto profiles"][name]) for name in names)
        lines.append(f"| {noise_label(noise)} | {row['noisy']:.2f} | {row['best']:.2f} | {row['auto']:.2f} | {jpg} | "
                     f"{row['FFDNet']:.2f} | {row['auto - FFDNet']:+.2f} | {chosen} | {row['profile right']:.2f} | "
                     f"{row['regret mean (dB)']:.3f} / {row['regret max (dB)']:.3f} |")
    return "\n".join(lines)


def target_lines(checks: dict, prefix: str = "") -> list[str]:
    """One markdown bullet per target: ``- NAME: VALUE (met|missed)``."""
    return [f"- {prefix}{name}: {check['value']} ({'met' if check['met'] else 'missed'})"
            for name, check in checks.items()]


def serve_table(report: dict) -> str:
    """In-process and every HTTP run, then the serving targets, met or missed."""
    lines = ["| run | concurrency | MPix/s | vs model | vs CLI path | p50 s | p95 s | p99 s |",
             "|---|---|---|---|---|---|---|---|"]
    model, cli = report["in_process"]["model"], report["in_process"]["cli_path"]
    for name, row in (("in-process, model only", model), ("in-process, CLI path (decode, encode)", cli)):
        lines.append(f"| {name} | 1 | {row['mpix_per_s']:.3f} | {row['mpix_per_s'] / model['mpix_per_s']:.2f} | "
                     f"{row['mpix_per_s'] / cli['mpix_per_s']:.2f} | {row['p50']} | {row['p95']} | {row['p99']} |")
    for row in report["http"]:
        lines.append(f"| HTTP | {row['concurrency']} | {row['mpix_per_s']:.3f} | {row['vs_model']:.2f} | "
                     f"{row['vs_cli_path']:.2f} | {row['p50']} | {row['p95']} | {row['p99']} |")
    return "\n".join([*lines, "", *target_lines(report["targets"])])


def speed_table(report: dict) -> str:
    """The CLI path against FFDNet, then every backend per sub-network at 512x512, then the targets."""
    lines = ["| method | MPix/s | vs FFDNet | GFLOP/s |", "|---|---|---|---|"]
    for method in ("best", "auto", "fast", "FFDNet"):
        row = report["cli_path"][method]
        gflops = f"{row['gflop_per_s']:.0f}" if "gflop_per_s" in row else ""
        lines.append(f"| {method} | {row['mpix_per_s']:.3f} | {row.get('vs_ffdnet', 1.0):.2f} | {gflops} |")
    chosen = {row["subnet"]: row["backend"] for row in report["engines"]["subnets"]}
    names = list(report["backends"][0]["seconds"])
    lines += ["", "| sub-network | FLOPs share | " + " | ".join(names) + " | chosen | time share vs FLOPs |",
              "|---|---|" + "---|" * len(names) + "---|---|"]
    for row in report["backends"]:
        cells = " | ".join(f"{row['seconds'][name]:.3f}" for name in names)
        lines.append(f"| {row['subnet']} | {row['flops_fraction']:.3f} | {cells} | {chosen[row['subnet']]} | "
                     f"{report['time_vs_flops'][str(row['subnet'])]:+.0%} |")
    return "\n".join([*lines, "", *target_lines(report["targets"])])


def load_table(report: dict) -> str:
    """Every load run, per controller mode (off, width only, shedding), then the targets at 2x."""
    lines = [f"Latency target {report['latency_target_ms']:g} ms; `auto` sustains {report['sustained_per_s']} "
             f"answers/s; unloaded `auto` {report['unloaded_psnr']:.2f} dB.", "",
             "| controller | load | goodput/s | answered | 503 | p50 s | p95 s | p99 s | downgraded | PSNR | loss dB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["runs"]:
        lines.append(f"| {row['controller']} | {row['load']:g}x | {row['goodput_per_s']:.2f} | "
                     f"{row['answered_share']:.1%} | {row['share_503']:.1%} | {row.get('p50_s', '')} | "
                     f"{row.get('p95_s', '')} | {row.get('p99_s', '')} | {row['downgraded_share']:.0%} | "
                     f"{row.get('mean_psnr', '')} | {row.get('psnr_loss_vs_unloaded', '')} |")
    return "\n".join([*lines, "", *target_lines(report["targets"], "at 2x, server defaults, ")])


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--results", default=str(RESULTS), help="folder of the benchmark JSONs")
    args = parser.parse_args()
    try:
        subnets = load_checkpoint(args.checkpoint).subnets
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"### Sub-networks of {args.checkpoint} (validation PSNR from its metadata)\n")
    print(subnet_table(subnets))
    print()
    for name, render in (("quality.json", quality_table), ("quality.json", noise_table),
                         ("speed.json", speed_table), ("serve.json", serve_table), ("load.json", load_table),
                         ("val_gap_texture.json", val_gap_table), ("val_gap.json", val_gap_table),
                         ("profiles.json", profiles_table), ("profiles_test.json", profiles_table)):
        path = Path(args.results) / name
        if path.is_file():
            report = json.loads(path.read_text())
            print(f"### {name} (`{report['command']}`)\n")
            print(render(report))
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
