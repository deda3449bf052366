"""What stands before the routes: the upload limit and the API key, both plain ASGI middleware (not
Starlette's ``BaseHTTPMiddleware``), so that routes behind them still see a client's disconnect."""

from __future__ import annotations

import ipaddress
import json
import re
import secrets

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette._utils import get_route_path

from model import Quality
from service.errors import ERRORS, rejection
from service.metrics import Metrics
from service.settings import Settings

BEARER = re.compile(r"bearer ([!-~]+)", re.IGNORECASE)  # RFC 6750: the scheme, one space, the token
# What an operator sees, and what the API key covers too when ``protect_operations`` is set.
OPERATIONS_PATHS = ("/metrics", "/info", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


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


def authorized(request: Request, api_key: str | None) -> bool:
    """Whether ``request`` carries ``Authorization: Bearer <api_key>`` (always, when no key is set)."""
    if api_key is None:
        return True
    match = BEARER.fullmatch(request.headers.get("authorization", ""))
    return match is not None and secrets.compare_digest(match.group(1).encode(), api_key.encode())


def client_identity(request: Request) -> str:
    """Who sent ``request``, for sharing the device: its peer address, an IPv6 peer by its /64 (one host's
    share of a network, which it may spread over many addresses). Behind a proxy the peer is the address
    the proxy forwards, when uvicorn trusts the proxy (``DDSNET_TRUSTED_PROXIES``). The API key is not used:
    with one key configured, every client presents the same one. The identity is never shown or used as a
    label as it is."""
    if request.client is None or not request.client.host:
        return "peer:unknown"
    host = request.client.host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"peer:{host}"  # a name, not an address (a test client, a Unix socket)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"peer:{address.ipv4_mapped}"
        return f"peer:{ipaddress.IPv6Network((address, 64), strict=False)}"
    return f"peer:{address}"


class ApiKeyGuard:
    """Answers 401 before the body is read to a request without the key: ``/denoise`` always needs it (when
    one is set), the operations paths with ``protect_operations``."""

    def __init__(self, app, settings: Settings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics

    def refusal(self, request: Request) -> JSONResponse | None:
        """The 401 for ``request``, or None when it may pass."""
        path = get_route_path(request.scope)  # as the router matches it, behind any root path
        guarded = path == "/denoise" or (self.settings.protect_operations and path in OPERATIONS_PATHS)
        if not guarded or authorized(request, self.settings.api_key):
            return None
        quality = request.query_params.get("quality", Quality.auto.value)
        quality = quality if quality in {q.value for q in Quality} else "unknown"
        return rejection(self.metrics, 401, ERRORS[401], quality, "unauthorized", {"WWW-Authenticate": "Bearer"})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            response = self.refusal(Request(scope))
            if response is not None:
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
