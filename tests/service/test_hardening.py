"""Hostile and unlucky input: malformed and deceptive files, hostile checkpoints, cancelled requests, strict
authentication, and the error contract."""

from __future__ import annotations

import asyncio
import io
import json
import random
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from benchmarks.reliability import mutate, seed_files
from model import CheckpointError, load_checkpoint
from model.checkpoint import METADATA_KEY, _tensors_digest
from service.cli import main as cli_main
from service.imaging import ImageError, decode_image
from tests.service.conftest import metric_value, png_bytes

MALFORMED_PNG = b"\x89PNG\r\n\x1a\n\0\0\0\x0cIHDR\0\0\0\x01\0\0\0\x01\x08\0\0\0\xc4\xa0\xeb\x47"


def post(client, payload: bytes, name: str = "x.png", **params):
    return client.post("/denoise", files={"file": (name, payload)}, params=params)


def encoded(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


def webp_claiming(width: int, height: int) -> bytes:
    """A small lossless WebP whose VP8L header is patched to declare ``width`` x ``height``."""
    data = bytearray(encoded(np.zeros((16, 16, 3), np.uint8), "WEBP", lossless=True))
    offset = data.index(b"VP8L") + 8 + 1  # chunk tag, chunk size, then the 0x2f signature
    bits = struct.unpack("<I", data[offset:offset + 4])[0]
    bits = (bits & ~0x0FFFFFFF) | (width - 1) | ((height - 1) << 14)
    data[offset:offset + 4] = struct.pack("<I", bits)
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A 64x64 JPEG whose SOF0 segment is patched to declare ``width`` x ``height``."""
    data = bytearray(encoded(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8), "JPEG"))
    offset = data.index(b"\xff\xc0") + 5  # marker, length (2), precision (1)
    data[offset:offset + 4] = struct.pack(">HH", height, width)
    return bytes(data)


def test_a_tiny_jpeg_whose_header_claims_a_huge_image_is_refused_before_decoding(make_client, monkeypatch):
    bomb = jpeg_claiming(6000, 6000)
    with pytest.raises(ImageError, match="too few") as caught:
        decode_image(bomb, max_pixels=40_000_000)
    assert caught.value.reason == "corrupt"
    client, batches = make_client()
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("the pixels were decoded"))
    response = post(client, bomb)
    assert response.status_code == 422 and "too few" in response.json()["detail"] and not batches


def test_real_files_of_every_format_pass_the_byte_floor_even_when_flat():
    flat = np.full((2048, 2048, 3), 128, np.uint8)  # the most compressible image there is
    for fmt, options in (("PNG", {"optimize": True}), ("JPEG", {"quality": 10}), ("WEBP", {"lossless": True}),
                         ("WEBP", {"quality": 1}), ("TIFF", {"compression": "tiff_deflate"}), ("BMP", {})):
        data = encoded(flat, fmt, **options)
        assert decode_image(data).size == (2048, 2048), (fmt, len(data))
    # A flat lossless WebP spends almost nothing per pixel: a file of tens of bytes may honestly hold
    # 36 MP. It is decoded, within max_pixels; what bounds memory is the number of decodes at once.
    assert len(webp_claiming(6000, 6000)) < 100


def test_at_most_max_decodes_uploads_are_decoded_at_once(make_client, photo, monkeypatch):
    import service.app

    client, _ = make_client(max_decodes=1)
    running, most = [0], [0]
    original = service.app.decode_image

    def tracked(*args, **kwargs):
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            time.sleep(0.02)
            return original(*args, **kwargs)
        finally:
            running[0] -= 1

    monkeypatch.setattr(service.app, "decode_image", tracked)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda _: post(client, png_bytes(photo), quality="fast").status_code, range(6)))
    assert statuses == [200] * 6 and most[0] == 1


def test_a_camera_jpeg_with_extra_images_is_denoised_from_its_first_frame(make_client, photo):
    frames = [Image.fromarray(photo), Image.fromarray(photo[::2, ::2])]
    buffer = io.BytesIO()
    frames[0].save(buffer, "MPO", save_all=True, append_images=frames[1:])
    client, _ = make_client()
    response = post(client, buffer.getvalue(), "camera.jpg")
    assert response.status_code == 200
    with Image.open(io.BytesIO(response.content)) as result:
        assert result.size == (photo.shape[1], photo.shape[0])


def test_a_malformed_png_header_is_a_json_422(make_client):
    client, _ = make_client()
    response = post(client, MALFORMED_PNG)
    assert response.status_code == 422 and response.headers["content-type"] == "application/json"
    assert "IHDR" in response.json()["detail"]


def test_the_cli_reports_a_malformed_file_and_goes_on_to_the_next(tiny_checkpoint, tmp_path, photo, capsys):
    bad, good = tmp_path / "t.png", tmp_path / "good.png"
    bad.write_bytes(MALFORMED_PNG)
    good.write_bytes(png_bytes(photo))
    code = cli_main(["denoise", str(bad), str(good), "-o", str(tmp_path / "out"), "--checkpoint", tiny_checkpoint,
                     "--tile", "64"])
    assert code == 1
    assert (tmp_path / "out" / "good.png").is_file() and not (tmp_path / "out" / "t.png").exists()
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}")


@pytest.mark.parametrize("name,payload,status", [
    ("int32.tif", encoded(np.arange(64 * 64, dtype=np.int32).reshape(64, 64) * 1000, "TIFF"), 415),
    ("anim.png", None, 415),
    ("anim.webp", None, 415),
    ("pages.tif", None, 415),
])
def test_32_bit_and_multi_frame_images_are_refused_not_misread(make_client, name, payload, status):
    if payload is None:
        frames = [Image.fromarray(np.full((32, 32, 3), value, np.uint8)) for value in (0, 255)]
        buffer = io.BytesIO()
        fmt = {"png": "PNG", "webp": "WEBP", "tif": "TIFF"}[name.rsplit(".", 1)[1]]
        frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:])
        payload = buffer.getvalue()
    client, _ = make_client()
    response = post(client, payload, name)
    assert response.status_code == status, response.text
    assert any(word in response.json()["detail"] for word in ("32-bit", "animated"))


def test_a_422_never_echoes_the_request(make_client):
    client, _ = make_client()
    secret = "x" * 1_000_000
    response = client.post("/denoise", data={"file": secret})  # a form field, not a file
    assert response.status_code == 422
    assert len(response.content) < 1000 and "xxxx" not in response.text
    assert response.json()["detail"].startswith("file")


def test_the_api_key_guards_the_routes_behind_a_root_path_too(tiny_checkpoint, photo):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.app import build_app
    from service.settings import Settings

    parent = FastAPI()
    parent.mount("/ddsnet", build_app(Settings(checkpoint=tiny_checkpoint, tile=64, api_key="s3cret")))
    response = TestClient(parent).post("/ddsnet/denoise", files={"file": ("x.png", png_bytes(photo))})
    assert response.status_code == 401


def test_an_empty_api_key_means_none_and_a_key_with_spaces_is_refused():
    from pydantic import ValidationError

    from service.settings import Settings

    assert Settings(api_key="").api_key is None
    with pytest.raises(ValidationError, match="printable ASCII"):
        Settings(api_key="two words")


def test_a_tile_that_the_network_cannot_use_is_refused_at_start(tiny_checkpoint):
    from pydantic import ValidationError

    from model import Denoiser
    from service.settings import Settings

    with pytest.raises(ValidationError):
        Settings(tile=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        Denoiser(load_checkpoint(tiny_checkpoint), tile=66)


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


def test_protect_operations_puts_metrics_info_and_the_docs_behind_the_key(make_client):
    client, _ = make_client(api_key="s3cret", protect_operations=True)
    for path in ("/metrics", "/info", "/docs", "/openapi.json"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_info_names_no_local_path(make_client):
    client, _ = make_client()
    text = json.dumps(client.get("/info").json())
    assert "/tmp" not in text and "runs/" not in text and str(Path.home()) not in text


def test_an_unexpected_failure_is_a_json_500(tiny_checkpoint, photo, monkeypatch):
    from fastapi.testclient import TestClient

    from service.app import build_app
    from service.settings import Settings

    # As a real server does: the error is answered, not raised into the client.
    with TestClient(build_app(Settings(checkpoint=tiny_checkpoint, tile=64)), raise_server_exceptions=False) as client:
        async def broken(*args, **kwargs):
            raise RuntimeError("secret internal state")

        monkeypatch.setattr(client.app.state.engine, "submit", broken)
        response = post(client, png_bytes(photo))
    assert response.status_code == 500 and response.json() == {"detail": "internal error"}


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


def test_a_cancelled_request_stops_costing_compute_at_its_next_tile(make_client):
    client, _ = make_client(max_batch_tiles=8, max_wait_ms=50)
    engine = client.app.state.engine
    ran: list[int] = []
    original = engine.denoiser.run_windows
    first_window = threading.Event()
    cancelled = threading.Event()

    def window_then_wait(windows, index):
        ran.append(len(windows))
        first_window.set()
        cancelled.wait(timeout=30)  # the request is cancelled while its first window runs
        return original(windows, index)

    engine.denoiser.run_windows = window_then_wait
    big = torch.rand(1, 3, 64 * 6, 64 * 6)  # 36 tiles of 64 at tile=64; the first batch takes 8

    async def submit_then_cancel():
        job = await engine.submit(big, "best")
        while not first_window.is_set():
            await asyncio.sleep(0.01)
        engine.cancel(job, "client_disconnected")
        cancelled.set()
        await asyncio.sleep(0.3)  # the rest of the batch: skipped windows never reach run_windows
        return job

    job = client.portal.call(submit_then_cancel)
    assert job.cancelled
    assert sum(ran) == 1, f"{sum(ran)} of the first batch's 8 windows ran, though the request was cancelled"


def hostile_checkpoint(source: str, target: Path, edit=None, tensors_edit=None) -> Path:
    with safe_open(source, framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        document = json.loads(handle.metadata()[METADATA_KEY])
    if tensors_edit:
        tensors_edit(tensors)
        document["tensors_sha256"] = _tensors_digest(tensors)
    metadata = document if edit is None else edit(document)
    save_file(tensors, str(target), metadata={METADATA_KEY: metadata if isinstance(metadata, str)
                                              else json.dumps(metadata)})
    return target


def _set(path: list, value):
    def edit(document):
        node = document
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return document
    return edit


@pytest.mark.parametrize("edit,message", [
    (lambda d: json.dumps([d]), "JSON object"),
    (lambda d: "[" * 100_000 + "]" * 100_000, "nested too deeply|JSON object"),
    (_set(["model", "steps_per_width"], 0), "steps_per_width"),
    (_set(["model", "channels"], [2**20, 2**20, 2**20]), "model.channels"),
    (_set(["model", "body_blocks"], 10**9), "body_blocks"),
    (_set(["model", "body_blocks"], 5), "shape|missing|unexpected"),
    (_set(["subnets"], []), "subnets"),
    (_set(["gate", "config", "num_subnets"], "three"), "num_subnets"),
])
def test_hostile_checkpoint_metadata_is_one_clear_error_without_allocating(tiny_checkpoint, tmp_path, edit, message):
    path = hostile_checkpoint(tiny_checkpoint, tmp_path / "bad.safetensors", edit)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_non_finite_weights_are_refused(tiny_checkpoint, tmp_path):
    def poison(tensors):
        name = next(name for name in sorted(tensors) if name.startswith("net."))
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")

    path = hostile_checkpoint(tiny_checkpoint, tmp_path / "nan.safetensors", tensors_edit=poison)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_checkpoint(path)


@pytest.mark.parametrize("command", ["info", "serve"])
def test_info_and_serve_refuse_a_bad_checkpoint_with_one_line(tiny_checkpoint, tmp_path, capsys, command):
    path = hostile_checkpoint(tiny_checkpoint, tmp_path / "bad.safetensors", _set(["model", "steps_per_width"], 0))
    assert cli_main([command, "--checkpoint", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err + captured.out


def test_serve_sets_the_connection_limits(tiny_checkpoint, monkeypatch):
    import uvicorn

    from service.app import serve

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: seen.update(options))
    assert serve("127.0.0.1", 0, tiny_checkpoint) == 0
    assert seen["timeout_keep_alive"] == 5.0 and seen["limit_concurrency"] == 256


def test_a_few_hundred_mutated_uploads_never_get_a_5xx(make_client):
    client, _ = make_client(max_pixels=4_000_000)
    rng = random.Random(0)
    seeds = seed_files()
    statuses: dict[int, int] = {}
    for _ in range(300):
        name, data = rng.choice(seeds)
        response = post(client, mutate(data, rng), name)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code != 200:
            assert response.headers["content-type"] == "application/json" and response.json()["detail"]
    assert set(statuses) <= {200, 413, 415, 422}, statuses
    assert statuses.get(422, 0) > 0


def test_the_gate_does_not_wait_behind_a_running_batch(make_client):
    client, _ = make_client(max_batch_tiles=1, max_wait_ms=0)
    engine = client.app.state.engine
    original = engine.denoiser.run_windows
    batch_running, release = threading.Event(), threading.Event()

    def held(windows, index):
        batch_running.set()
        release.wait(timeout=30)
        return original(windows, index)

    engine.denoiser.run_windows = held

    async def gate_while_a_batch_runs():
        first = await engine.submit(torch.rand(1, 3, 64, 64), "best")
        while not batch_running.is_set():
            await asyncio.sleep(0.01)
        second = await asyncio.wait_for(engine.submit(torch.rand(1, 3, 64, 64), "auto"), timeout=10)
        gated_while_held = not release.is_set()
        release.set()
        await asyncio.wait_for(asyncio.gather(first.future, second.future), timeout=30)
        return gated_while_held

    assert client.portal.call(gate_while_a_batch_runs)


def test_queue_time_counts_from_the_upload(make_client):
    client, _ = make_client()
    engine = client.app.state.engine

    async def submit_received_earlier():
        received = time.perf_counter() - 0.5  # the upload arrived half a second before the submit
        job = await engine.submit(torch.rand(1, 3, 64, 64), "fast", received_at=received)
        return await job.future

    assert client.portal.call(submit_received_earlier).queue_seconds >= 0.5


def test_a_request_that_arrives_while_the_idle_engine_trims_memory_is_still_served(make_client, monkeypatch):
    import service.engine

    client, _ = make_client()
    engine = client.app.state.engine
    trimming = threading.Event()

    def slow_trim():
        trimming.set()
        time.sleep(0.3)

    monkeypatch.setattr(service.engine, "release_free_memory", slow_trim)

    async def submit_during_the_trim():
        first = await engine.submit(torch.rand(1, 3, 64, 64), "fast")
        await first.future  # the queue drains: the scheduler goes idle and trims
        while not trimming.is_set():
            await asyncio.sleep(0.01)
        second = await engine.submit(torch.rand(1, 3, 64, 64), "fast")
        return await asyncio.wait_for(second.future, timeout=10)

    assert client.portal.call(submit_during_the_trim).subnet == 2
