"""The HTTP service against the tiny random checkpoint: routes, limits, metrics, batching, CLI equality."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from service.app import build_app
from service.backends import BACKENDS, installed
from service.cli import main as cli_main
from service.settings import Settings
from tests.service.conftest import metric_value, png_bytes


def post(client, payload: bytes, name: str = "x.png", **params):
    return client.post("/denoise", params=params, files={"file": (name, payload, "application/octet-stream")})


def test_denoise_returns_an_image_of_the_same_size_with_cost_headers(make_client, photo):
    client, _ = make_client()
    response = post(client, png_bytes(photo), quality="best")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["DDSNet-Subnet"] == "0" and response.headers["DDSNet-Quality"] == "best"
    assert float(response.headers["DDSNet-GFLOPs"]) > 0
    assert float(response.headers["DDSNet-Compute-Ms"]) > 0 and float(response.headers["DDSNet-Queue-Ms"]) >= 0
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.size == (photo.shape[1], photo.shape[0])
    fast = post(client, png_bytes(photo), quality="fast")
    assert fast.headers["DDSNet-Subnet"] == "2"
    assert float(fast.headers["DDSNet-GFLOPs"]) < float(response.headers["DDSNet-GFLOPs"])


@pytest.mark.parametrize("output, media", [("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_output_formats(make_client, photo, output, media):
    client, _ = make_client()
    response = post(client, png_bytes(photo), format=output)
    assert response.status_code == 200 and response.headers["content-type"] == media
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.format == output.upper()


@pytest.mark.parametrize("backend", BACKENDS)
def test_service_output_equals_the_cli(make_client, photo, tiny_checkpoint, tmp_path, capsys, backend):
    if not installed(backend):
        pytest.skip(f"{backend} is not installed")
    source = tmp_path / "in.png"
    source.write_bytes(png_bytes(photo))
    for quality in ("auto", "fast", "best"):
        assert cli_main(["denoise", str(source), "-o", str(tmp_path / f"{quality}.png"), "--checkpoint",
                         tiny_checkpoint, "--quality", quality, "--tile", "64", "--backend", backend]) == 0
    capsys.readouterr()
    client, _ = make_client(max_batch_tiles=4, backend=backend)
    for quality in ("auto", "fast", "best"):
        response = post(client, source.read_bytes(), quality=quality)
        served = np.asarray(Image.open(io.BytesIO(response.content)))
        expected = np.asarray(Image.open(tmp_path / f"{quality}.png"))
        assert np.array_equal(served, expected), quality


def test_grey_and_alpha_are_kept(make_client, photo):
    client, _ = make_client()
    grey = post(client, png_bytes(photo[..., 0]))
    assert Image.open(io.BytesIO(grey.content)).mode == "L"
    rgba = np.dstack([photo, np.full(photo.shape[:2], 77, np.uint8)])
    response = post(client, png_bytes(rgba, "RGBA"))
    image = Image.open(io.BytesIO(response.content))
    assert image.mode == "RGBA" and (np.asarray(image)[..., 3] == 77).all()
    refused = post(client, png_bytes(rgba, "RGBA"), format="jpeg")
    assert refused.status_code == 422 and "alpha" in refused.json()["detail"]


@pytest.mark.parametrize("payload, status", [
    (b"", 422),
    (b"plain text, not an image", 415),
    (b"GIF89a" + b"\x00" * 64, 415),
])
def test_bad_uploads_get_a_json_error(make_client, payload, status):
    client, _ = make_client()
    response = post(client, payload)
    assert response.status_code == status and response.json()["detail"]


def test_truncated_image_is_422(make_client, photo):
    client, _ = make_client()
    response = post(client, png_bytes(photo)[:3000])
    assert response.status_code == 422 and "truncated" in response.json()["detail"]


def test_gif_is_unsupported(make_client, photo):
    client, _ = make_client()
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "GIF")
    response = post(client, buffer.getvalue())
    assert response.status_code == 415 and "GIF" in response.json()["detail"]


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


def test_too_many_pixels_is_413_before_decoding(make_client, photo):
    client, _ = make_client(max_pixels=1000)
    response = post(client, png_bytes(photo))
    assert response.status_code == 413 and "pixels" in response.json()["detail"]


def test_decompression_bomb_is_413(make_client, monkeypatch):
    from PIL import Image as PILImage

    client, _ = make_client()
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 500)
    response = post(client, png_bytes(np.zeros((40, 40, 3), np.uint8)))
    assert response.status_code == 413


def test_queue_full_is_503_with_retry_after(make_client):
    client, _ = make_client(max_queue_tiles=2)
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    response = post(client, big)
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert "queue full" in response.json()["detail"]


def test_request_timeout_is_504_and_its_tiles_are_dropped(make_client, photo):
    client, batches = make_client(request_timeout_s=0.3, max_wait_ms=5000, max_batch_tiles=64)
    response = post(client, png_bytes(photo))
    assert response.status_code == 504
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "ddsnet_dropped_tiles_total", reason="timeout") >= 1
    assert batches == []


def test_api_key(make_client, photo):
    client, _ = make_client(api_key="s3cret")
    assert post(client, png_bytes(photo)).status_code == 401
    response = client.post("/denoise", files={"file": ("x.png", png_bytes(photo))},
                           headers={"Authorization": "Bearer s3cret"})
    assert response.status_code == 200


def test_health_ready_info_metrics_and_openapi(make_client, tiny_checkpoint):
    not_started = build_app(Settings(checkpoint=tiny_checkpoint))
    from fastapi.testclient import TestClient

    cold = TestClient(not_started)  # no lifespan: the model is not loaded
    assert cold.get("/healthz").status_code == 200
    assert cold.get("/readyz").status_code == 503

    client, _ = make_client()
    assert client.get("/readyz").json() == {"ready": True}
    info = client.get("/info").json()
    assert len(info["subnets"]) == 3 and info["device"] == "cpu"
    metrics = client.get("/metrics", follow_redirects=False)
    assert metrics.status_code == 200 and "ddsnet_ready 1.0" in metrics.text
    schema = client.get("/openapi.json").json()
    parameters = schema["paths"]["/denoise"]["post"]["parameters"]
    quality = next(p for p in parameters if p["name"] == "quality")["schema"]
    if "$ref" in quality:
        quality = schema["components"]["schemas"][quality["$ref"].rsplit("/", 1)[1]]
    assert quality["enum"] == ["auto", "fast", "best"]
    assert client.get("/docs").status_code == 200


def test_metrics_move_with_requests(make_client, photo):
    client, _ = make_client()
    before = client.get("/metrics").text
    post(client, png_bytes(photo), quality="best")
    post(client, png_bytes(photo), quality="fast")
    post(client, b"junk")
    after = client.get("/metrics").text
    for quality, subnet in (("best", "0"), ("fast", "2")):
        assert metric_value(after, "ddsnet_requests_total", quality=quality, status="200") == 1
        assert metric_value(after, "ddsnet_subnet_selections_total", quality=quality, subnet=subnet) == 1
        assert metric_value(after, "ddsnet_flops_total", subnet=subnet) > 0
        assert metric_value(after, "ddsnet_batch_tiles_count", subnet=subnet) >= 1
        assert metric_value(after, "ddsnet_request_duration_seconds_count", subnet=subnet) == 1
    assert metric_value(after, "ddsnet_requests_total", quality="auto", status="415") == 1
    assert metric_value(after, "ddsnet_rejections_total", reason="unsupported") == 1
    assert metric_value(after, "ddsnet_pixels_total") == 2 * photo.shape[0] * photo.shape[1]
    widest = metric_value(after, "ddsnet_flops_widest_equivalent_total")
    spent = sum(metric_value(after, "ddsnet_flops_total", subnet=subnet) for subnet in ("0", "2"))
    assert widest > 0 and spent < 2 * widest
    assert metric_value(before, "ddsnet_pixels_total") == 0
    assert metric_value(after, "ddsnet_requests_in_flight") == 0
    assert metric_value(after, "ddsnet_queue_tiles", subnet="0") == 0


def test_concurrent_mixed_requests_each_get_one_right_answer_and_batches_never_mix_widths(make_client):
    client, batches = make_client(max_batch_tiles=8, max_wait_ms=20)
    rng = np.random.default_rng(1)
    sizes = [(40, 60), (130, 70), (200, 150), (64, 64), (90, 250), (33, 47)] * 3
    qualities = ["auto", "fast", "best"] * 6
    images = [rng.integers(0, 255, (*size, 3), dtype=np.uint8) for size in sizes]

    def send(index: int):
        return post(client, png_bytes(images[index]), quality=qualities[index])

    with ThreadPoolExecutor(len(images)) as pool:
        responses = list(pool.map(send, range(len(images))))
    for response, size, quality in zip(responses, sizes, qualities):
        assert response.status_code == 200
        with Image.open(io.BytesIO(response.content)) as image:
            assert image.size == (size[1], size[0])
        if quality != "auto":
            assert response.headers["DDSNet-Subnet"] == {"best": "0", "fast": "2"}[quality]
    assert batches, "no batch was recorded"
    for subnet, jobs in batches:
        assert all(job.subnet == subnet for job in jobs)
    assert max(len(jobs) for _, jobs in batches) > 1, "batching never grouped tiles"
    ran = sum(len(jobs) for _, jobs in batches)
    assert ran == sum(len(job.image.tiles) for job in {job for _, jobs in batches for job in jobs})
    metrics = client.get("/metrics").text
    assert sum(metric_value(metrics, "ddsnet_requests_total", quality=q, status="200") for q in set(qualities)) == 18


def test_json_body_of_errors_is_json(make_client):
    client, _ = make_client()
    response = post(client, b"")
    assert json.loads(response.content)["detail"]


def test_the_browser_page_and_its_static_files_are_served(make_client, photo):
    client, _ = make_client()
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text and client.get(asset).status_code == 200
    assert 'for="file"' in page.text and 'role="alert"' in page.text  # labelled input, announced errors
    response = post(client, png_bytes(photo), quality="best")
    spent, widest = (float(response.headers[name]) for name in ("DDSNet-GFLOPs", "DDSNet-GFLOPs-Widest"))
    assert widest > 0 and spent >= widest  # best is the widest; its FLOPs and the gate-free widest's agree
