"""The routes (service/routes.py) against the tiny random checkpoint: answers, limits, metrics, batching, CLI
equality, and hostile uploads."""

from __future__ import annotations

import io
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi import HTTPException
from fastapi.testclient import TestClient
from PIL import Image
from starlette.requests import Request

from benchmarks.common import mutate, seed_files
from model import Quality
from service.app import build_app
from service.backends import BACKENDS, installed
from service.cli import main as cli_main
from service.routes import denoise, denoise_upload, get_scheduler, latency_bound_refusal, result_headers, router
from service.scheduler import ScheduledResult
from service.settings import Settings
from tests.service.conftest import MALFORMED_PNG, encoded, metric_value, png_bytes, post


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


def test_an_image_with_more_tiles_than_the_whole_queue_is_413_not_a_retry(make_client):
    client, _ = make_client(max_queue_tiles=2)
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    response = post(client, big)
    assert response.status_code == 413 and "Retry-After" not in response.headers
    assert "DDSNET_MAX_QUEUE_TILES=2" in response.json()["detail"]
    text = client.get("/metrics").text
    assert metric_value(text, "ddsnet_rejections_total", reason="queue_tiles") == 1


def set_speed(client, seconds_per_pixel: float) -> None:
    """Every width's measured speed, in place of what the warm-up timed on a machine under unknown load."""
    scheduler = client.app.state.scheduler
    scheduler.controller.seconds_per_pixel = dict.fromkeys(range(len(scheduler.denoiser.subnets)), seconds_per_pixel)


def test_request_timeout_is_504_and_its_tiles_are_dropped(make_client, photo):
    # Oldest first, so that the batch waits 5 s to fill on the CPU too; admission estimates next to nothing.
    client, batches = make_client(request_timeout_s=0.3, max_wait_ms=5000, max_batch_tiles=64, fair_share=False)
    set_speed(client, 1e-12)
    response = post(client, png_bytes(photo))
    assert response.status_code == 504
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "ddsnet_dropped_tiles_total", reason="timeout") >= 1
    # Admitted, then late: counted apart from the refusals at admission, which the estimate decides.
    assert metric_value(metrics, "ddsnet_rejections_total", reason="admitted_timeout") == 1
    assert metric_value(metrics, "ddsnet_rejections_total", reason="deadline") == 0
    assert batches == []


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
    # Oldest first: fairly on the CPU a batch is one tile (tests/service/test_scheduler.py fills fair GPU batches).
    client, batches = make_client(max_batch_tiles=8, max_wait_ms=20, fair_share=False)
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


def test_at_most_max_decodes_uploads_are_decoded_at_once(make_client, photo, monkeypatch):
    import service.routes

    client, _ = make_client(max_decodes=1)
    running, most = [0], [0]
    original = service.routes.decode_image

    def tracked(*args, **kwargs):
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            time.sleep(0.02)
            return original(*args, **kwargs)
        finally:
            running[0] -= 1

    monkeypatch.setattr(service.routes, "decode_image", tracked)
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


def test_info_names_no_local_path(make_client):
    client, _ = make_client()
    text = json.dumps(client.get("/info").json())
    assert "/tmp" not in text and "runs/" not in text and str(Path.home()) not in text


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


def test_the_router_holds_every_route_and_the_denoise_handler_is_a_plain_function():
    assert {route.path for route in router.routes} == {"/", "/healthz", "/readyz", "/info", "/metrics", "/denoise"}
    assert callable(denoise) and callable(denoise_upload)


def test_routes_that_need_the_model_answer_503_until_it_is_ready(tiny_checkpoint):
    app = build_app(Settings(checkpoint=tiny_checkpoint))
    with pytest.raises(HTTPException) as caught:
        get_scheduler(Request({"type": "http", "app": app, "headers": []}))
    assert caught.value.status_code == 503 and caught.value.headers == {"Retry-After": "1"}


def test_a_latency_bound_applies_to_auto_only_and_within_the_target():
    assert latency_bound_refusal(100, Quality.auto, 0.5) is None
    assert "auto only; best is never changed" in latency_bound_refusal(100, Quality.best, 0.5)
    assert "which is off" in latency_bound_refusal(100, Quality.auto, 0)
    assert "at most the server's latency target, 500 ms" in latency_bound_refusal(900, Quality.auto, 0.5)


def test_the_headers_say_what_ran_what_it_cost_and_what_the_gate_picked_only_when_it_picked():
    result = ScheduledResult(torch.zeros(1, 3, 2, 2), 2, 3_000_000_000, 0.01234, 0.5, 6e9, 0, "load", "white",
                             "gate")
    assert result_headers(result, Quality.auto) == {
        "DDSNet-Subnet": "2", "DDSNet-GFLOPs": "3.0000", "DDSNet-Queue-Ms": "12.3", "DDSNet-Compute-Ms": "500.0",
        "DDSNet-GFLOPs-Widest": "6.0000", "DDSNet-Quality": "auto", "DDSNet-Reason": "load",
        "DDSNet-Profile": "white", "DDSNet-Profile-Reason": "gate", "DDSNet-Gate-Subnet": "0"}
    requested = ScheduledResult(torch.zeros(1, 3, 2, 2), 2, 1, 0.0, 0.0, 1, None, "requested")
    assert "DDSNet-Gate-Subnet" not in result_headers(requested, Quality.fast)


def test_two_profiles_the_noise_parameter_and_the_jpeg_header_decide_whose_weights_run(two_profile_checkpoint,
                                                                                       photo, tmp_path):
    settings = Settings(checkpoint=two_profile_checkpoint, tile=64, backend="torch")
    with TestClient(build_app(settings)) as client:
        png = png_bytes(photo)
        jpeg = encoded(photo, "JPEG", quality=80)
        asked = post(client, png, noise="compressed", quality="best")
        assert asked.status_code == 200 and asked.headers["DDSNet-Profile"] == "compressed"
        assert asked.headers["DDSNet-Profile-Reason"] == "requested" and asked.headers["DDSNet-Subnet"] == "3"
        sent_as_jpeg = post(client, jpeg, "photo.jpg", quality="fast")
        assert sent_as_jpeg.headers["DDSNet-Profile"] == "compressed"
        assert sent_as_jpeg.headers["DDSNet-Profile-Reason"] == "jpeg_header"
        assert sent_as_jpeg.headers["DDSNet-Subnet"] == "5"
        gated = post(client, png)
        assert gated.headers["DDSNet-Profile-Reason"] == "gate"
        assert gated.headers["DDSNet-Profile"] in ("white", "compressed")
        white = post(client, jpeg, "photo.jpg", noise="white", quality="best")
        assert white.headers["DDSNet-Profile"] == "white" and white.headers["DDSNet-Subnet"] == "0"
        assert np.asarray(Image.open(io.BytesIO(white.content))).tolist() != \
            np.asarray(Image.open(io.BytesIO(post(client, jpeg, "photo.jpg", quality="best").content))).tolist()
        bad = post(client, png, noise="night")
        assert bad.status_code == 422 and "noise" in bad.json()["detail"]
        info = client.get("/info").json()
        assert info["profiles"] == ["white", "compressed"]
        assert [row["profile"] for row in info["subnets"]] == ["white"] * 3 + ["compressed"] * 3
        metrics = client.get("/metrics").text
        assert 'ddsnet_profile_selections_total{profile="compressed",reason="jpeg_header"} 2.0' in metrics
    # The CLI makes the same choice from the same file, and the same pixels.
    source = tmp_path / "photo.jpg"
    source.write_bytes(jpeg)
    assert cli_main(["denoise", str(source), "-o", str(tmp_path / "out.png"), "--checkpoint", two_profile_checkpoint,
                     "--quality", "fast", "--tile", "64", "--backend", "torch"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")),
                          np.asarray(Image.open(io.BytesIO(sent_as_jpeg.content))))


def test_a_profile_the_checkpoint_lacks_is_a_json_422(make_client, photo):
    client, _ = make_client()
    response = post(client, png_bytes(photo), noise="compressed")
    assert response.status_code == 422 and "no compressed profile" in response.json()["detail"]


def test_interleaved_requests_answer_exactly_what_the_cli_does(make_client, tiny_checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(7)
    cases = [("large.png", (300, 260), "best"), ("small0.png", (40, 60), "auto"), ("small1.png", (64, 64), "fast"),
             ("small2.png", (33, 47), "best")]
    for name, size, quality in cases:
        (tmp_path / name).write_bytes(png_bytes(rng.integers(0, 255, (*size, 3), dtype=np.uint8)))
        assert cli_main(["denoise", str(tmp_path / name), "-o", str(tmp_path / f"cli-{name}"), "--checkpoint",
                         tiny_checkpoint, "--quality", quality, "--tile", "64", "--backend", "torch"]) == 0
    capsys.readouterr()
    # The controller off: under this load, auto must still be the gate's pick, as in the CLI.
    client, batches = make_client(max_batch_tiles=4, max_wait_ms=0, latency_target_ms=0)
    scheduler = client.app.state.scheduler
    original = scheduler.run_windows
    first_window, release = threading.Event(), threading.Event()

    def held(windows, index):
        first_window.set()
        release.wait(timeout=30)  # the small requests queue behind the large one's first batch
        return original(windows, index)

    scheduler.run_windows = held

    def send(case):
        name, _, quality = case
        return post(client, (tmp_path / name).read_bytes(), name, quality=quality)

    def jobs_queued() -> int:
        return sum(len(jobs) for jobs in scheduler.lanes.values())

    with ThreadPoolExecutor(len(cases)) as pool:
        large = pool.submit(send, cases[0])
        assert first_window.wait(timeout=30)
        smalls = [pool.submit(send, case) for case in cases[1:]]
        deadline = time.monotonic() + 30
        while client.portal.call(jobs_queued) < len(cases) and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        responses = [large.result(), *(future.result() for future in smalls)]
    ran = [job for _, jobs in batches for job in jobs]
    large_job = max(set(ran), key=lambda job: len(job.image.tiles))
    last_small = max(position for position, job in enumerate(ran) if job is not large_job)
    assert any(job is large_job for job in ran[last_small:]), "the small requests did not run between its tiles"
    for (name, _, _), response in zip(cases, responses):
        assert response.status_code == 200, response.text
        served = np.asarray(Image.open(io.BytesIO(response.content)))
        assert np.array_equal(served, np.asarray(Image.open(tmp_path / f"cli-{name}"))), name


def test_work_that_cannot_be_done_by_its_deadline_is_refused_at_once(make_client, photo, monkeypatch):
    import service.routes

    client, batches = make_client()

    def no_decode(*args):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(service.routes, "decode_image", no_decode)  # refused from the header's size
    response = post(client, png_bytes(photo), quality="best", deadline_ms=0.001)
    assert response.status_code == 503 and response.headers["content-type"] == "application/json"
    assert "Retry-After" not in response.headers  # not even alone: a retry cannot help
    assert "cannot be done by its deadline even with nothing queued" in response.json()["detail"]
    assert "cannot help" in response.json()["detail"] and "deadline_ms=0.001" in response.json()["detail"]
    assert batches == []
    monkeypatch.undo()
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "ddsnet_rejections_total", reason="deadline") == 1
    assert metric_value(metrics, "ddsnet_requests_total", quality="best", status="503") == 1
    assert post(client, png_bytes(photo), quality="best", deadline_ms=60_000).status_code == 200


def test_a_deadline_past_the_request_timeout_is_capped_by_it(make_client, photo):
    client, batches = make_client(request_timeout_s=0.3, max_wait_ms=5000, max_batch_tiles=64, fair_share=False)
    set_speed(client, 1e-12)  # admitted: estimated next to nothing; then held by the wait to fill a batch
    response = post(client, png_bytes(photo), deadline_ms=600_000)
    assert response.status_code == 504 and response.json()["detail"] == "not done within 0.3 s"
    set_speed(client, 1e-3)  # tens of seconds: within 600 s, not within the timeout
    refused = post(client, png_bytes(photo), deadline_ms=600_000)
    assert refused.status_code == 503 and "(DDSNET_REQUEST_TIMEOUT_S=0.3)" in refused.json()["detail"]
    assert batches == []


def test_a_busy_client_gets_a_429_with_the_seconds_of_its_work_in_flight(make_client, photo):
    client, _ = make_client(max_client_pixels=int(1.5 * photo.shape[0] * photo.shape[1]))
    scheduler = client.app.state.scheduler
    original = scheduler.run_windows
    running, release = threading.Event(), threading.Event()

    def held(windows, index):
        running.set()
        release.wait(timeout=30)  # the first request's first tile runs while the second one arrives
        return original(windows, index)

    scheduler.run_windows = held
    tiles, window_pixels = scheduler.plan(*photo.shape[:2])
    rate = 3.5 / (window_pixels * (tiles - 1) / tiles)  # its queued tiles: 3.5 s, and its running one
    set_speed(client, rate)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, client, png_bytes(photo), quality="best")
        assert running.wait(timeout=30)
        busy = post(client, png_bytes(photo))
        release.set()
        assert first.result().status_code == 200
    assert busy.status_code == 429 and "DDSNET_MAX_CLIENT_PIXELS" in busy.json()["detail"]
    running_seconds = rate * window_pixels / tiles  # of it, whatever is left when the second one arrives
    assert 4 <= int(busy.headers["Retry-After"]) <= int(np.ceil(3.5 + running_seconds))
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "ddsnet_rejections_total", reason="client_busy") == 1
    assert metric_value(metrics, "ddsnet_rejections_total", reason="client_pixels") == 0


@pytest.mark.parametrize("setting, value, name", [
    ("max_client_pixels", 1000, "DDSNET_MAX_CLIENT_PIXELS=1000"),
    ("max_request_seconds", 1e-9, "DDSNET_MAX_REQUEST_SECONDS=1e-09"),
])
def test_a_request_over_a_cost_limit_is_a_json_413_naming_it(make_client, photo, setting, value, name, monkeypatch):
    import service.routes

    client, batches = make_client(**{setting: value})
    monkeypatch.setattr(service.routes, "decode_image", lambda *args: pytest.fail("the image was decoded"))
    response = post(client, png_bytes(photo))
    assert response.status_code == 413 and name in response.json()["detail"]
    assert batches == []
    reason = {"max_client_pixels": "client_pixels", "max_request_seconds": "request_seconds"}[setting]
    assert metric_value(client.get("/metrics").text, "ddsnet_rejections_total", reason=reason) == 1


@pytest.mark.parametrize("fair, policy", [(True, "fair"), (False, "oldest_first")])
def test_info_shows_the_sharing_policy_the_clients_and_the_limits(make_client, photo, fair, policy):
    client, _ = make_client(fair_share=fair, max_client_pixels=5_000_000)
    assert post(client, png_bytes(photo)).status_code == 200
    info = client.get("/info").json()
    assert info["sharing"]["policy"] == policy
    assert info["sharing"]["clients"] == [] and info["sharing"]["clients_in_flight"] == 0  # all answered
    assert info["limits"] == {"request_timeout_s": 300.0, "max_client_pixels": 5_000_000, "max_request_seconds": 0.0,
                              "max_expansion_ratio": 10_000.0}
    schema = client.get("/openapi.json").json()
    assert "429" in schema["paths"]["/denoise"]["post"]["responses"]
    assert "deadline_ms" in {p["name"] for p in schema["paths"]["/denoise"]["post"]["parameters"]}
