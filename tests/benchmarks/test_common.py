"""The benchmarks' shared helpers, target checks and table rendering, on synthetic numbers (no model runs)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from benchmarks import common, quality, serve, tables, targets, training_curve
from model import Subnet

ROOT = Path(__file__).resolve().parents[2]


def quality_report(best_psnr: float = 31.5, auto_psnr: float = 31.46, auto_mflops: float = 0.25,
                   fast_psnr: float = 31.2, ffdnet_psnr: float = 31.4, cbm3d_psnr: float = 31.1) -> dict:
    """A quality.json with sub-networks 0 (widest, 0.5 MFLOPs/px) and 1 (slimmest), FFDNet and CBM3D at sigma 25."""
    def row(psnr: float, mflops: float) -> dict:
        return {"psnr": psnr, "mflops_per_pixel": mflops, "images_per_second": 1.0}

    results = {"25": {"subnet_0": row(best_psnr, 0.5), "subnet_1": row(fast_psnr, 0.1), "best": row(best_psnr, 0.5),
                      "fast": row(fast_psnr, 0.1), "auto": {**row(auto_psnr, auto_mflops), "subnet_histogram": [1, 6]}}}
    peers = {"25": {"FFDNet": row(ffdnet_psnr, 0.43), "CBM3D": {"psnr": cbm3d_psnr, "images_per_second": 0.03}}}
    return {"command": "python -m benchmarks.quality", "results": results, "peers": peers}


@pytest.fixture
def readyz_server():
    """An HTTP server on a free port whose ``/readyz`` answers the status in ``state["status"]``."""
    state = {"status": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(state["status"] if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], state
    server.shutdown()
    server.server_close()


def test_free_port_can_be_bound():
    port = common.free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()


def test_write_report_creates_parents_and_writes_json(tmp_path, capsys):
    path = tmp_path / "nested" / "deeper" / "report.json"
    report = {"sigma": 25, "psnr": [31.5, 31.4], "name": "σ"}
    assert common.write_report(path, report) == path
    text = path.read_text()
    assert json.loads(text) == report
    assert text.endswith("}\n") and text.startswith('{\n  "sigma"')
    assert capsys.readouterr().out == f"wrote {path}\n"


def test_wait_ready_returns_on_200_and_accepts_a_url(readyz_server):
    port, _ = readyz_server
    common.wait_ready(port, timeout=5)
    common.wait_ready(f"http://127.0.0.1:{port}/", timeout=5)


def test_wait_ready_times_out_while_not_ready(readyz_server):
    port, state = readyz_server
    state["status"] = 503
    with pytest.raises(TimeoutError, match="readyz"):
        common.wait_ready(port, timeout=0.5)


def test_wait_ready_reports_a_dead_server_with_its_exit_status():
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait(timeout=30)
    with pytest.raises(RuntimeError, match="exited with status 3"):
        common.wait_ready(common.free_port(), timeout=30, server=dead)


def test_start_server_runs_the_service_cli(tmp_path):
    """A missing checkpoint makes ``service.cli serve`` exit 2, which wait_ready reports at once."""
    port = common.free_port()
    server = common.start_server(str(tmp_path / "missing.safetensors"), port)
    try:
        assert server.args[1:3] == ["-m", "service.cli"] and server.args[0] == sys.executable
        assert server.args[server.args.index("--port") + 1] == str(port)
        with pytest.raises(RuntimeError, match="exited with status 2"):
            common.wait_ready(port, timeout=60, server=server)
    finally:
        common.stop_server(server)


def test_running_server_serves_a_checkpoint_and_stops_it(tiny_checkpoint):
    with common.running_server(tiny_checkpoint, env={"DDSNET_MAX_BATCH_TILES": "1"}, timeout=120) as base:
        assert httpx.get(f"{base}/readyz").status_code == 200
        assert httpx.get(f"{base}/info").json()["batching"]["max_batch_tiles"] == 1
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/readyz", timeout=2)


def test_quality_targets_all_met_at_the_bars():
    report = quality_report(best_psnr=31.5, auto_psnr=31.5 - targets.AUTO_MAX_DROP_DB,
                            auto_mflops=0.5 * targets.AUTO_MAX_FLOPS_FRACTION,
                            ffdnet_psnr=31.5 - targets.BEST_MIN_GAIN_OVER_FFDNET_DB,
                            fast_psnr=31.2, cbm3d_psnr=31.2 - targets.FAST_MIN_GAIN_OVER_CBM3D_DB)
    checks = quality.check_targets(report["results"], report["peers"])
    assert len(checks) == 4
    assert all(check["met"] for check in checks.values()), checks


def test_quality_targets_each_missed_just_past_its_bar():
    report = quality_report(best_psnr=31.5, auto_psnr=31.5 - targets.AUTO_MAX_DROP_DB - 0.001,
                            auto_mflops=0.5 * targets.AUTO_MAX_FLOPS_FRACTION + 0.001,
                            ffdnet_psnr=31.501 - targets.BEST_MIN_GAIN_OVER_FFDNET_DB,
                            fast_psnr=31.2, cbm3d_psnr=31.201 - targets.FAST_MIN_GAIN_OVER_CBM3D_DB)
    checks = quality.check_targets(report["results"], report["peers"])
    assert not any(check["met"] for check in checks.values()), checks


def test_quality_targets_follow_the_constants(monkeypatch):
    report = quality_report(best_psnr=31.5, auto_psnr=31.4, auto_mflops=0.35)
    checks = quality.check_targets(report["results"], report["peers"])
    assert not checks["auto within 0.05 dB of best"]["met"] and not checks["auto FLOPs <= 60% of best"]["met"]
    monkeypatch.setattr(targets, "AUTO_MAX_DROP_DB", 0.2)
    monkeypatch.setattr(targets, "AUTO_MAX_FLOPS_FRACTION", 0.75)
    checks = quality.check_targets(report["results"], report["peers"])
    assert checks["auto within 0.2 dB of best"] == {"value": 31.4, "bar": 31.3, "met": True}
    assert checks["auto FLOPs <= 75% of best"] == {"value": 0.35, "bar": 0.375, "met": True}
    assert quality.targets_key() == "targets_sigma_25"


def test_quality_targets_need_ffdnet_and_skip_cbm3d_when_not_run():
    report = quality_report()
    assert quality.check_targets(report["results"], {}) == {}
    del report["peers"]["25"]["CBM3D"]
    assert "fast >= CBM3D" not in quality.check_targets(report["results"], report["peers"])


def test_serve_targets_hold_http_to_the_cli_path_and_saturation_to_the_model():
    report = {"in_process": {"model": {"mpix_per_s": 1.0}, "cli_path": {"mpix_per_s": 0.8}},
              "http": [{"concurrency": 1, "mpix_per_s": 0.76}, {"concurrency": 16, "mpix_per_s": 0.95}],
              "ready_seconds": 30.0}
    checks = list(serve.check_targets(report).values())
    assert [c["value"] for c in checks] == [0.95, 0.95, 30.0]
    assert [c["met"] for c in checks] == [0.95 >= targets.SERVE_MIN_FRACTION_OF_CLI,
                                          0.95 >= targets.SERVE_MIN_FRACTION_OF_RAW, True]
    report["http"][0]["mpix_per_s"], report["ready_seconds"] = 0.5, targets.SERVE_MAX_READY_SECONDS + 1
    checks = list(serve.check_targets(report).values())
    assert checks[0]["met"] is False and checks[2]["met"] is False


def test_load_summary_counts_statuses_latency_and_psnr_against_unloaded():
    import io

    import numpy as np
    import torch
    from PIL import Image

    from benchmarks import load

    clean = torch.full((1, 3, 8, 8), 0.5)
    grey = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(grey, "PNG")
    records = [{"index": 0, "status": 200, "seconds": 1.0, "subnet": 2, "reason": "gate", "content": grey.getvalue()},
               {"index": 1, "status": 200, "seconds": 3.0, "subnet": 4, "reason": "load", "content": grey.getvalue()},
               {"index": 0, "status": 503, "seconds": 0.1}, {"index": 1, "status": 0, "seconds": 9.0}]
    expected = load.answer_psnr(grey.getvalue(), clean)
    row = load.summarize(records, 2.0, [(b"", clean), (b"", clean)], {0: expected + 0.2, 1: expected})
    assert row["goodput_per_s"] == 1.0 and row["answered_share"] == 0.5
    assert row["share_503"] == 0.25 and row["share_other_errors"] == 0.25
    assert row["downgraded_share"] == 0.5 and row["subnets"] == {"2": 1, "4": 1}
    assert row["p50_s"] == 2.0 and row["psnr_loss_vs_unloaded"] == 0.1


def test_quality_table_renders_rows_and_targets():
    table = tables.quality_table(quality_report(auto_psnr=31.3))
    lines = table.splitlines()
    assert lines[0] == "| method | MFLOPs/px | PSNR σ=25 | images/s (σ=25) |"
    assert "| ddsnet best | 0.500 | 31.50 | 1.00 |" in lines
    assert "| CBM3D | n/a | 31.10 | 0.03 |" in lines
    assert "| FFDNet | 0.430 | 31.40 | 1.00 |" in lines
    assert "`auto` picked sub-networks (count per index, widest first): σ=25: [1, 6]" in lines
    assert "| auto within 0.05 dB of best | 31.3 | 31.45 | missed |" in lines
    assert "| best >= FFDNet | 31.5 | 31.4 | met |" in lines


def test_subnet_table_renders_the_checkpoint_rows():
    subnets = [Subnet((8, 16), 0.5, {"25": 31.5, "15": 34.0}), Subnet((4, 8), 0.125, {"25": 31.0, "15": 33.5})]
    lines = tables.subnet_table(subnets).splitlines()
    assert lines[0] == "| # | MFLOPs/px | of widest | val PSNR σ=15 | val PSNR σ=25 | widths |"
    assert lines[3] == "| 1 | 0.125 | 25.0% | 33.50 | 31.00 | 4, 8 |"


def test_subnet_table_of_two_profiles_names_each_rows_profile_and_its_noises():
    subnets = [Subnet((8, 16), 0.5, {"25": 31.5, "15": 34.0}),
               Subnet((8, 16), 0.5, {"25": 31.7, "jpeg80-awgn15": 29.7, "down0.7-awgn30": 31.2}, "compressed")]
    lines = tables.subnet_table(subnets).splitlines()
    assert lines[0] == ("| # | profile | MFLOPs/px | of widest | val PSNR σ=15 | val PSNR σ=25 | "
                        "val PSNR jpeg80-awgn15 | val PSNR down0.7-awgn30 | widths |")
    assert lines[2] == "| 0 | white | 0.500 | 100.0% | 34.00 | 31.50 | n/a | n/a | 8, 16 |"
    assert lines[3] == "| 1 | compressed | 0.500 | 100.0% | n/a | 31.70 | 29.70 | 31.20 | 8, 16 |"


def test_tables_reads_the_subnet_table_from_the_checkpoint(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    common.write_report(tmp_path / "quality.json", quality_report())
    monkeypatch.setattr(sys, "argv", ["tables", "--checkpoint", tiny_checkpoint, "--results", str(tmp_path)])
    assert tables.main() == 0
    out = capsys.readouterr().out
    assert "| # | MFLOPs/px | of widest | val PSNR σ=25 | widths |" in out
    assert "| 2 | " in out and "| 3 | " not in out
    assert "### quality.json (`python -m benchmarks.quality`)" in out and "| ddsnet auto |" in out


def test_tables_without_a_checkpoint_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["tables", "--checkpoint", str(tmp_path / "missing.safetensors")])
    assert tables.main() == 1
    assert capsys.readouterr().err.startswith("error: checkpoint not found")


def test_training_curve_lays_runs_end_to_end(tmp_path):
    logs = []
    for run, steps in enumerate(([100, 200], [50])):
        path = tmp_path / f"run{run}" / "log.jsonl"
        path.parent.mkdir()
        records = [{"step": 1, "loss": 0.1}] + [{"step": s, "val_psnr_widest": {"25": 30.0},
                                                 "val_psnr_slimmest": {"25": 29.0}} for s in steps]
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
        logs.append(str(path))
    records, starts = training_curve.read_runs(logs)
    assert [record["step"] for record in records] == [100, 200, 250]
    assert starts == [0, 200]


@pytest.mark.parametrize("arguments", [[], ["--log", "no/such/log.jsonl"]])
def test_training_curve_without_logs_exits_1_with_one_line(arguments, tmp_path):
    completed = subprocess.run([sys.executable, "-m", "benchmarks.training_curve", *arguments,
                                "--out", str(tmp_path / "curve.png")], cwd=ROOT, capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 1
    assert len(completed.stderr.splitlines()) == 1 and completed.stderr.startswith("error: ")
    assert not (tmp_path / "curve.png").exists()


def _val_gap(auto_awgn: float, best_awgn: float, auto_jpeg: float) -> dict:
    return {"scales": {"1": {"results": {"25": {"auto": auto_awgn, "best": best_awgn},
                                         "jpeg80-awgn15": {"auto": auto_jpeg, "best": auto_jpeg}}}}}


def test_ship_needs_awgn_held_and_auto_better_on_the_mean_of_validation():
    from benchmarks.ship import decide

    shipped = _val_gap(35.00, 35.10, 30.00)
    assert decide(_val_gap(34.96, 35.06, 31.00), shipped)[0]  # AWGN within 0.05 dB, JPEG much better
    assert not decide(_val_gap(34.90, 35.10, 31.00), shipped)[0]  # auto lost 0.10 dB on AWGN
    assert not decide(_val_gap(35.00, 35.10, 29.90), shipped)[0]  # nothing lost, nothing gained
    with pytest.raises(ValueError, match="share no"):
        decide({"scales": {"0.5": {"results": {}}}}, shipped)


def test_noise_table_has_one_row_per_noise_with_ffdnet_at_the_rms():
    report = quality_report(auto_psnr=31.3)
    report["results"]["jpeg80-awgn15"] = {m: {"psnr": 28.0, "mflops_per_pixel": 0.2} for m in ("auto", "best", "fast")}
    report["results"]["jpeg80-awgn15"]["noisy"] = {"psnr": 27.3, "noise_rms": 10.6}
    report["peers"]["jpeg80-awgn15"] = {"FFDNet": {"psnr": 30.5}}
    rows = tables.noise_table(report).splitlines()[2:]
    assert rows[0].startswith("| AWGN σ=25 |")
    assert rows[-1] == "| jpeg80-awgn15 | 27.30 | 28.00 | 28.00 | 28.00 | 30.50 | -2.50 |"


def test_the_mixed_load_summary_splits_by_size_class_and_checks_the_small_photos():
    from benchmarks import load

    records = [{"class": "small", "status": 200, "seconds": 0.2}, {"class": "small", "status": 200, "seconds": 0.4},
               {"class": "small", "status": 503, "seconds": 0.01}, {"class": "large", "status": 200, "seconds": 9.0},
               {"class": "large", "status": 429, "seconds": 0.01}]
    rows = load.summarize_classes(records, 2.0, {"small": 0.25, "large": 20.0})
    assert rows["small"]["statuses"] == {"200": 2, "503": 1} and rows["small"]["refused"] == 1
    assert rows["small"]["p50_s"] == 0.3 and rows["small"]["goodput_mpix_per_s"] == 0.25
    assert rows["large"]["refused"] == 1 and rows["large"]["goodput_per_s"] == 0.5
    report = {"small_alone_p50_s": 0.5, "runs": [{"fair_share": True, "classes": rows}]}
    checks = list(load.check_mixed(report).values())
    assert [check["bar"] for check in checks] == [max(targets.MIXED_SMALL_MAX_S, 5.0), 1]
    assert all(check["met"] for check in checks)
    rows["large"]["statuses"] = {"429": 1}
    assert not list(load.check_mixed(report).values())[1]["met"]


def test_the_overload_targets_compare_shedding_with_giving_up_width_alone():
    from benchmarks import load

    def row(mode: str, goodput: float, p95: float, errors: float = 0.0) -> dict:
        return {"controller": mode, "load": 2, "goodput_per_s": goodput, "p95_s": p95, "share_other_errors": errors,
                "psnr_loss_vs_unloaded": 0.2}

    report = {"latency_target_ms": 2000, "runs": [row("width", 8.0, 17.6), row("shed", 8.4, 2.2)]}
    checks = load.check(report)
    assert [check["met"] for check in checks.values()] == [True, True, True, True]
    assert checks["goodput >= 1x width-only"]["value"] == 1.05
    report["runs"][1] = row("shed", 7.0, 2.6, errors=0.01)
    assert [check["met"] for check in load.check(report).values()] == [False, False, False, True]
