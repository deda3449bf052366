"""Against a real uvicorn on 127.0.0.1: a client that disconnects has its queued tiles dropped unrun."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from service.app import build_app
from service.settings import Settings
from tests.service.conftest import metric_value, png_bytes, uvicorn_server


@pytest.fixture
def live_server(tiny_checkpoint):
    batches: list = []
    # Tiles wait up to 3 s for a batch to fill, which leaves the client time to hang up first; oldest first,
    # as fairly on the CPU a batch is one tile and never waits.
    settings = Settings(checkpoint=tiny_checkpoint, tile=64, max_wait_ms=3000, max_batch_tiles=64, fair_share=False)
    app = build_app(settings, on_batch=lambda subnet, jobs: batches.append((subnet, jobs)))
    with uvicorn_server(app) as (base, port):
        yield base, port, batches


def test_disconnected_client_tiles_are_dropped_before_they_run(live_server, photo):
    base, port, batches = live_server
    assert httpx.get(f"{base}/readyz").status_code == 200
    body = png_bytes(photo)
    boundary = "b0undary"
    payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
               f"Content-Type: image/png\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
    request = (f"POST /denoise?quality=best HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(payload)}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(request.encode() + payload)
        time.sleep(0.7)  # the request is decoded and queued; its batch waits for more tiles
    deadline = time.time() + 20
    dropped = 0.0
    while time.time() < deadline:
        dropped = metric_value(httpx.get(f"{base}/metrics").text, "ddsnet_dropped_tiles_total",
                               reason="client_disconnected")
        if dropped:
            break
        time.sleep(0.1)
    assert dropped >= 1
    time.sleep(3.5)  # past max_wait: a batch would have run by now if the tiles were still queued
    assert batches == []
    metrics = httpx.get(f"{base}/metrics").text
    assert metric_value(metrics, "ddsnet_queue_tiles", subnet="0") == 0
    assert metric_value(metrics, "ddsnet_requests_in_flight") == 0

    # The server is still healthy and answers the next client.
    files = {"file": ("x.png", body, "image/png")}
    response = httpx.post(f"{base}/denoise", params={"quality": "fast"}, files=files, timeout=60)
    assert response.status_code == 200 and response.headers["DDSNet-Subnet"] == "2"
