"""The error contract (service/errors.py): one JSON schema for every error, documented, never echoing input."""

from __future__ import annotations

import json

from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from prometheus_client import generate_latest

from service.app import build_app
from service.errors import ERRORS, MAX_DETAIL, ErrorBody, error_response, error_responses, rejection, validation_detail
from service.metrics import Metrics
from service.settings import Settings
from tests.service.conftest import metric_value, png_bytes, post


def test_an_error_body_is_its_detail_cut_to_a_bound():
    response = error_response(418, "x" * 1000, {"Retry-After": "1"})
    assert response.status_code == 418 and response.headers["Retry-After"] == "1"
    assert json.loads(response.body) == {"detail": "x" * MAX_DETAIL}


def test_a_validation_detail_says_where_and_what_and_never_the_input():
    error = RequestValidationError([
        {"loc": ("body", "file"), "msg": "Field required", "input": "secret upload"},
        {"loc": ("query", "quality"), "msg": "Input should be 'auto', 'fast' or 'best'", "input": "secret"},
    ])
    detail = validation_detail(error)
    assert detail == "file: Field required; query.quality: Input should be 'auto', 'fast' or 'best'"
    assert "secret" not in detail
    assert validation_detail(RequestValidationError([])) == "invalid request"


def test_a_rejection_is_counted_under_its_reason_and_status():
    metrics = Metrics()
    response = rejection(metrics, 503, "queue full", "fast", "queue_full", {"Retry-After": "1"})
    assert response.status_code == 503 and json.loads(response.body) == {"detail": "queue full"}
    text = generate_latest(metrics.registry).decode()
    assert metric_value(text, "ddsnet_rejections_total", reason="queue_full") == 1
    assert metric_value(text, "ddsnet_requests_total", quality="fast", status="503") == 1


def test_documented_error_responses_use_the_error_body():
    responses = error_responses(413, 504)
    assert list(responses) == [413, 504]
    assert all(row["model"] is ErrorBody and row["description"] == ERRORS[status] for status, row in responses.items())


def test_a_422_never_echoes_the_request(make_client):
    client, _ = make_client()
    secret = "x" * 1_000_000
    response = client.post("/denoise", data={"file": secret})  # a form field, not a file
    assert response.status_code == 422
    assert len(response.content) < 1000 and "xxxx" not in response.text
    assert response.json()["detail"].startswith("file")


def test_an_unexpected_failure_is_a_json_500(tiny_checkpoint, photo, monkeypatch):
    # As a real server does: the error is answered, not raised into the client.
    with TestClient(build_app(Settings(checkpoint=tiny_checkpoint, tile=64)), raise_server_exceptions=False) as client:
        async def broken(*args, **kwargs):
            raise RuntimeError("secret internal state")

        monkeypatch.setattr(client.app.state.scheduler, "submit", broken)
        response = post(client, png_bytes(photo))
        metrics = client.get("/metrics").text
    assert response.status_code == 500 and response.json() == {"detail": "internal error"}
    assert metric_value(metrics, "ddsnet_rejections_total", reason="internal_error") == 1


def test_an_unknown_path_is_a_json_404(make_client):
    client, _ = make_client()
    response = client.get("/nothing")
    assert response.status_code == 404 and response.json() == {"detail": "Not Found"}


def test_json_body_of_errors_is_json(make_client):
    client, _ = make_client()
    response = post(client, b"")
    assert json.loads(response.content)["detail"]


def test_the_openapi_contract_documents_every_error_and_the_metrics_format(make_client):
    client, _ = make_client()
    schema = client.get("/openapi.json").json()
    denoise = schema["paths"]["/denoise"]["post"]["responses"]
    for status in ("400", "401", "413", "415", "422", "500", "503", "504"):
        assert denoise[status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody"), status
    assert "503" in schema["paths"]["/readyz"]["get"]["responses"]
    assert "503" in schema["paths"]["/info"]["get"]["responses"]
    assert "application/json" not in schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert schema["components"]["schemas"]["ErrorBody"]["required"] == ["detail"]
