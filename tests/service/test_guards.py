"""The upload limit and the API key (service/guards.py)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.requests import Request

from service.app import build_app
from service.guards import OPERATIONS_PATHS, authorized, client_identity
from service.settings import Settings
from tests.service.conftest import metric_value, png_bytes, post


def request_with(headers: dict[str, str]) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/denoise", "query_string": b"",
                    "headers": [(name.lower().encode(), value.encode()) for name, value in headers.items()]})


def test_upload_over_the_limit_is_413_from_content_length(make_client, photo):
    client, _ = make_client(max_upload_bytes=10_000)
    response = post(client, png_bytes(photo))
    assert response.status_code == 413 and "larger than" in response.json()["detail"]
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "ddsnet_rejections_total", reason="upload_too_large") == 1


def test_upload_over_the_limit_is_413_while_streaming(make_client, photo):
    client, _ = make_client(max_upload_bytes=10_000)
    body = png_bytes(photo)
    boundary = "ddsnetboundary"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
                 f"Content-Type: image/png\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()

    def chunks():
        for start in range(0, len(multipart), 4096):
            yield multipart[start : start + 4096]

    response = client.post("/denoise", content=chunks(),
                           headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413


@pytest.mark.parametrize("header, allowed", [
    (None, False), ("s3cret", False), ("Bearer  s3cret", False), ("Bearer s3cret extra", False),
    ("Basic s3cret", False), ("Bearer s3cre", False), ("Bearer s3cret", True), ("bEaReR s3cret", True),
])
def test_only_the_exact_bearer_token_is_authorized(header, allowed):
    assert authorized(request_with({} if header is None else {"Authorization": header}), "s3cret") is allowed
    assert authorized(request_with({}), None)  # no key set: everyone


def test_api_key(make_client, photo):
    client, _ = make_client(api_key="s3cret")
    assert post(client, png_bytes(photo)).status_code == 401
    response = client.post("/denoise", files={"file": ("x.png", png_bytes(photo))},
                           headers={"Authorization": "Bearer s3cret"})
    assert response.status_code == 200


def test_the_api_key_guards_the_routes_behind_a_root_path_too(tiny_checkpoint, photo):
    parent = FastAPI()
    parent.mount("/ddsnet", build_app(Settings(checkpoint=tiny_checkpoint, tile=64, api_key="s3cret")))
    response = TestClient(parent).post("/ddsnet/denoise", files={"file": ("x.png", png_bytes(photo))})
    assert response.status_code == 401


def test_the_api_key_is_a_strict_bearer_token_and_refusals_are_counted(make_client, photo):
    client, _ = make_client(api_key="s3cret")
    image = png_bytes(photo)
    for header in ({}, {"Authorization": "s3cret"}, {"Authorization": "Bearer  s3cret"},
                   {"Authorization": "Bearer s3cret extra"}, {"Authorization": "Basic s3cret"}):
        response = client.post("/denoise", files={"file": ("x.png", image)}, headers=header)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer", header
    response = client.post("/denoise", files={"file": ("x.png", image)}, headers={"Authorization": "bearer s3cret"})
    assert response.status_code == 200
    metrics = client.get("/metrics").text  # open: protect_operations is off
    assert metric_value(metrics, "ddsnet_requests_total", quality="auto", status="401") == 5


def test_a_refusal_is_counted_under_the_quality_asked_for_or_unknown(make_client, photo):
    client, _ = make_client(api_key="s3cret")
    for quality in ("best", "nonsense"):
        assert post(client, png_bytes(photo), quality=quality).status_code == 401
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "ddsnet_requests_total", quality="best", status="401") == 1
    assert metric_value(metrics, "ddsnet_requests_total", quality="unknown", status="401") == 1
    assert metric_value(metrics, "ddsnet_rejections_total", reason="unauthorized") == 2


def test_protect_operations_puts_metrics_info_and_the_docs_behind_the_key(make_client):
    client, _ = make_client(api_key="s3cret", protect_operations=True)
    for path in ("/metrics", "/info", "/docs", "/openapi.json"):
        assert path in OPERATIONS_PATHS
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_a_client_is_its_peer_address_whatever_key_it_presents():
    def request(peer: str | None, headers: dict[str, str] | None = None) -> Request:
        scope = {"type": "http", "method": "POST", "path": "/denoise", "query_string": b"",
                 "headers": [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]}
        return Request({**scope, "client": (peer, 5000) if peer else None})

    # One key shared by every client must not make them one client.
    keyed = {"Authorization": "Bearer k1"}
    assert client_identity(request("10.0.0.1", keyed)) != client_identity(request("10.0.0.2", keyed))
    assert client_identity(request("10.0.0.1", keyed)) == client_identity(request("10.0.0.1")) == "peer:10.0.0.1"
    # A forged X-Forwarded-For is not read here: uvicorn rewrites the peer only for trusted proxies.
    assert client_identity(request("10.0.0.1", {"X-Forwarded-For": "10.9.9.9"})) == "peer:10.0.0.1"
    # IPv6: one /64 is one client, however many of its addresses it uses.
    assert client_identity(request("2001:db8:0:1::5")) == client_identity(request("2001:db8:0:1:ffff::9"))
    assert client_identity(request("2001:db8:0:1::5")) == "peer:2001:db8:0:1::/64"
    assert client_identity(request("2001:db8:0:2::5")) != client_identity(request("2001:db8:0:1::5"))
    assert client_identity(request("::ffff:10.0.0.1")) == "peer:10.0.0.1"
    assert client_identity(request("testclient")) == "peer:testclient"
    assert client_identity(request(None)) == "peer:unknown"
