"""Print the README's result tables (markdown) from the benchmark JSONs.

    .venv/bin/python benchmarks/tables.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GATE_REPORT = Path(__file__).resolve().parent.parent / "checkpoints" / "logs" / "gate_report.json"


def quality_table(report: dict) -> str:
    sigmas = list(report["results"])
    methods = ["auto", "fast", "best"] + sorted(m for m in report["results"][sigmas[0]] if m.startswith("subnet_"))
    lines = ["| method | MFLOPs/px | " + " | ".join(f"PSNR σ={s}" for s in sigmas) + " | images/s (σ=25) |",
             "|---|---|" + "---|" * len(sigmas) + "---|"]
    for method in methods:
        rows = [report["results"][s][method] for s in sigmas]
        mflops = sum(r["mflops_per_pixel"] for r in rows) / len(rows)
        speed = report["results"].get("25", report["results"][sigmas[0]])[method]["images_per_second"]
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
            if row and s == "25":
                speed = f"{row['images_per_second']:.2f}"
        lines.append(f"| {peer} | {mflops} | " + " | ".join(cells) + f" | {speed} |")
    histogram = {s: report["results"][s]["auto"].get("width_histogram") for s in sigmas}
    lines.append("")
    lines.append("`auto` picked sub-networks (count per index, widest first): "
                 + "; ".join(f"σ={s}: {h}" for s, h in histogram.items()))
    if report.get("targets_sigma_25"):
        lines.append("")
        lines.append("| target at σ=25 | value | bar | met |")
        lines.append("|---|---|---|---|")
        for name, check in report["targets_sigma_25"].items():
            lines.append(f"| {name} | {check['value']} | {check['bar']} | {'yes' if check['met'] else 'no'} |")
    return "\n".join(lines)


def gate_table(report: dict) -> str:
    """The validation delta sweep of stage 3; the shipped row in bold."""
    shipped = report["shipped"]["delta_db"]
    lines = ["| δ (dB) | accuracy | auto PSNR | auto MFLOPs/px | oracle PSNR | oracle MFLOPs/px |",
             "|---|---|---|---|---|---|"]
    for row in report["delta_sweep"]:
        delta = f"**{row['delta_db']:g} (ships)**" if row["delta_db"] == shipped else f"{row['delta_db']:g}"
        lines.append(f"| {delta} | {row['accuracy']:.2f} | {row['auto_psnr']:.2f} | "
                     f"{row['auto_mflops_per_pixel']:.3f} | {row['oracle_psnr']:.2f} | "
                     f"{row['oracle_mflops_per_pixel']:.3f} |")
    row = report["shipped"]
    lines += ["", f"`best` {row['best_psnr']:.2f} dB at {row['best_mflops_per_pixel']:.3f} MFLOPs/px, "
              f"`fast` {row['fast_psnr']:.2f} at {row['fast_mflops_per_pixel']:.3f}; shipped by "
              f"`{report.get('shipped_rule', 'delta_db')}`; confusion matrix of the shipped gate (rows: label, "
              f"columns: pick): {row['confusion_matrix_label_by_pick']}"]
    if len(row.get("by_scale", {})) > 1:
        lines += ["", "Shipped gate per validation view: " + "; ".join(
            f"scale {scale}: auto {v['auto_psnr']:.2f}, best {v['best_psnr']:.2f}, fast {v['fast_psnr']:.2f} dB, "
            f"auto {v['auto_mflops_per_pixel']:.3f} MFLOPs/px" for scale, v in row["by_scale"].items())]
    return "\n".join(lines)


def val_gap_table(report: dict) -> str:
    """Ours vs FFDNet on the validation photos, per view scale and sigma."""
    lines = ["| view | σ | best | auto | fast | FFDNet | best − FFDNet |", "|---|---|---|---|---|---|---|"]
    for scale, view in report["scales"].items():
        for sigma, row in view["results"].items():
            lines.append(f"| scale {scale} | {sigma} | {row['best']:.2f} | {row['auto']:.2f} | {row['fast']:.2f} | "
                         f"{row['FFDNet']:.2f} | {row['best - FFDNet']:+.2f} |")
    return "\n".join(lines)


def serve_table(report: dict) -> str:
    raw = report["raw_loop"]
    lines = ["| run | concurrency | MPix/s | vs raw | p50 s | p95 s | p99 s |", "|---|---|---|---|---|---|---|",
             f"| raw model loop (no HTTP) | 1 | {raw['mpix_per_s']:.3f} | 1.00 | {raw['p50']} | {raw['p95']} | "
             f"{raw['p99']} |"]
    for row in report["http"]:
        name = f"HTTP, batching {'on (4 tiles)' if row['batching'] else 'off'}"
        lines.append(f"| {name} | {row['concurrency']} | {row['mpix_per_s']:.3f} | {row['vs_raw']:.2f} | "
                     f"{row['p50']} | {row['p95']} | {row['p99']} |")
    return "\n".join(lines)


def main() -> int:
    for name, render in (("quality.json", quality_table), ("serve.json", serve_table),
                         ("val_gap.json", val_gap_table)):
        path = RESULTS / name
        if path.is_file():
            report = json.loads(path.read_text())
            print(f"### {name} (`{report['command']}`)\n")
            print(render(report))
            print()
    if GATE_REPORT.is_file():
        print(f"### {GATE_REPORT.name} (stage 3, validation)\n")
        print(gate_table(json.loads(GATE_REPORT.read_text())))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
