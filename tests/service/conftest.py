from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from skimage import data

from service.app import build_app
from service.settings import Settings

MALFORMED_PNG = b"\x89PNG\r\n\x1a\n\0\0\0\x0cIHDR\0\0\0\x01\0\0\0\x01\x08\0\0\0\xc4\xa0\xeb\x47"


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG")
    return buffer.getvalue()


def encoded(array: np.ndarray, fmt: str, **options) -> bytes:
    """``array`` saved by Pillow in ``fmt`` with ``options``."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


def post(client, payload: bytes, name: str = "x.png", **params):
    """``POST /denoise`` with ``payload`` as the file and ``params`` as the query."""
    return client.post("/denoise", params=params, files={"file": (name, payload, "application/octet-stream")})


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    return data.astronaut()[60:200, 100:270]


@pytest.fixture
def make_client(tiny_checkpoint):
    """``make_client(**settings)`` -> a started TestClient and the list of batches the scheduler ran."""
    opened = []

    def make(**overrides):
        batches: list[tuple[int, list]] = []
        # The torch runtime builds in milliseconds; tests/service/test_backends.py covers the others and auto.
        settings = Settings(**{"checkpoint": tiny_checkpoint, "tile": 64, "warmup": True, "backend": "torch",
                               **overrides})
        client = TestClient(build_app(settings, on_batch=lambda subnet, jobs: batches.append((subnet, jobs))))
        client.__enter__()
        opened.append(client)
        return client, batches

    yield make
    for client in opened:
        client.__exit__(None, None, None)


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric != name:
            continue
        found = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if part)
        if all(found.get(k, "").strip('"') == v for k, v in labels.items()):
            return float(value)
    return 0.0


@contextlib.contextmanager
def uvicorn_server(app) -> Iterator[tuple[str, int]]:
    """``app`` served by a real uvicorn on a free port of 127.0.0.1, in a thread; yields (base URL, port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(timeout=30)
