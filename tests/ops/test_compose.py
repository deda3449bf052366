"""The compose file, Dockerfile and Grafana provisioning, checked for structure (no Docker engine here)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_ports_and_images():
    services = COMPOSE["services"]
    assert {"app", "proxy", "prometheus", "grafana", "app-gpu"} <= set(services)
    assert services["app"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert "ports" not in services["app"], "replicas must not bind a host port, or --scale app=3 fails"
    assert services["proxy"]["ports"] == ["8000:8080"]
    assert services["prometheus"]["ports"] == ["9090:9090"]
    assert services["grafana"]["ports"] == ["3000:3000"]


def test_mounted_paths_exist():
    for name, service in COMPOSE["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    assert (ROOT / COMPOSE["services"]["app"]["build"]["dockerfile"]).is_file()


def test_healthchecks_hit_readyz():
    check = COMPOSE["services"]["app"]["healthcheck"]
    assert "/readyz" in " ".join(check["test"])
    dockerfile = (ROOT / "docker/Dockerfile").read_text()
    assert "HEALTHCHECK" in dockerfile and "/readyz" in dockerfile
    assert "\nUSER ddsnet" in dockerfile and "ARG BASE_IMAGE=python:3.11-slim" in dockerfile
    assert "torch==2.13.0" in dockerfile and "whl/cpu" in dockerfile
    assert COMPOSE["services"]["proxy"]["depends_on"]["app"]["condition"] == "service_healthy"


def test_gpu_profile_reserves_an_nvidia_device():
    gpu = COMPOSE["services"]["app-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["environment"]["DDSNET_DEVICE"] == "cuda"


def test_prometheus_discovers_replicas_by_dns():
    config = yaml.safe_load((ROOT / "docker/prometheus/prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["job_name"] == "ddsnet"
    assert job["dns_sd_configs"][0]["names"] == ["app"] and job["dns_sd_configs"][0]["port"] == 8000


def test_grafana_provisioning_uses_a_fixed_datasource_uid_and_no_inputs():
    datasource = yaml.safe_load((ROOT / "docker/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    provider = yaml.safe_load((ROOT / "docker/grafana/provisioning/dashboards/ddsnet.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    text = (ROOT / "docker/grafana/dashboards/ddsnet.json").read_text()
    assert "${DS_" not in text and "__inputs" not in text
    dashboard = json.loads(text)
    assert len(dashboard["panels"]) >= 10
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid
        assert all(target["datasource"]["uid"] == uid for target in panel["targets"])


@pytest.mark.parametrize(("nameserver", "resolver"), [("10.89.0.1", "10.89.0.1"), ("fd00::1", "[fd00::1]"),
                                                      ("127.0.0.11", "127.0.0.11")])
def test_the_proxy_takes_its_resolver_from_resolv_conf(tmp_path, nameserver, resolver):
    (tmp_path / "resolv.conf").write_text(f"search dns.podman\nnameserver {nameserver}\nnameserver 8.8.8.8\n")
    env = {"PATH": os.environ["PATH"], "RESOLV_CONF": str(tmp_path / "resolv.conf"), "NGINX_CONF_DIR": str(tmp_path),
           "NGINX": "true"}
    subprocess.run(["sh", str(ROOT / "docker/nginx/start.sh")], env=env, check=True)
    assert (tmp_path / "resolver.conf").read_text() == f"resolver {resolver} valid=10s ipv6=off;\n"
    assert "include /etc/nginx/resolver.conf;" in (ROOT / "docker/nginx/nginx.conf").read_text()
    (tmp_path / "resolv.conf").write_text("search lan\n")
    failed = subprocess.run(["sh", str(ROOT / "docker/nginx/start.sh")], env=env, capture_output=True, text=True)
    assert failed.returncode == 1 and "no nameserver" in failed.stderr


def test_the_proxy_runs_the_resolver_script():
    proxy = COMPOSE["services"]["proxy"]
    assert proxy["command"] == ["/bin/sh", "/etc/nginx/start.sh"]
    assert "./docker/nginx/start.sh:/etc/nginx/start.sh:ro" in proxy["volumes"]
