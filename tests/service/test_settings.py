"""Settings (service/settings.py): read from ``DDSNET_*``, each value checked when the service starts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("DDSNET_MAX_BATCH_TILES", "8")
    monkeypatch.setenv("DDSNET_BACKEND", "torch")
    monkeypatch.setenv("DDSNET_PROTECT_OPERATIONS", "true")
    settings = Settings()
    assert settings.max_batch_tiles == 8 and settings.backend == "torch" and settings.protect_operations


def test_an_empty_api_key_means_none_and_a_key_with_spaces_is_refused():
    assert Settings(api_key="").api_key is None
    with pytest.raises(ValidationError, match="printable ASCII"):
        Settings(api_key="two words")


def test_an_unknown_backend_is_refused():
    with pytest.raises(ValidationError, match="backend must be one of auto, torch, onnxruntime, openvino"):
        Settings(backend="tensorrt")


def test_a_tile_below_the_smallest_window_is_refused():
    with pytest.raises(ValidationError):
        Settings(tile=0)


def test_the_sharing_and_cost_limit_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("DDSNET_FAIR_SHARE", "false")
    monkeypatch.setenv("DDSNET_MAX_CLIENT_PIXELS", "0")
    monkeypatch.setenv("DDSNET_MAX_REQUEST_SECONDS", "30")
    monkeypatch.setenv("DDSNET_MAX_EXPANSION_RATIO", "5000")
    assert Settings().trusted_proxies == ""  # by default no proxy is trusted
    monkeypatch.setenv("DDSNET_TRUSTED_PROXIES", "10.0.0.2,172.18.0.0/16")
    settings = Settings()
    assert settings.trusted_proxies == "10.0.0.2,172.18.0.0/16"
    assert not settings.fair_share and settings.max_client_pixels == 0
    assert settings.max_request_seconds == 30 and settings.max_expansion_ratio == 5000
    with pytest.raises(ValidationError):
        Settings(max_expansion_ratio=-1)


def test_the_allocator_setting_keeps_freed_memory_unless_told_otherwise(monkeypatch):
    assert Settings().allocator == "keep"
    monkeypatch.setenv("DDSNET_ALLOCATOR", "system")
    assert Settings().allocator == "system"
    with pytest.raises(ValidationError):
        Settings(allocator="jemalloc")
