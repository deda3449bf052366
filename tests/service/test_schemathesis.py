"""Schemathesis against a live ``ddsnet serve``: requests generated from the OpenAPI document, and its checks."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import CHECKS  # noqa: E402

from tests.service.test_uvicorn import live_server  # noqa: E402, F401  (the fixture)

EXAMPLES = 15  # per operation


def test_every_generated_request_gets_a_documented_answer(live_server):  # noqa: F811
    base, _, _ = live_server
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    # Bytes that the schema allows as a file are mostly not images: a 4xx is the right answer to them, so the
    # check that schema-valid data be accepted with a 2xx does not apply to uploads.
    excluded = [check for check in CHECKS.get_all() if check.__name__ == "positive_data_acceptance"]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.label for operation in operations} >= {"POST /denoise", "GET /info", "GET /metrics"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(base_url=base, excluded_checks=excluded, timeout=60)

        check()
