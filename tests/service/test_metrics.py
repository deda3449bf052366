"""Metrics (service/metrics.py): one registry per app, base units, no ``_created`` series."""

from __future__ import annotations

from prometheus_client import generate_latest

from service.metrics import Metrics
from tests.service.conftest import metric_value


def test_every_app_counts_in_its_own_registry():
    first, second = Metrics(), Metrics()
    first.requests.labels("auto", "200").inc()
    first.rejections.labels("timeout").inc(2)
    one, other = (generate_latest(metrics.registry).decode() for metrics in (first, second))
    assert metric_value(one, "ddsnet_requests_total", quality="auto", status="200") == 1
    assert metric_value(one, "ddsnet_rejections_total", reason="timeout") == 2
    assert metric_value(other, "ddsnet_requests_total", quality="auto", status="200") == 0


def test_counters_have_no_created_series_and_the_process_is_exported():
    metrics = Metrics()
    metrics.flops.labels("0").inc(10)
    text = generate_latest(metrics.registry).decode()
    assert "_created" not in text and "process_cpu_seconds_total" in text
    assert metric_value(text, "ddsnet_flops_total", subnet="0") == 10
