"""The load controller: width given up only to load, hysteresis, per-request bounds; and a flooded live server."""

from __future__ import annotations

import io
import threading

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model import Denoiser, Gate, GateConfig, SlimUNet, load_checkpoint, save_checkpoint
from service.app import build_app
from service.backends import Runtimes
from service.controller import LoadController
from service.settings import Settings
from tests.conftest import TINY, randomize, tiny_subnets
from tests.service.conftest import metric_value, png_bytes, uvicorn_server

COSTS = [4.0, 2.0, 1.0]  # MFLOPs per pixel: sub-network 0 is the widest


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def measured(target: float = 1.0, **options) -> LoadController:
    """A controller that has seen every width run at 1 microsecond per pixel per MFLOP."""
    controller = LoadController(COSTS, target, clock=FakeClock(), **options)
    for subnet, cost in enumerate(COSTS):
        controller.observe(subnet, 1_000_000, cost)
    return controller


def test_an_empty_queue_keeps_the_gate_pick_whatever_the_size():
    controller = measured(target=1.0)
    decision = controller.choose(0, pixels=24_000_000, pixels_ahead={0: 0, 1: 0, 2: 0})
    assert (decision.subnet, decision.reason) == (0, "gate")
    assert decision.estimated_seconds == pytest.approx(96.0)  # far past the target, and still not slimmer


def test_load_caps_auto_at_the_widest_width_that_fits():
    controller = measured(target=1.0)
    # 0.8 s of work ahead; this image alone costs 0.4 s at 0, 0.2 s at 1, 0.1 s at 2.
    decision = controller.choose(0, pixels=100_000, pixels_ahead={0: 200_000})
    assert (decision.subnet, decision.gate_subnet, decision.reason) == (1, 0, "load")
    assert decision.estimated_seconds == pytest.approx(1.0)
    assert controller.downgrades == 1
    # Nothing fits: the slimmest runs; a pick that is already slimmer than the cap is left alone.
    assert controller.choose(0, pixels=100_000, pixels_ahead={0: 300_000}).subnet == 2
    assert controller.choose(2, pixels=100_000, pixels_ahead={0: 300_000}).reason == "gate"


def test_the_controller_off_never_changes_the_pick():
    controller = measured(target=0.0)
    decision = controller.choose(0, pixels=100_000, pixels_ahead={0: 10_000_000})
    assert (decision.subnet, decision.reason) == (0, "gate") and not controller.enabled


def test_hysteresis_widens_again_only_with_room_to_spare():
    controller = measured(target=1.0, recover=0.7)
    assert controller.choose(0, 100_000, {0: 200_000}).subnet == 1  # 0 would need 1.2 s
    # 0 now fits the target (0.9 s) but not 0.7 of it: the cap holds at 1 instead of flapping back.
    assert controller.choose(0, 100_000, {0: 125_000}).subnet == 1 and controller.cap == 1
    # 0.6 s at 0 fits within 0.7 s: width comes back.
    assert controller.choose(0, 100_000, {0: 50_000}).subnet == 0 and controller.cap == 0
    # An empty queue resets the cap at once.
    controller.choose(0, 100_000, {0: 300_000})
    assert controller.cap == 2
    assert controller.choose(0, 100_000, {}).subnet == 0 and controller.cap == 0


def test_a_request_bound_narrows_only_that_request():
    controller = measured(target=1.0)
    ahead = {1: 200_000}  # 0.4 s ahead; 0 would finish at 0.8 s
    assert controller.choose(0, 100_000, ahead).subnet == 0
    decision = controller.choose(0, 100_000, ahead, max_latency_seconds=0.5)
    assert (decision.subnet, decision.reason) == (2, "load")  # 0.5 s: only the slimmest (0.5 s) fits
    assert controller.cap == 0  # the server's cap did not move for one request's bound


def test_rates_are_an_ewma_and_unmeasured_widths_scale_by_flops():
    clock = FakeClock()
    controller = LoadController(COSTS, 1.0, smoothing=0.25, clock=clock)
    assert controller.rate(1) is None
    controller.observe(1, 1_000, 0.004)  # 4 us per pixel
    assert controller.rate(0) == pytest.approx(8e-6) and controller.rate(2) == pytest.approx(2e-6)
    clock.now = 103.0
    controller.observe(1, 1_000, 0.008)
    assert controller.rate(1) == pytest.approx(4e-6 + 0.25 * 4e-6)
    state = controller.state({1: 1_000})
    assert state["seconds_per_megapixel"] == {"1": 5.0} and state["backlog_seconds"] == pytest.approx(0.005)
    assert state["measured_seconds_ago"] == {"1": 0.0}
    clock.now = 110.0
    assert controller.state({})["measured_seconds_ago"] == {"1": 7.0}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        LoadController(COSTS, -1.0)
    with pytest.raises(ValueError):
        LoadController(COSTS, 1.0, recover=0.0)


@pytest.fixture(scope="module")
def wide_gate_checkpoint(tmp_path_factory) -> str:
    """The tiny checkpoint with a gate that always picks the widest sub-network, so that load can step down."""
    net = randomize(SlimUNet(TINY))
    gate = Gate(GateConfig(num_subnets=3))
    with torch.no_grad():
        gate.fc2.weight.zero_()
        gate.fc2.bias.copy_(torch.tensor([5.0, 0.0, -5.0]))
    path = tmp_path_factory.mktemp("wide") / "wide.safetensors"
    save_checkpoint(path, net, gate, tiny_subnets(net), gate_trained=True, provenance={"made_by": "tests"})
    return str(path)


def test_a_flooded_server_gives_up_width_and_refuses_nothing(wide_gate_checkpoint, photo):
    # A 1 ms target: any queued work is too much, so every request that finds a queue runs slimmest. Shedding
    # off: with it, the requests that find a queue longer than the target at the slimmest width are refused.
    settings = Settings(checkpoint=wide_gate_checkpoint, tile=64, backend="torch", latency_target_ms=1,
                        shed_wait_factor=0)
    app = build_app(settings)
    image = photo[:96, :128]
    payload = png_bytes(image)
    responses: list[httpx.Response] = []
    lock = threading.Lock()
    with uvicorn_server(app) as (url, _):
        def client() -> None:
            with httpx.Client(base_url=url, timeout=120) as http:
                for _ in range(3):
                    response = http.post("/denoise", files={"file": ("x.png", payload, "image/png")})
                    with lock:
                        responses.append(response)

        threads = [threading.Thread(target=client) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        metrics = httpx.get(f"{url}/metrics").text
        info = httpx.get(f"{url}/info").json()["controller"]
    assert [r.status_code for r in responses] == [200] * 36
    reasons = [(r.headers["DDSNet-Gate-Subnet"], r.headers["DDSNet-Subnet"], r.headers["DDSNet-Reason"])
               for r in responses]
    assert set(reasons) <= {("0", "0", "gate"), ("0", "2", "load")}
    downgraded = [r for r in responses if r.headers["DDSNet-Reason"] == "load"]
    assert downgraded, reasons
    assert metric_value(metrics, "ddsnet_load_downgrades_total", **{"from": "0", "to": "2"}) == len(downgraded)
    assert metric_value(metrics, "ddsnet_latency_target_seconds") == 0.001
    assert info["enabled"] and info["load_downgrades"] == len(downgraded) and info["latency_target_ms"] == 1.0
    # All of a request's tiles ran at one width: the answer is that width's output exactly.
    denoiser = Denoiser(load_checkpoint(wide_gate_checkpoint), tile=64)
    runtimes = Runtimes(denoiser, "torch")
    noisy = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    expected = {
        subnet: (denoiser.run(noisy, subnet, runtimes[subnet])[0][0].permute(1, 2, 0).numpy() * 255).round()
        .astype(np.uint8) for subnet in (0, 2)}
    for response in responses:
        served = np.asarray(Image.open(io.BytesIO(response.content)))
        assert np.array_equal(served, expected[int(response.headers["DDSNet-Subnet"])])


def test_max_latency_ms_is_checked_against_the_target(make_client, photo):
    client, _ = make_client(latency_target_ms=500)
    payload = {"file": ("x.png", png_bytes(photo[:40, :40]), "image/png")}
    ok = client.post("/denoise", params={"max_latency_ms": 200}, files=payload)
    assert ok.status_code == 200 and ok.headers["DDSNet-Reason"] == "gate"
    assert ok.headers["DDSNet-Gate-Subnet"] == ok.headers["DDSNet-Subnet"]
    too_long = client.post("/denoise", params={"max_latency_ms": 900}, files=payload)
    assert too_long.status_code == 422 and "at most the server's latency target, 500 ms" in too_long.json()["detail"]
    best = client.post("/denoise", params={"max_latency_ms": 100, "quality": "best"}, files=payload)
    assert best.status_code == 422 and "auto only" in best.json()["detail"]
    requested = client.post("/denoise", params={"quality": "fast"}, files=payload)
    assert requested.headers["DDSNet-Reason"] == "requested" and "DDSNet-Gate-Subnet" not in requested.headers
    off, _ = make_client(latency_target_ms=0)
    refused = off.post("/denoise", params={"max_latency_ms": 100}, files=payload)
    assert refused.status_code == 422 and "controller, which is off" in refused.json()["detail"]


@pytest.mark.parametrize("target", [1.0, 0.0])  # the hard bounds hold with the latency target off too
def test_a_deadline_makes_auto_slimmer_even_unloaded_and_the_slimmest_is_left_for_refusal(target):
    controller = measured(target=target)
    # Alone, 1,000,000 pixels take 4 s at 0, 2 s at 1, 1 s at 2.
    assert controller.choose(0, 1_000_000, {}).subnet == 0
    decision = controller.choose(0, 1_000_000, {}, deadline_seconds=2.5)
    assert (decision.subnet, decision.reason, decision.estimated_seconds) == (1, "deadline", pytest.approx(2.0))
    assert controller.choose(0, 1_000_000, {}, max_own_seconds=1.5).subnet == 2
    assert controller.downgrades == 2
    hopeless = controller.choose(0, 1_000_000, {}, deadline_seconds=0.5)
    assert (hopeless.subnet, hopeless.reason) == (2, "deadline") and hopeless.estimated_seconds > 0.5
    assert controller.downgrades == 2  # left for the caller to refuse: not a downgrade


def test_with_the_target_off_load_alone_never_changes_the_pick():
    ahead = {0: 10_000_000}  # 40 s queued
    decision = measured(target=0.0).choose(0, 100_000, ahead, deadline_seconds=100.0)
    assert (decision.subnet, decision.reason) == (0, "gate")


def test_the_wait_can_come_from_the_scheduler_instead_of_the_whole_backlog():
    ahead = {0: 10_000_000}  # 40 s queued, all ahead when tiles run oldest first
    assert measured(target=1.0).choose(0, 100_000, ahead).subnet == 2
    fair_share = {0: 0.8, 1: 0.5, 2: 0.3}  # seconds until done at each width, from the scheduler
    shared = measured(target=1.0).choose(0, 100_000, ahead, finish=fair_share.__getitem__)
    assert (shared.subnet, shared.reason, shared.estimated_seconds) == (0, "gate", pytest.approx(0.8))
    bounded = measured(target=1.0).choose(0, 100_000, ahead, finish=fair_share.__getitem__, deadline_seconds=0.6)
    assert (bounded.subnet, bounded.reason, bounded.estimated_seconds) == (1, "deadline", pytest.approx(0.5))
