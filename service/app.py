"""The HTTP service: ``build_app(settings)`` and ``serve()``.

``POST /denoise`` runs decode -> gate -> queue by width -> batch -> run -> stitch -> encode.
"""


import asyncio
import json
import re
import secrets
import time
from contextlib import asynccontextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated

import torch
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette._utils import get_route_path
from starlette.exceptions import HTTPException as StarletteHTTPException

from model import Checkpoint, Denoiser, Quality, load_checkpoint, package_version, resolve_device
from service import backends
from service.backends import use_backend
from service.controller import LoadController
from service.engine import Engine, QueueFull
from service.imaging import ImageError, check_output_format, decode_image, encode_image, media_type
from service.metrics import Metrics
from service.settings import Settings

STATIC_DIR = Path(__file__).resolve().parent / "static"  # the browser page: no build step, no CDN
IMAGE_ERROR_STATUS = {"empty": 422, "corrupt": 422, "unsupported": 415, "too_large": 413, "bad_output": 422}
BEARER = re.compile(r"bearer ([!-~]+)", re.IGNORECASE)  # RFC 6750: the scheme, one space, the token
# What an operator sees, and what the API key covers too when ``protect_operations`` is set.
OPERATIONS_PATHS = ("/metrics", "/info", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
MAX_DETAIL = 300  # characters of an error message; an error never echoes the request back


class ErrorBody(BaseModel):
    """Every error's body."""

    detail: str


def error_response(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail[:MAX_DETAIL]}, status_code=status, headers=headers)


def validation_detail(error: RequestValidationError) -> str:
    """Where and what, for each problem; never the offending input."""
    parts = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
        parts.append(f"{where}: {problem.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


ERRORS = {
    400: "malformed request",
    401: "missing or wrong API key",
    413: "upload or image too large",
    415: "not an image, or an unsupported format",
    422: "a missing or invalid field, an empty, truncated or corrupt image, or an output format that cannot carry it",
    500: "internal error",
    503: "queue full or model not ready (see Retry-After)",
    504: "request timed out",
}


def error_responses(*statuses: int) -> dict:
    """OpenAPI ``responses`` for these error statuses, each with the :class:`ErrorBody` schema."""
    return {status: {"model": ErrorBody, "description": ERRORS[status]} for status in statuses}


class OutputFormat(str, Enum):
    png = "png"
    jpeg = "jpeg"
    webp = "webp"


class UploadLimit:
    """Refuses bodies over ``limit`` bytes on ``POST /denoise``: from Content-Length before reading, and from
    a running count while the body streams in (for chunked uploads or a lying header)."""

    def __init__(self, app, limit: int, metrics: Metrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def _refuse(self, send) -> None:
        self.metrics.rejections.labels("upload_too_large").inc()
        self.metrics.requests.labels("unknown", "413").inc()
        body = json.dumps({"detail": f"upload larger than {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or get_route_path(scope) != "/denoise" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        received, exceeded, responded = 0, False, False

        async def counting_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal responded
            if exceeded:  # whatever the app says about the cut-off body, the answer is 413
                if not responded:
                    responded = True
                    await self._refuse(send)
                return
            responded = True
            await send(message)

        await self.app(scope, counting_receive, guarded_send)
        if exceeded and not responded:
            await self._refuse(send)


class ApiKeyGuard:
    """Answers a request that ``refuse`` refuses before its body is read. Plain ASGI (not Starlette's
    ``BaseHTTPMiddleware``), so that routes behind it still see a client's disconnect."""

    def __init__(self, app, refuse) -> None:
        self.app, self.refuse = app, refuse

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            response = self.refuse(Request(scope))
            if response is not None:
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def latency_bound_refusal(max_latency_ms: float, quality: Quality, target_seconds: float) -> str | None:
    """Why a request's ``max_latency_ms`` cannot be honoured, or None when it can."""
    if quality is not Quality.auto:
        return f"max_latency_ms applies to quality=auto only; {quality.value} is never changed"
    if target_seconds <= 0:
        return "max_latency_ms needs the latency controller, which is off (DDSNET_LATENCY_TARGET_MS=0)"
    if max_latency_ms > 1000 * target_seconds:
        return f"max_latency_ms must be at most the server's latency target, {1000 * target_seconds:g} ms"
    return None


def build_app(settings: Settings | None = None, on_batch=None, checkpoint: Checkpoint | None = None) -> FastAPI:
    """The FastAPI app. The model loads in ``lifespan`` (or comes loaded, ``checkpoint``); routes reach it
    through ``app.state``."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        device = resolve_device(settings.device)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        if checkpoint is None:
            loaded = await run_in_threadpool(load_checkpoint, settings.checkpoint, device)
        else:
            loaded = checkpoint
            loaded.net.to(device)
            loaded.gate.to(device)
        denoiser = Denoiser(loaded, tile=settings.tile)
        app.state.engines = use_backend(denoiser, settings.backend, settings.max_batch_tiles, settings.torch_threads)
        controller = LoadController([subnet.mflops_per_pixel for subnet in denoiser.subnets],
                                    settings.latency_target_ms / 1000)
        engine = Engine(denoiser, metrics, settings.max_batch_tiles, settings.max_wait_ms, settings.max_queue_tiles,
                        on_batch=on_batch, controller=controller)
        if device.type == "cuda":
            metrics.device_memory.set_function(lambda: torch.cuda.memory_allocated(device))
        engine.start()
        app.state.engine = engine
        app.state.device = device
        try:
            if settings.warmup:
                started = time.perf_counter()
                await engine.warm_up()
                metrics.warmup_seconds.set(time.perf_counter() - started)
                for row in app.state.engines.summary()["subnets"]:
                    metrics.engine_backend.labels(str(row["subnet"]), row["backend"], row["precision"]).set(1)
            app.state.ready = True
            metrics.ready.set(1)
            yield
        finally:
            app.state.ready = False
            metrics.ready.set(0)
            await engine.stop()

    app = FastAPI(title="ddsnet", version=package_version(), lifespan=lifespan,
                  description="Dynamic slimmable image denoising: a gate picks a sub-network per image.",
                  responses=error_responses(500))
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.ready = False
    app.add_middleware(UploadLimit, limit=settings.max_upload_bytes, metrics=metrics)
    decodes = asyncio.Semaphore(settings.max_decodes)

    def authorized(request: Request) -> bool:
        if settings.api_key is None:
            return True
        match = BEARER.fullmatch(request.headers.get("authorization", ""))
        return match is not None and secrets.compare_digest(match.group(1).encode(), settings.api_key.encode())

    def fail(status: int, detail: str, quality: str, reason: str, headers: dict | None = None) -> JSONResponse:
        """A refused request: counted under ``reason`` and under its status, answered in the error schema."""
        metrics.rejections.labels(reason).inc()
        metrics.requests.labels(quality, str(status)).inc()
        return error_response(status, detail, headers)

    def unauthorized(quality: str) -> JSONResponse:
        return fail(401, ERRORS[401], quality, "unauthorized", {"WWW-Authenticate": "Bearer"})

    def refusal(request: Request) -> Response | None:
        """/denoise always needs the key (when one is set), the operations paths with ``protect_operations``."""
        path = get_route_path(request.scope)  # as the router matches it, behind any root path
        guarded = path == "/denoise" or (settings.protect_operations and path in OPERATIONS_PATHS)
        if not guarded or authorized(request):
            return None
        quality = request.query_params.get("quality", Quality.auto.value)
        return unauthorized(quality if quality in {q.value for q in Quality} else "unknown")

    app.add_middleware(ApiKeyGuard, refuse=refusal)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(422, validation_detail(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        metrics.rejections.labels("internal_error").inc()
        return error_response(500, ERRORS[500])

    def get_engine(request: Request) -> Engine:
        engine = getattr(request.app.state, "engine", None)
        if engine is None or not request.app.state.ready:
            raise HTTPException(503, "model is not loaded yet", headers={"Retry-After": "1"})
        return engine


    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", summary="a page to try the service in a browser", response_class=HTMLResponse,
             include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/healthz", summary="liveness")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="readiness: the model is loaded and warmed up", responses=error_responses(503))
    async def readyz(request: Request) -> JSONResponse:
        ready = bool(request.app.state.ready)
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/info", summary="the sub-network table", responses=error_responses(401, 503))
    async def info(engine: Annotated[Engine, Depends(get_engine)], request: Request) -> dict:
        summary = engine.denoiser.summary()
        summary["device"] = str(request.app.state.device)
        summary["engines"] = request.app.state.engines.summary()
        summary["controller"] = engine.controller.state(engine.pending_pixels)
        summary["batching"] = {"max_batch_tiles": settings.max_batch_tiles, "max_wait_ms": settings.max_wait_ms,
                               "max_queue_tiles": settings.max_queue_tiles}
        return summary

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format"}, **error_responses(401)})
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/denoise",
        summary="denoise an image",
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}},
                  "description": "the denoised image; headers DDSNet-Subnet (what ran), DDSNet-Gate-Subnet (what "
                                 "the gate picked, auto only), DDSNet-Reason (gate, load or requested), "
                                 "DDSNet-GFLOPs, DDSNet-GFLOPs-Widest, DDSNet-Queue-Ms, DDSNet-Compute-Ms"},
            **error_responses(400, 401, 413, 415, 422, 503, 504),
        },
    )
    async def denoise(
        request: Request,
        engine: Annotated[Engine, Depends(get_engine)],
        file: Annotated[UploadFile, File(description="PNG, JPEG, TIFF, WebP or BMP")],
        quality: Annotated[Quality, Query(description="auto: the gate picks; fast: slimmest; best: widest")] = (
            Quality.auto
        ),
        format: Annotated[OutputFormat, Query(description="output image format")] = OutputFormat.png,
        max_latency_ms: Annotated[float | None, Query(
            gt=0, description="auto only: under load, give up width to answer within this bound; at most the "
                              "server's latency target (GET /info, controller)")] = None,
    ) -> Response:
        started = time.perf_counter()
        metrics.in_flight.inc()
        try:
            return await _denoise(request, engine, file, quality, format, started, max_latency_ms)
        finally:
            metrics.in_flight.dec()

    async def _denoise(request, engine: Engine, file: UploadFile, quality: Quality, output: OutputFormat,
                       started: float, max_latency_ms: float | None) -> Response:
        if max_latency_ms is not None:
            refusal = latency_bound_refusal(max_latency_ms, quality, engine.controller.target)
            if refusal:
                return fail(422, refusal, quality.value, "invalid_parameter")
        data = await file.read()
        try:
            async with decodes:  # at most max_decodes images in memory at once, however many uploads arrive
                decoded = await run_in_threadpool(decode_image, data, settings.max_pixels)
            check_output_format(decoded, output.value)  # refuse before spending compute
        except ImageError as error:
            return fail(IMAGE_ERROR_STATUS[error.reason], str(error), quality.value, error.reason)
        try:
            job = await engine.submit(decoded.rgb, quality, received_at=started,
                                      max_latency_seconds=None if max_latency_ms is None else max_latency_ms / 1000)
        except QueueFull as error:
            return fail(503, f"queue full: {error}", quality.value, "queue_full", {"Retry-After": "1"})
        metrics.selections.labels(quality.value, str(job.subnet)).inc()

        deadline = started + settings.request_timeout_s
        while not job.future.done():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                engine.cancel(job, "timeout")
                return fail(504, f"not done within {settings.request_timeout_s} s", quality.value, "timeout")
            await asyncio.wait({job.future}, timeout=min(0.05, remaining))
            if not job.future.done() and await request.is_disconnected():
                engine.cancel(job, "client_disconnected")
                metrics.rejections.labels("client_disconnected").inc()
                metrics.requests.labels(quality.value, "499").inc()
                return Response(status_code=499)
        try:
            result = job.future.result()
        except Exception as error:  # noqa: BLE001 - a failed batch is this request's 500, not the server's
            return fail(500, f"inference failed: {error}", quality.value, "inference_error")
        encoded = await run_in_threadpool(encode_image, result.denoised, decoded, output.value,
                                          settings.png_compress_level)
        elapsed = time.perf_counter() - started
        metrics.request_seconds.labels(str(result.subnet)).observe(elapsed)
        metrics.requests.labels(quality.value, "200").inc()
        headers = {
            "DDSNet-Subnet": str(result.subnet),
            "DDSNet-GFLOPs": f"{result.flops / 1e9:.4f}",
            "DDSNet-Queue-Ms": f"{1000 * result.queue_seconds:.1f}",
            "DDSNet-Compute-Ms": f"{1000 * result.compute_seconds:.1f}",
            "DDSNet-GFLOPs-Widest": f"{result.widest_flops / 1e9:.4f}",
            "DDSNet-Quality": quality.value,
            "DDSNet-Reason": result.reason,
            **({"DDSNet-Gate-Subnet": str(result.gate_subnet)} if result.gate_subnet is not None else {}),
        }
        return Response(encoded, media_type=media_type(output.value), headers=headers)

    return app


def serve(host: str = "127.0.0.1", port: int = 8000, checkpoint: str | None = None, backend: str | None = None) -> int:
    """Run the service with uvicorn (one process owns the model; see README on scaling)."""
    import uvicorn

    overrides = {"checkpoint": checkpoint, "backend": backend}
    settings = Settings(**{key: value for key, value in overrides.items() if value})
    # Refused before the model loads: an engine the machine cannot build is one error line, not a traceback.
    backends.check_available(settings.backend, resolve_device(settings.device))
    # Loaded here, so that a missing or bad checkpoint is one error line (CheckpointError), not a traceback
    # from the server's start-up; the app then uses this copy.
    loaded = load_checkpoint(settings.checkpoint)
    # Connections: idle keep-alives close after keepalive_s; past max_connections uvicorn answers 503.
    # Header and body read timeouts and per-client connection limits belong to the proxy (docker/nginx).
    uvicorn.run(build_app(settings, checkpoint=loaded), host=host, port=port, log_level="info",
                timeout_keep_alive=settings.keepalive_s, limit_concurrency=settings.max_connections)
    return 0
