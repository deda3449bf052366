"""The HTTP service: ``build_app(settings)`` composes the app, ``serve()`` runs it.

The routes are in :mod:`service.routes`, the upload limit and API key in :mod:`service.guards`, the error
contract in :mod:`service.errors`. :func:`init_app_state` loads the model and fills ``app.state``.
"""

import asyncio
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import State

from model import Checkpoint, Denoiser, load_checkpoint, package_version, resolve_device
from model.allocator import tune_allocator
from service import backends
from service.backends import Runtimes
from service.controller import LoadController
from service.errors import error_responses, register_error_handlers
from service.guards import ApiKeyGuard, UploadLimit
from service.metrics import Metrics
from service.routes import STATIC_DIR, router
from service.scheduler import Job, Scheduler
from service.settings import Settings


async def init_app_state(state: State, settings: Settings, checkpoint: Checkpoint | None = None,
                         on_batch: Callable[[int, list[Job]], None] | None = None) -> None:
    """Load the model (or move ``checkpoint``, already loaded) onto its device, and put on ``state`` the
    device, the runtimes (built on first use), the started scheduler and the decode slots. ``state.metrics``
    must be set."""
    metrics: Metrics = state.metrics
    device = resolve_device(settings.device)
    backends.use_threads(settings.torch_threads)
    if checkpoint is None:
        checkpoint = await run_in_threadpool(load_checkpoint, settings.checkpoint, device)
    else:
        for net in checkpoint.nets.values():
            net.to(device)
        checkpoint.gate.to(device)
    denoiser = Denoiser(checkpoint, tile=settings.tile)
    state.runtimes = Runtimes(denoiser, settings.backend, settings.max_batch_tiles, settings.torch_threads,
                              cache_dir=settings.engine_cache_dir())
    controller = LoadController([subnet.mflops_per_pixel for subnet in denoiser.subnets],
                                settings.latency_target_ms / 1000, profiles=[s.profile for s in denoiser.subnets],
                                shed_factor=settings.shed_wait_factor)
    scheduler = Scheduler(denoiser, metrics, state.runtimes, settings.max_batch_tiles, settings.max_wait_ms,
                          settings.max_queue_tiles, on_batch=on_batch, controller=controller, fair=settings.fair_share)
    if device.type == "cuda":
        metrics.device_memory.set_function(lambda: torch.cuda.memory_allocated(device))
    scheduler.start()
    state.scheduler = scheduler
    state.device = device
    state.decode_slots = asyncio.Semaphore(settings.max_decodes)


async def warm_up(state: State) -> None:
    """Build every runtime and run each once (see :meth:`Scheduler.warm_up`), and report what runs each."""
    started = time.perf_counter()
    await state.scheduler.warm_up()
    state.metrics.warmup_seconds.set(time.perf_counter() - started)
    for row in state.runtimes.summary()["subnets"]:
        state.metrics.runtime_backend.labels(str(row["subnet"]), row["backend"], row["precision"]).set(1)


def build_app(settings: Settings | None = None, on_batch: Callable[[int, list[Job]], None] | None = None,
              checkpoint: Checkpoint | None = None) -> FastAPI:
    """The FastAPI app. The model loads in ``lifespan`` (or comes loaded, ``checkpoint``); routes reach it
    through ``app.state``.

    Args:
        settings: default: read from the environment.
        on_batch: called with ``(subnet, [the job of each tile])`` for every batch run (instrumentation).
        checkpoint: an already loaded checkpoint to serve instead of ``settings.checkpoint``.
    """
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await init_app_state(app.state, settings, checkpoint, on_batch)
        try:
            if settings.warmup:
                await warm_up(app.state)
            app.state.ready = True
            metrics.ready.set(1)
            yield
        finally:
            app.state.ready = False
            metrics.ready.set(0)
            await app.state.scheduler.stop()

    app = FastAPI(title="ddsnet", version=package_version(), lifespan=lifespan,
                  description="Dynamic slimmable image denoising: a gate picks a sub-network per image.",
                  responses=error_responses(500))
    # Set before the lifespan runs: the guards count into these metrics, and /readyz answers without a model.
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.ready = False
    app.add_middleware(UploadLimit, limit=settings.max_upload_bytes, metrics=metrics)
    app.add_middleware(ApiKeyGuard, settings=settings, metrics=metrics)  # outermost: before any body is read
    register_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(router)
    return app


def serve(host: str = "127.0.0.1", port: int = 8000, checkpoint: str | None = None, backend: str | None = None,
          cache_dir: str | None = None) -> int:
    """Run the service with uvicorn (one process owns the model; see README on scaling)."""
    import uvicorn

    overrides = {"checkpoint": checkpoint, "backend": backend, "cache_dir": cache_dir}
    settings = Settings(**{key: value for key, value in overrides.items() if value})
    tune_allocator(settings.allocator)  # before the server's threads start
    # Refused before the model loads: a runtime the machine cannot build is one error line, not a traceback.
    backends.check_available(settings.backend, resolve_device(settings.device))
    # Loaded here, so that a missing or bad checkpoint is one error line (CheckpointError), not a traceback
    # from the server's start-up; the app then uses this copy.
    loaded = load_checkpoint(settings.checkpoint)
    # Connections: idle keep-alives close after keepalive_s; past max_connections uvicorn answers 503.
    # Header and body read timeouts and per-client connection limits belong to the proxy (docker/nginx).
    # X-Forwarded-For only from the proxies named: uvicorn's default trusts it from 127.0.0.1, where any
    # local client reached directly could pose as many clients and multiply its fair share.
    proxies = settings.trusted_proxies.strip()
    forwarding = {"proxy_headers": True, "forwarded_allow_ips": proxies} if proxies else {"proxy_headers": False}
    uvicorn.run(build_app(settings, checkpoint=loaded), host=host, port=port, log_level="info",
                timeout_keep_alive=settings.keepalive_s, limit_concurrency=settings.max_connections, **forwarding)
    return 0
