"""Service settings, read from the environment (prefix ``DDSNET_``), e.g. ``DDSNET_MAX_BATCH_TILES=8``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.checkpoint import DEFAULT_CHECKPOINT
from model.tiling import DEFAULT_TILE
from service.engine_cache import default_root


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DDSNET_", extra="ignore")

    checkpoint: str = DEFAULT_CHECKPOINT
    device: str = Field("auto", description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1', ...")
    tile: int = Field(DEFAULT_TILE, ge=8, description="core side of a tile, pixels (a multiple of 8)")
    max_batch_tiles: int = Field(4, ge=1, description="most tiles in one batch (1 turns batching off; on the CPU "
                                 "under fair sharing a batch is one tile)")
    max_wait_ms: float = Field(5.0, ge=0, description="longest a batch waits to fill up (not on the CPU under fair "
                               "sharing)")
    max_queue_tiles: int = Field(512, ge=1, description="queued tiles over all widths before 503")
    latency_target_ms: float = Field(2000.0, ge=0, description="under load, auto gives up width to answer within "
                                     "this; 0 turns the controller off")
    shed_wait_factor: float = Field(1.0, ge=0, description="503 (Retry-After) for an auto request that, even at the "
                                    "slimmest width, would wait more than this many latency targets beyond its "
                                    "own compute; 0: never shed")
    max_upload_bytes: int = Field(25 * 1024 * 1024, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    request_timeout_s: float = Field(300.0, gt=0, description="504 past it; a request's deadline, at most; work "
                                     "that cannot be done by its deadline is refused at once (503)")
    fair_share: bool = Field(True, description="share the device between clients and their requests by deficit "
                             "round robin; false: the oldest tile runs first")
    max_client_pixels: int = Field(100_000_000, ge=0, description="image pixels one client may have in flight "
                                   "before 429; 0: no limit")
    max_request_seconds: float = Field(0.0, ge=0, description="413 for a request whose own compute, estimated at "
                                       "the slimmest width it may run, is longer; 0: no ceiling but its deadline")
    max_expansion_ratio: float = Field(10_000.0, ge=0, description="413 for an upload whose decoded pixels take "
                                       "more times its bytes, read from the header before decoding; 0: no limit. "
                                       "Photos and PNG screenshots stay far below it; flat lossless WebP and blank "
                                       "Group 4 TIFF pages can pass it")
    trusted_proxies: str = Field("", description="addresses or networks (comma-separated, '*': any) whose "
                                 "X-Forwarded-For names the client; empty: none, the peer is the client")
    api_key: str | None = Field(None, description="when set, requests need 'Authorization: Bearer <key>'")
    protect_operations: bool = Field(False, description="with api_key: /metrics, /info and the API docs need it too")
    png_compress_level: int = Field(1, ge=0, le=9, description="zlib level of PNG answers: 1 encodes 4x "
                                    "faster than 6 for files 16% larger (benchmarks.encode)")
    max_decodes: int = Field(2, ge=1, description="uploads decoded at once, each of at most max_pixels")
    max_connections: int = Field(256, ge=1, description="open connections and requests before 503 (uvicorn)")
    keepalive_s: float = Field(5.0, gt=0, description="an idle keep-alive connection is closed after this")
    backend: str = Field("auto", description="engine per sub-network: 'auto' (the fastest installed, timed at "
                         "start), 'torch', 'onnxruntime' or 'openvino'")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads for the inference worker")
    cache: bool = Field(True, description="keep built engines and their measured speeds in cache_dir for the "
                        "next process ('off' builds and times them in every process)")
    cache_dir: str | None = Field(None, description="the engine cache's folder (default: $XDG_CACHE_HOME/ddsnet)")
    allocator: Literal["keep", "system"] = Field("keep", description="'keep': large tensors come from the heap "
                                                 "and freed memory is kept for reuse, which spares a page fault "
                                                 "on every page of every layer's output (about 2x for eager torch "
                                                 "on large tiles) but holds the largest job's peak memory; "
                                                 "'system': glibc's defaults (model.allocator)")
    warmup: bool = True

    def engine_cache_dir(self) -> Path | None:
        """The engine cache's folder, or ``None`` when the cache is off."""
        if not self.cache:
            return None
        return Path(self.cache_dir) if self.cache_dir else default_root()

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, backend: str) -> str:
        from service.backends import CHOICES

        if backend not in CHOICES:
            raise ValueError(f"backend must be one of {', '.join(CHOICES)}")
        return backend

    @field_validator("api_key")
    @classmethod
    def _usable_key(cls, key: str | None) -> str | None:
        """An empty key means none; a key must be printable ASCII without spaces (an RFC 6750 token)."""
        if not key:
            return None
        if not all("!" <= char <= "~" for char in key):
            raise ValueError("the API key must be printable ASCII without spaces")
        return key
