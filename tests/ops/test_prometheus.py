"""A real Prometheus scrapes a real `ddsnet serve` under traffic; every dashboard expression returns data.

Needs Debian's `prometheus` package (`.ci/run` installs it); skipped with a reason where it is absent.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from benchmarks.common import wait_ready

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
needs_prometheus = pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="prometheus not installed")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool not installed")
def test_promtool_accepts_the_shipped_config():
    result = subprocess.run([PROMTOOL, "check", "config", str(ROOT / "docker/prometheus/prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads((ROOT / "docker/grafana/dashboards/ddsnet.json").read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


@needs_prometheus
def test_every_dashboard_expression_returns_data(tiny_checkpoint, tmp_path):
    app_port, prom_port = free_port(), free_port()
    env = {**os.environ, "DDSNET_TILE": "64", "DDSNET_MAX_WAIT_MS": "2", "OMP_NUM_THREADS": "1"}
    app = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(app_port), "--checkpoint",
                            tiny_checkpoint], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=(tmp_path / "app.log").open("w"))
    shipped = yaml.safe_load((ROOT / "docker/prometheus/prometheus.yml").read_text())
    job = shipped["scrape_configs"][0]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        # The shipped job, with DNS discovery swapped for the local process.
        "scrape_configs": [{"job_name": job["job_name"], "metrics_path": job["metrics_path"],
                            "static_configs": [{"targets": [f"127.0.0.1:{app_port}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'data'}",
                                   f"--web.listen-address=127.0.0.1:{prom_port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stop = threading.Event()
    sender = None
    try:
        try:
            wait_ready(app_port, 90, app)
        except (TimeoutError, RuntimeError):
            raise AssertionError(f"app exit={app.poll()} log={(tmp_path / 'app.log').read_text()[-2000:]}") from None
        wait_ready(prom_port, 90, path="/-/ready")
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 120, 3), dtype=np.uint8)).save(buffer, "PNG")
        image = buffer.getvalue()

        def traffic() -> None:
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    for quality in ("auto", "fast", "best"):
                        client.post(f"http://127.0.0.1:{app_port}/denoise", params={"quality": quality},
                                    files={"file": ("x.png", image, "image/png")})
                    client.post(f"http://127.0.0.1:{app_port}/denoise", files={"file": ("x.png", b"junk")})

        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        pending = {expr: title for title, expr in dashboard_expressions()}
        deadline = time.time() + 120
        while pending and time.time() < deadline:
            time.sleep(2)
            for expr in list(pending):
                answer = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/query", params={"query": expr}).json()
                assert answer["status"] == "success", (expr, answer)
                if answer["data"]["result"]:
                    pending.pop(expr)
        assert not pending, f"expressions with no data: {pending}"
    finally:
        stop.set()
        if sender is not None:  # let its last request finish before the app goes away
            sender.join(timeout=60)
        for process in (prometheus, app):
            process.terminate()
            process.wait(timeout=30)


def test_dashboard_names_only_metrics_the_app_exports(tiny_checkpoint):
    """Offline counterpart of the Prometheus test: every metric name in the dashboard is exported."""
    import re

    from fastapi.testclient import TestClient

    from service.app import build_app
    from service.settings import Settings

    with TestClient(build_app(Settings(checkpoint=tiny_checkpoint, warmup=False))) as client:
        exported = client.get("/metrics").text
    names = set(re.findall(r"^# TYPE (\S+) (\S+)", exported, re.MULTILINE))
    known = set()
    for name, _ in names:
        known |= {name, f"{name}_total", f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    for title, expr in dashboard_expressions():
        for metric in re.findall(r"\b((?:ddsnet|process)_[a-z_]+)", expr):
            assert metric in known, f"panel {title!r} uses {metric}, which the app does not export"
