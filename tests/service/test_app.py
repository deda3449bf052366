"""App composition (service/app.py): the state the lifespan fills, the model left as loaded, and ``serve``."""

from __future__ import annotations

from fastapi.testclient import TestClient

from model import Denoiser, load_checkpoint
from service.app import build_app
from service.backends import Runtimes
from service.scheduler import Scheduler
from service.settings import Settings


def test_the_lifespan_fills_the_state_and_empties_readiness_on_the_way_out(tiny_checkpoint):
    settings = Settings(checkpoint=tiny_checkpoint, tile=64, backend="torch", max_decodes=3)
    app = build_app(settings)
    # Before the lifespan: what the guards and /readyz need, and no model.
    assert app.state.settings is settings and app.state.metrics is not None and app.state.ready is False
    assert getattr(app.state, "scheduler", None) is None
    with TestClient(app):
        state = app.state
        assert state.ready and isinstance(state.scheduler, Scheduler) and isinstance(state.runtimes, Runtimes)
        assert state.scheduler.runtimes is state.runtimes and state.runtimes.denoiser is state.scheduler.denoiser
        assert str(state.device) == "cpu" and state.decode_slots._value == 3
        # Warm-up built every sub-network's runtime.
        assert len(state.runtimes.summary()["subnets"]) == len(state.scheduler.denoiser.subnets)
    assert app.state.ready is False


def test_the_served_denoiser_holds_what_a_fresh_one_holds_and_no_runtimes(tiny_checkpoint):
    fresh = Denoiser(load_checkpoint(tiny_checkpoint), tile=64)
    with TestClient(build_app(Settings(checkpoint=tiny_checkpoint, tile=64, backend="torch"))) as client:
        served = client.app.state.scheduler.denoiser
        assert set(vars(served)) == set(vars(fresh))
        assert not any(isinstance(value, Runtimes) for value in vars(served).values())


def test_serve_sets_the_connection_limits(tiny_checkpoint, monkeypatch):
    import uvicorn

    from service.app import serve

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: seen.update(options))
    assert serve("127.0.0.1", 0, tiny_checkpoint) == 0
    assert seen["timeout_keep_alive"] == 5.0 and seen["limit_concurrency"] == 256


def test_serve_trusts_x_forwarded_for_only_from_the_proxies_configured(tiny_checkpoint, monkeypatch):
    import uvicorn

    from service.app import serve

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: seen.update(options))
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")  # uvicorn's own setting is not what decides
    assert serve("127.0.0.1", 0, tiny_checkpoint) == 0
    # uvicorn's default would trust it from 127.0.0.1, where `make run` serves clients directly.
    assert seen["proxy_headers"] is False and "forwarded_allow_ips" not in seen
    seen.clear()
    monkeypatch.setenv("DDSNET_TRUSTED_PROXIES", "172.18.0.0/16")
    assert serve("127.0.0.1", 0, tiny_checkpoint) == 0
    assert seen["proxy_headers"] is True and seen["forwarded_allow_ips"] == "172.18.0.0/16"
