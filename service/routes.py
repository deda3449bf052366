"""The HTTP routes. Each reaches the app's state through a small typed getter; ``build_app`` includes
:data:`router`.

``POST /denoise`` runs decode -> gate -> queue by width -> batch -> run -> stitch -> encode.
"""

import asyncio
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import torch
from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from model import Noise, Quality
from service.backends import Runtimes
from service.errors import IMAGE_ERROR_STATUS, error_responses, rejection
from service.guards import client_identity
from service.imaging import ImageError, check_output_format, decode_image, encode_image, media_type, probe
from service.metrics import Metrics
from service.scheduler import CostLimits, Job, Refused, ScheduledResult, Scheduler
from service.settings import Settings

STATIC_DIR = Path(__file__).resolve().parent / "static"  # the browser page: no build step, no CDN

router = APIRouter()


class OutputFormat(str, Enum):
    png = "png"
    jpeg = "jpeg"
    webp = "webp"


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_device(request: Request) -> torch.device:
    return request.app.state.device


def get_runtimes(request: Request) -> Runtimes:
    return request.app.state.runtimes


def get_decode_slots(request: Request) -> asyncio.Semaphore:
    """At most ``max_decodes`` images in memory at once, however many uploads arrive."""
    return request.app.state.decode_slots


def get_scheduler(request: Request) -> Scheduler:
    """The scheduler, once the model is loaded and warmed up; until then a 503."""
    scheduler = getattr(request.app.state, "scheduler", None)
    if scheduler is None or not request.app.state.ready:
        raise HTTPException(503, "model is not loaded yet", headers={"Retry-After": "1"})
    return scheduler


def latency_bound_refusal(max_latency_ms: float, quality: Quality, target_seconds: float) -> str | None:
    """Why a request's ``max_latency_ms`` cannot be honoured, or None when it can."""
    if quality is not Quality.auto:
        return f"max_latency_ms applies to quality=auto only; {quality.value} is never changed"
    if target_seconds <= 0:
        return "max_latency_ms needs the latency controller, which is off (DDSNET_LATENCY_TARGET_MS=0)"
    if max_latency_ms > 1000 * target_seconds:
        return f"max_latency_ms must be at most the server's latency target, {1000 * target_seconds:g} ms"
    return None


@router.get("/", summary="a page to try the service in a browser", response_class=HTMLResponse,
            include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/healthz", summary="liveness")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="readiness: the model is loaded and warmed up", responses=error_responses(503))
async def readyz(request: Request) -> JSONResponse:
    ready = bool(request.app.state.ready)
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@router.get("/info", summary="the sub-network table", responses=error_responses(401, 503))
async def info(scheduler: Annotated[Scheduler, Depends(get_scheduler)], request: Request) -> dict:
    settings = get_settings(request)
    summary = scheduler.denoiser.summary()
    summary["device"] = str(get_device(request))
    summary["engines"] = get_runtimes(request).summary()
    summary["controller"] = scheduler.controller.state(scheduler.pending_pixels)
    summary["batching"] = {"max_batch_tiles": settings.max_batch_tiles, "max_wait_ms": settings.max_wait_ms,
                           "max_queue_tiles": settings.max_queue_tiles}
    summary["sharing"] = scheduler.sharing()
    summary["limits"] = {"request_timeout_s": settings.request_timeout_s,
                         "max_client_pixels": settings.max_client_pixels,
                         "max_request_seconds": settings.max_request_seconds,
                         "max_expansion_ratio": settings.max_expansion_ratio}
    return summary


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}, **error_responses(401)})
async def prometheus_metrics(request: Request) -> Response:
    return Response(generate_latest(get_metrics(request).registry), media_type=CONTENT_TYPE_LATEST)


@router.post(
    "/denoise",
    summary="denoise an image",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}},
              "description": "the denoised image; headers DDSNet-Subnet (what ran), DDSNet-Gate-Subnet (what "
                             "the gate picked, auto only), DDSNet-Reason (gate, load, deadline or requested), "
                             "DDSNet-Profile (whose weights ran), DDSNet-Profile-Reason (gate, jpeg_header or "
                             "requested), DDSNet-GFLOPs, DDSNet-GFLOPs-Widest, DDSNet-Queue-Ms, "
                             "DDSNet-Compute-Ms"},
        **error_responses(400, 401, 413, 415, 422, 429, 503, 504),
    },
)
async def denoise(
    request: Request,
    scheduler: Annotated[Scheduler, Depends(get_scheduler)],
    file: Annotated[UploadFile, File(description="PNG, JPEG, TIFF, WebP or BMP")],
    quality: Annotated[Quality, Query(description="auto: the gate picks; fast: slimmest; best: widest")] = (
        Quality.auto
    ),
    format: Annotated[OutputFormat, Query(description="output image format")] = OutputFormat.png,
    max_latency_ms: Annotated[float | None, Query(
        gt=0, description="auto only: under load, give up width to answer within this bound; at most the "
                          "server's latency target (GET /info, controller)")] = None,
    noise: Annotated[Noise, Query(description="auto: a JPEG upload's header, else the gate, picks the profile; "
                                              "white: sensor or added noise; compressed: JPEG-compressed or "
                                              "otherwise correlated noise")] = Noise.auto,
    deadline_ms: Annotated[float | None, Query(
        gt=0, description="when the answer stops being of use, in ms from the upload's arrival; capped by the "
                          "server's request timeout. Work that cannot be done by then is refused at once (503, "
                          "with Retry-After when the work ahead of it is what makes it late)")] = None,
) -> Response:
    started = time.perf_counter()
    metrics = get_metrics(request)
    metrics.in_flight.inc()
    try:
        return await denoise_upload(request, scheduler, file, quality, format, started, max_latency_ms, noise,
                                    deadline_ms)
    finally:
        metrics.in_flight.dec()


def deadline_seconds(settings: Settings, deadline_ms: float | None) -> tuple[float, str]:
    """A request's deadline in seconds from its arrival, and what set it: its ``deadline_ms``, capped by the
    server's request timeout."""
    if deadline_ms is not None and deadline_ms / 1000 < settings.request_timeout_s:
        return deadline_ms / 1000, f"deadline_ms={deadline_ms:g}"
    return settings.request_timeout_s, f"DDSNET_REQUEST_TIMEOUT_S={settings.request_timeout_s:g}"


async def denoise_upload(request: Request, scheduler: Scheduler, file: UploadFile, quality: Quality,
                         output: OutputFormat, started: float, max_latency_ms: float | None,
                         noise: Noise = Noise.auto, deadline_ms: float | None = None) -> Response:
    """The answer to one upload: read its header and refuse what its size alone rules out (a cost limit, its
    deadline), decode, submit to the scheduler, wait, encode; or the error that stopped it. ``started``
    (``time.perf_counter()``) is when the upload arrived."""
    settings, metrics = get_settings(request), get_metrics(request)
    timeout_s, deadline_source = deadline_seconds(settings, deadline_ms)
    if max_latency_ms is not None:
        refusal = latency_bound_refusal(max_latency_ms, quality, scheduler.controller.target)
        if refusal:
            return rejection(metrics, 422, refusal, quality.value, "invalid_parameter")
    try:
        scheduler.denoiser.check_noise(noise)
    except ValueError as error:
        return rejection(metrics, 422, str(error), quality.value, "invalid_parameter")
    data = await file.read()
    client = client_identity(request)
    limits = CostLimits(settings.max_client_pixels, settings.max_request_seconds)
    try:
        # The header first, outside the decode slots: work refused for its size is refused before the
        # seconds a large image takes to decode, and never waits for a slot.
        width, height = (await run_in_threadpool(probe, data, settings.max_pixels, settings.max_expansion_ratio)).size
        scheduler.check_size(height, width, quality, noise, client, started + timeout_s, limits)
        async with get_decode_slots(request):
            decoded = await run_in_threadpool(decode_image, data, settings.max_pixels, settings.max_expansion_ratio)
        check_output_format(decoded, output.value)  # refuse before spending compute
        job = await scheduler.submit(decoded.rgb, quality, received_at=started,
                                     max_latency_seconds=None if max_latency_ms is None else max_latency_ms / 1000,
                                     noise=noise, jpeg_quality=decoded.jpeg_quality, client=client,
                                     deadline=started + timeout_s, limits=limits)
    except ImageError as error:
        return rejection(metrics, IMAGE_ERROR_STATUS[error.reason], str(error), quality.value, error.reason)
    except Refused as error:
        detail = f"{error} ({deadline_source})" if error.reason == "deadline" else str(error)
        headers = None if error.retry_after is None else {"Retry-After": str(error.retry_after)}
        return rejection(metrics, error.status, detail, quality.value, error.reason, headers)
    metrics.selections.labels(quality.value, str(job.subnet)).inc()
    metrics.profile_selections.labels(job.profile, job.profile_reason).inc()
    given_up = await wait_for_job(request, scheduler, job, quality, started + timeout_s)
    if given_up is not None:
        return given_up
    try:
        result = job.future.result()
    except Exception as error:  # noqa: BLE001 - a failed batch is this request's 500, not the server's
        return rejection(metrics, 500, f"inference failed: {error}", quality.value, "inference_error")
    encoded = await run_in_threadpool(encode_image, result.denoised, decoded, output.value,
                                      settings.png_compress_level)
    metrics.request_seconds.labels(str(result.subnet)).observe(time.perf_counter() - started)
    metrics.requests.labels(quality.value, "200").inc()
    return Response(encoded, media_type=media_type(output.value), headers=result_headers(result, quality))


async def wait_for_job(request: Request, scheduler: Scheduler, job: Job, quality: Quality,
                       deadline: float) -> Response | None:
    """Wait until ``job`` is done (None), or cancel it and answer 504 past ``deadline`` (``time.perf_counter()``)
    or 499 once the client has gone. A 504 is counted as ``admitted_timeout``: admission estimated it would be
    done in time, so beside the refusals for ``deadline`` it shows how far the estimate falls short."""
    metrics = get_metrics(request)
    while not job.future.done():
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            scheduler.cancel(job, "timeout")
            return rejection(metrics, 504, f"not done within {deadline - job.received_at:g} s", quality.value,
                             "admitted_timeout")
        await asyncio.wait({job.future}, timeout=min(0.05, remaining))
        if not job.future.done() and await request.is_disconnected():
            scheduler.cancel(job, "client_disconnected")
            metrics.rejections.labels("client_disconnected").inc()
            metrics.requests.labels(quality.value, "499").inc()
            return Response(status_code=499)
    return None


def result_headers(result: ScheduledResult, quality: Quality) -> dict[str, str]:
    """What ran and what it cost, as the ``DDSNet-*`` response headers."""
    return {
        "DDSNet-Subnet": str(result.subnet),
        "DDSNet-GFLOPs": f"{result.flops / 1e9:.4f}",
        "DDSNet-Queue-Ms": f"{1000 * result.queue_seconds:.1f}",
        "DDSNet-Compute-Ms": f"{1000 * result.compute_seconds:.1f}",
        "DDSNet-GFLOPs-Widest": f"{result.widest_flops / 1e9:.4f}",
        "DDSNet-Quality": quality.value,
        "DDSNet-Reason": result.reason,
        "DDSNet-Profile": result.profile,
        "DDSNet-Profile-Reason": result.profile_reason,
        **({"DDSNet-Gate-Subnet": str(result.gate_subnet)} if result.gate_subnet is not None else {}),
    }
