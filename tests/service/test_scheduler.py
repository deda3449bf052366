"""The scheduler (service/scheduler.py): queues by width and window shape, fair sharing between clients and
requests (and oldest first), admission against deadlines and cost limits, cancellation, back-pressure, the
gate's own lane, and the runtimes it is handed."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable

import pytest
import torch
from prometheus_client import generate_latest

from model import Denoiser, Quality, Selection, load_checkpoint
from service.controller import LoadController
from service.metrics import Metrics
from service.scheduler import (
    ClientBusy,
    CostLimits,
    DeadlineMiss,
    DeficitRoundRobin,
    Job,
    OverLimit,
    Overloaded,
    QueueFull,
    Scheduler,
)
from tests.service.conftest import metric_value


@pytest.fixture
def denoiser(tiny_checkpoint) -> Denoiser:
    return Denoiser(load_checkpoint(tiny_checkpoint), tile=64)


def scheduled(denoiser: Denoiser, scenario, metrics: Metrics | None = None, **options):
    """Run ``await scenario(scheduler)`` on a fresh event loop with a scheduler that is stopped afterwards."""
    async def run():
        scheduler = Scheduler(denoiser, metrics or Metrics(), **options)
        try:
            return await scenario(scheduler)
        finally:
            await scheduler.stop()

    return asyncio.run(run())


def image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fair, sequential, largest", [(False, True, 3), (True, False, 3), (True, True, 1)])
def test_tiles_queue_by_width_and_window_shape_and_every_batch_holds_one_width(denoiser, fair, sequential, largest):
    batches: list[tuple[int, list]] = []

    async def scenario(scheduler: Scheduler):
        scheduler.sequential = sequential  # False: a batch fills as it does on a GPU
        jobs = [await scheduler.submit(image(*size, seed), quality) for seed, (size, quality) in enumerate(
            [((300, 200), Quality.best), ((90, 250), Quality.fast), ((300, 200), Quality.fast),
             ((64, 64), Quality.best), ((150, 97), Quality.auto)])]
        for (subnet, shape), queue in scheduler.queues.items():
            assert all(work.job.subnet == subnet and work.job.image.tiles[work.index].shape == shape
                       for work in queue), (subnet, shape)
        assert scheduler.queued_tiles == sum(len(job.image.tiles) for job in jobs)
        scheduler.start()
        await asyncio.wait_for(asyncio.gather(*(job.future for job in jobs)), timeout=60)
        return jobs

    jobs = scheduled(denoiser, scenario, max_batch_tiles=3, max_wait_ms=50, fair=fair,
                     on_batch=lambda subnet, batch: batches.append((subnet, batch)))
    assert {job.subnet for job in jobs} >= {denoiser.best_index, denoiser.fast_index}
    assert all(all(job.subnet == subnet for job in batch) and len(batch) <= 3 for subnet, batch in batches)
    assert sum(len(batch) for _, batch in batches) == sum(len(job.image.tiles) for job in jobs)
    # Fairly on the CPU a batch is one tile: the turn is picked again before every window.
    assert max(len(batch) for _, batch in batches) == largest


@pytest.mark.parametrize("fair", [True, False])
def test_one_clients_single_tile_requests_run_in_arrival_order_whatever_their_width(denoiser, fair):
    order: list[int] = []

    async def scenario(scheduler: Scheduler):
        # Two slim requests around a wide one: serving by width or by queue length would run both slim ones first.
        jobs = [await scheduler.submit(image(64, 64, seed), quality)
                for seed, quality in enumerate((Quality.fast, Quality.best, Quality.fast))]
        scheduler.start()
        await asyncio.wait_for(asyncio.gather(*(job.future for job in jobs)), timeout=60)
        return jobs

    jobs = scheduled(denoiser, scenario, max_batch_tiles=1, max_wait_ms=0, fair=fair,
                     on_batch=lambda subnet, batch: order.extend(job.id for job in batch))
    assert order == [job.id for job in jobs]


def test_cancel_drops_the_queued_tiles_and_resolves_nothing(denoiser):
    metrics = Metrics()

    async def scenario(scheduler: Scheduler):
        job = await scheduler.submit(image(300, 200), Quality.best)
        queued = scheduler.queued_tiles
        scheduler.cancel(job, "timeout")
        return job, queued, scheduler

    job, queued, scheduler = scheduled(denoiser, scenario, metrics)
    assert queued == len(job.image.tiles) > 1
    assert job.cancelled and job.future.cancelled()
    assert scheduler.queued_tiles == 0 and not any(scheduler.queues.values())
    assert set(scheduler.pending_pixels.values()) == {0}
    text = generate_latest(metrics.registry).decode()
    assert metric_value(text, "ddsnet_dropped_tiles_total", reason="timeout") == queued
    assert metric_value(text, "ddsnet_queue_tiles", subnet=str(denoiser.best_index)) == 0


def test_a_request_that_would_overflow_the_queue_is_refused_until_room_is_made(denoiser):
    tiles = len(denoiser.split(image(300, 200)).tiles)

    async def scenario(scheduler: Scheduler):
        first = await scheduler.submit(image(300, 200), Quality.fast)
        with pytest.raises(QueueFull, match=f"{tiles} tiles queued; this image needs {tiles} more"):
            await scheduler.submit(image(300, 200), Quality.fast)
        scheduler.cancel(first, "client_disconnected")
        second = await scheduler.submit(image(300, 200), Quality.fast)
        return second.remaining

    assert scheduled(denoiser, scenario, max_queue_tiles=tiles) == tiles


def test_a_request_that_would_not_fit_an_empty_queue_is_over_the_limit_at_once(denoiser):
    tiles = len(denoiser.split(image(300, 200)).tiles)

    async def scenario(scheduler: Scheduler):
        with pytest.raises(OverLimit, match=f"needs {tiles} tiles, over DDSNET_MAX_QUEUE_TILES={tiles - 1}") as refused:
            await scheduler.submit(image(300, 200), Quality.fast)
        return refused.value.reason, refused.value.retry_after, scheduler.queued_tiles

    assert scheduled(denoiser, scenario, max_queue_tiles=tiles - 1) == ("queue_tiles", None, 0)


def test_windows_run_through_the_runtimes_it_is_handed(denoiser):
    calls: list[tuple[int, tuple]] = []

    def runtime_for(index: int):
        def run(windows: torch.Tensor) -> torch.Tensor:
            calls.append((index, tuple(windows.shape)))
            return torch.full_like(windows, 0.25)
        return run

    async def scenario(scheduler: Scheduler):
        scheduler.start()
        job = await scheduler.submit(image(150, 97), Quality.fast)
        return await asyncio.wait_for(job.future, timeout=60)

    before = dict(vars(denoiser))
    result = scheduled(denoiser, scenario, runtimes={i: runtime_for(i) for i in range(len(denoiser.subnets))})
    assert result.subnet == denoiser.fast_index and torch.all(result.denoised == 0.25)
    assert calls and {index for index, _ in calls} == {denoiser.fast_index}
    assert vars(denoiser) == before  # the runtimes are the scheduler's; the model object is untouched


def test_a_cancelled_request_stops_costing_compute_at_its_next_tile(make_client):
    # Oldest first, so that a batch of 8 runs on the CPU too, one window after another.
    client, _ = make_client(max_batch_tiles=8, max_wait_ms=50, fair_share=False)
    scheduler = client.app.state.scheduler
    ran: list[int] = []
    original = scheduler.run_windows
    first_window = threading.Event()
    cancelled = threading.Event()

    def window_then_wait(windows, index):
        ran.append(len(windows))
        first_window.set()
        cancelled.wait(timeout=30)  # the request is cancelled while its first window runs
        return original(windows, index)

    scheduler.run_windows = window_then_wait
    big = torch.rand(1, 3, 64 * 6, 64 * 6)  # 36 tiles of 64 at tile=64; the first batch takes 8

    async def submit_then_cancel():
        job = await scheduler.submit(big, Quality.best)
        while not first_window.is_set():
            await asyncio.sleep(0.01)
        scheduler.cancel(job, "client_disconnected")
        cancelled.set()
        await asyncio.sleep(0.3)  # the rest of the batch: skipped windows never reach run_windows
        return job

    job = client.portal.call(submit_then_cancel)
    assert job.cancelled
    assert sum(ran) == 1, f"{sum(ran)} of the first batch's 8 windows ran, though the request was cancelled"


def test_the_gate_does_not_wait_behind_a_running_batch(make_client):
    client, _ = make_client(max_batch_tiles=1, max_wait_ms=0)
    scheduler = client.app.state.scheduler
    original = scheduler.run_windows
    batch_running, release = threading.Event(), threading.Event()

    def held(windows, index):
        batch_running.set()
        release.wait(timeout=30)
        return original(windows, index)

    scheduler.run_windows = held

    async def gate_while_a_batch_runs():
        first = await scheduler.submit(torch.rand(1, 3, 64, 64), Quality.best)
        while not batch_running.is_set():
            await asyncio.sleep(0.01)
        second = await asyncio.wait_for(scheduler.submit(torch.rand(1, 3, 64, 64), Quality.auto), timeout=10)
        gated_while_held = not release.is_set()
        release.set()
        await asyncio.wait_for(asyncio.gather(first.future, second.future), timeout=30)
        return gated_while_held

    assert client.portal.call(gate_while_a_batch_runs)


def test_queue_time_counts_from_the_upload(make_client):
    client, _ = make_client()
    scheduler = client.app.state.scheduler

    async def submit_received_earlier():
        received = time.perf_counter() - 0.5  # the upload arrived half a second before the submit
        job = await scheduler.submit(torch.rand(1, 3, 64, 64), Quality.fast, received_at=received)
        return await job.future

    assert client.portal.call(submit_received_earlier).queue_seconds >= 0.5


def test_a_request_that_arrives_while_the_idle_scheduler_trims_memory_is_still_served(make_client, monkeypatch):
    import service.scheduler

    client, _ = make_client()
    scheduler = client.app.state.scheduler
    trimming = threading.Event()

    def slow_trim():
        trimming.set()
        time.sleep(0.3)

    monkeypatch.setattr(service.scheduler, "release_free_memory", slow_trim)

    async def submit_during_the_trim():
        first = await scheduler.submit(torch.rand(1, 3, 64, 64), Quality.fast)
        await first.future  # the queue drains: the scheduler goes idle and trims
        while not trimming.is_set():
            await asyncio.sleep(0.01)
        second = await scheduler.submit(torch.rand(1, 3, 64, 64), Quality.fast)
        return await asyncio.wait_for(second.future, timeout=10)

    assert client.portal.call(submit_during_the_trim).subnet == 2


class FakeClock:
    """Seconds that pass only when a fake runtime says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def speeds(denoiser: Denoiser) -> dict[int, float]:
    """Seconds per pixel of each sub-network: 1 microsecond at the widest, the others in proportion to FLOPs."""
    widest = denoiser.subnets[denoiser.best_index].mflops_per_pixel
    return {index: 1e-6 * subnet.mflops_per_pixel / widest for index, subnet in enumerate(denoiser.subnets)}


def timed_runtimes(denoiser: Denoiser, clock: FakeClock, after: Callable[[], None] = lambda: None,
                   rates: dict[int, float] | None = None) -> dict:
    """Runtimes that return their windows, advance ``clock`` by each width's speed (``rates``, seconds per
    pixel; default :func:`speeds`), and then call ``after``."""
    def runtime_for(seconds_per_pixel: float):
        def run(windows: torch.Tensor) -> torch.Tensor:
            clock.now += seconds_per_pixel * windows.shape[0] * windows.shape[-2] * windows.shape[-1]
            after()
            return windows
        return run

    return {index: runtime_for(rate) for index, rate in (rates or speeds(denoiser)).items()}


def measured_controller(denoiser: Denoiser, target_seconds: float = 0.0,
                        rates: dict[int, float] | None = None, shed_factor: float = 0.0) -> LoadController:
    """A controller that knows every width's speed (``rates``, seconds per pixel; default :func:`speeds`)."""
    controller = LoadController([s.mflops_per_pixel for s in denoiser.subnets], target_seconds,
                                profiles=[s.profile for s in denoiser.subnets], shed_factor=shed_factor)
    for index, rate in (rates or speeds(denoiser)).items():
        controller.observe(index, 1_000_000, rate * 1_000_000)
    return controller


def identity_runtimes(denoiser: Denoiser) -> dict:
    return {index: (lambda windows: windows) for index in range(len(denoiser.subnets))}


def large_tiles_before_the_last_small_one(batches: list[list], large, small: list) -> int:
    ran = [job for batch in batches for job in batch]
    last_small = max(position for position, job in enumerate(ran) if job in small)
    return sum(job is large for job in ran[:last_small])


@pytest.mark.parametrize("same_client", [False, True])
def test_a_large_request_and_small_ones_sent_after_it_interleave(denoiser, same_client):
    def run(fair: bool):
        batches: list[list] = []

        async def scenario(scheduler: Scheduler):
            large = await scheduler.submit(image(384, 384), Quality.best, client="a")  # 25 tiles of 128x128
            small = [await scheduler.submit(image(64, 64, seed), Quality.best, client="a" if same_client else "b")
                     for seed in (1, 2, 3)]
            scheduler.start()
            await asyncio.wait_for(asyncio.gather(large.future, *(job.future for job in small)), timeout=60)
            return large, small, dict(scheduler.clients)

        large, small, clients = scheduled(denoiser, scenario, max_batch_tiles=4, max_wait_ms=0, fair=fair,
                                          runtimes=identity_runtimes(denoiser),
                                          on_batch=lambda subnet, jobs: batches.append(jobs))
        assert clients == {}  # nothing stays in flight
        return large_tiles_before_the_last_small_one(batches, large, small)

    # The large request's first tile, one quantum, was its turn; then the small ones' turns came.
    assert run(fair=True) == 1
    assert run(fair=False) == 25  # oldest first: every tile of the large photo goes first


def test_on_the_cpu_a_small_request_sent_while_a_large_one_runs_waits_for_at_most_one_more_of_its_tiles(denoiser):
    sides: list[int] = []  # the side of every window run, in order: 128 the large photo's, 64 the small one's
    running, release = threading.Event(), threading.Event()

    def run(windows: torch.Tensor) -> torch.Tensor:
        sides.append(windows.shape[-1])
        running.set()
        release.wait(timeout=30)  # the first window is held while the small request arrives
        return windows

    async def scenario(scheduler: Scheduler):
        scheduler.start()
        large = await scheduler.submit(image(384, 384), Quality.best, client="a")  # 25 tiles of 128x128
        while not running.is_set():
            await asyncio.sleep(0.01)
        small = await scheduler.submit(image(64, 64, 1), Quality.best, client="a")  # the same client, alone
        release.set()
        await asyncio.wait_for(asyncio.gather(large.future, small.future), timeout=60)
        return scheduler.batch_tiles

    batch_tiles = scheduled(denoiser, scenario, max_batch_tiles=4, max_wait_ms=0,
                            runtimes={index: run for index in range(len(denoiser.subnets))})
    assert batch_tiles == 1 and sides[0] == 128 and sides.count(64) == 1 and len(sides) == 26
    assert sides[1:].index(64) <= 1, sides  # after the window that was running, at most one more large one


def test_on_the_cpu_a_fair_batch_does_not_wait_to_fill(denoiser):
    async def scenario(scheduler: Scheduler):
        scheduler.start()
        job = await scheduler.submit(image(64, 64), Quality.fast)  # one tile, in a lane of batches of up to 4
        return await asyncio.wait_for(job.future, timeout=30)  # a wait to fill would last ten minutes

    assert scheduled(denoiser, scenario, max_batch_tiles=4, max_wait_ms=600_000).subnet == denoiser.fast_index


def test_a_clock_that_stands_still_holds_a_batch_back_no_longer_than_max_wait(denoiser):
    async def scenario(scheduler: Scheduler):
        scheduler.start()
        job = await scheduler.submit(image(64, 64), Quality.fast)  # 1 tile, short of a batch of 4
        return await asyncio.wait_for(job.future, timeout=30)

    # Oldest first, so that the batch waits to fill; the fake clock never reaches the end of that wait.
    result = scheduled(denoiser, scenario, max_batch_tiles=4, max_wait_ms=50, fair=False, clock=FakeClock(),
                       runtimes=identity_runtimes(denoiser))
    assert result.subnet == denoiser.fast_index


@pytest.mark.parametrize("sequential", [True, False])
def test_two_clients_get_equal_shares_of_the_device(denoiser, sequential):
    def run(fair: bool) -> tuple[float, float]:
        holder: list[Scheduler] = []
        served = {"a": 0.0, "b": 0.0}
        shares: list[tuple[float, float]] = []  # cost served to each, after every batch taken while both wait

        def on_batch(subnet: int, jobs: list) -> None:
            for job in jobs:
                served[job.client] += job.tile_cost
            clients = holder[0].clients
            if all(name in clients and clients[name].queued_tiles for name in served):
                shares.append((served["a"], served["b"]))

        async def scenario(scheduler: Scheduler):
            holder.append(scheduler)
            scheduler.sequential = sequential  # False: a batch fills as it does on a GPU
            # a: two large photos of 25 tiles of 128x128; b: 80 small photos of one 64x64 tile (a quarter).
            jobs = [await scheduler.submit(image(384, 384, seed), Quality.best, client="a") for seed in (0, 1)]
            jobs += [await scheduler.submit(image(64, 64, seed), Quality.best, client="b") for seed in range(80)]
            scheduler.start()
            await asyncio.wait_for(asyncio.gather(*(job.future for job in jobs)), timeout=60)

        scheduled(denoiser, scenario, max_batch_tiles=4, max_wait_ms=0, fair=fair,
                  runtimes=identity_runtimes(denoiser), on_batch=on_batch)
        return shares[-1]

    served_a, served_b = run(fair=True)
    quantum = denoiser.subnets[denoiser.best_index].mflops_per_pixel * 128 * 128
    assert served_b >= 15 * quantum  # most of b's 20 quanta ran while a still waited
    assert 0.8 <= served_a / served_b <= 1.25
    assert run(fair=False)[1] == 0  # oldest first: b waits until a's photos are done


def test_deficit_round_robin_shares_by_cost_and_a_leaving_head_passes_the_turn():
    class Member:
        def __init__(self, cost: float) -> None:
            self.cost, self.deficit, self.served = cost, 0.0, 0.0

    expensive, cheap = Member(3.0), Member(1.0)
    ring = DeficitRoundRobin(quantum=3.0)
    ring.add(expensive)
    ring.add(cheap)
    picks = []
    for _ in range(40):
        member = ring.head(lambda m: m.cost)
        member.deficit -= member.cost
        member.served += member.cost
        picks.append(member)
    # Each round: one turn of the expensive member (one piece of 3), then three of the cheap one (1 each).
    assert picks == [expensive, cheap, cheap, cheap] * 10
    assert expensive.served == cheap.served == 30.0 and expensive.deficit == cheap.deficit == 0.0
    third = Member(1.0)
    ring.add(third)  # at the back: after the expensive member, as the cheap one's turn is the current one
    head = ring.head(lambda m: m.cost)
    assert head is expensive and head.deficit == 3.0  # its turn began with its quantum
    head.deficit -= 1.0  # it has run a piece and its turn is under way when it leaves
    ring.remove(head)
    assert list(ring) == [third, cheap]
    assert ring.head(lambda m: m.cost) is third and third.deficit == 3.0  # the next turn began, with one quantum
    third.deficit = 0.0
    assert ring.head(lambda m: m.cost) is cheap and cheap.deficit == 3.0


def test_a_hopeless_request_is_refused_before_the_gate_or_any_tile_runs(denoiser, monkeypatch):
    clock = FakeClock()
    batches: list = []

    def gate(*args):
        raise AssertionError("the gate ran for a hopeless request")

    async def scenario(scheduler: Scheduler):
        scheduler.start()
        monkeypatch.setattr(denoiser, "select", gate)
        # 25 tiles of 128x128: 0.11 s at the slimmest width, 0.41 s at the widest.
        with pytest.raises(DeadlineMiss, match="even with nothing queued.*cannot help") as auto:
            await scheduler.submit(image(384, 384), Quality.auto, client="a", deadline=clock.now + 0.05)
        with pytest.raises(DeadlineMiss, match="even with nothing queued: estimated 0.41 s .* sub-network 0") as best:
            await scheduler.submit(image(384, 384), Quality.best, client="a", deadline=clock.now + 0.3)
        await asyncio.sleep(0.05)
        return auto.value, best.value, scheduler

    auto, best, scheduler = scheduled(denoiser, scenario, controller=measured_controller(denoiser), clock=clock,
                                      runtimes=timed_runtimes(denoiser, clock),
                                      on_batch=lambda subnet, jobs: batches.append(jobs))
    assert (auto.status, auto.reason) == (503, "deadline")
    assert auto.retry_after is None and best.retry_after is None  # not even alone: waiting cannot help
    assert batches == [] and clock.now == 0 and scheduler.queued_tiles == 0 and scheduler.clients == {}


@pytest.mark.parametrize("fair, admitted", [(True, True), (False, False)])
def test_the_work_ahead_is_what_runs_first_fairly_or_oldest_first(denoiser, fair, admitted):
    clock = FakeClock()

    async def scenario(scheduler: Scheduler):
        await scheduler.submit(image(384, 384), Quality.best, client="a")  # 0.41 s queued
        # One 64x64 tile, 4.1 ms: fairly, it runs after one turn of the large photo, one 128x128 tile (16.4 ms);
        # oldest first, after all of it.
        with pytest.raises(DeadlineMiss, match="cannot be done by its deadline: estimated") as missed:
            await scheduler.submit(image(64, 64), Quality.best, client="b", deadline=clock.now + 0.018)
        assert missed.value.retry_after == 1  # short by less than a second; the queue can clear
        try:
            job = await scheduler.submit(image(64, 64), Quality.best, client="b", deadline=clock.now + 0.025)
        except DeadlineMiss:
            return False
        assert job.estimated_seconds == pytest.approx((128 * 128 + 64 * 64) * 1e-6)
        return True

    assert scheduled(denoiser, scenario, controller=measured_controller(denoiser), clock=clock, fair=fair) is admitted


@pytest.mark.parametrize("fair, shed_factor, shed", [(False, 1.0, True), (False, 0.0, False), (True, 1.0, False)])
def test_auto_is_shed_when_even_the_slimmest_width_would_wait_past_the_target(denoiser, fair, shed_factor, shed):
    clock = FakeClock()
    batches: list = []

    async def scenario(scheduler: Scheduler):
        await scheduler.submit(image(384, 384), Quality.best, client="a")  # 0.41 s queued
        # A 64x64 tile from another client: oldest first it waits the 0.41 s, over the 0.1 s target; fairly it
        # runs after one turn of the large photo (16.4 ms).
        try:
            job = await scheduler.submit(image(64, 64), Quality.auto, client="b")
        except Overloaded as refused:
            # best and fast are never shed: they wait until their deadline.
            await scheduler.submit(image(64, 64), Quality.best, client="b")
            return refused
        return job

    controller = measured_controller(denoiser, target_seconds=0.1, shed_factor=shed_factor)
    outcome = scheduled(denoiser, scenario, controller=controller, clock=clock, fair=fair,
                        on_batch=lambda subnet, jobs: batches.append(jobs))
    if shed:
        assert isinstance(outcome, Overloaded)
        assert (outcome.status, outcome.reason, outcome.retry_after) == (503, "overload", 1)
        assert "wait an estimated 0.41 s, over the 0.10 s" in str(outcome)
    else:
        assert isinstance(outcome, Job) and outcome.subnet is not None


@pytest.mark.parametrize("target_seconds", [2.0, 0.0])  # the deadline holds with the latency target off too
def test_auto_gives_up_width_to_meet_its_deadline_before_it_is_refused(denoiser, monkeypatch, target_seconds):
    clock = FakeClock()
    widest = Selection(denoiser.best_index, 0, denoiser.profiles[0], "gate")
    monkeypatch.setattr(denoiser, "select", lambda *args: widest)

    async def scenario(scheduler: Scheduler):
        # 25 tiles of 128x128, alone: 0.41 s at the widest, 0.24 s at the middle width, 0.11 s at the slimmest.
        chosen = []
        for left in (1.0, 0.3, 0.15):
            job = await scheduler.submit(image(384, 384), Quality.auto, deadline=clock.now + left)
            chosen.append((job.subnet, job.reason))
            scheduler.cancel(job, "client_disconnected")

        with pytest.raises(DeadlineMiss):
            await scheduler.submit(image(384, 384), Quality.auto, deadline=clock.now + 0.05)  # 0.11 s at best
        return chosen

    controller = measured_controller(denoiser, target_seconds=target_seconds)
    assert scheduled(denoiser, scenario, controller=controller, clock=clock) == [
        (0, "gate"), (1, "deadline"), (2, "deadline")]
    assert controller.downgrades == 2  # the refused request is not one


def test_cost_limits_per_client_and_per_request(denoiser):
    clock = FakeClock()

    async def scenario(scheduler: Scheduler):
        limits = CostLimits(max_client_pixels=100_000)
        first = await scheduler.submit(image(300, 200), Quality.fast, client="a", limits=limits)  # 60,000 pixels
        with pytest.raises(ClientBusy, match="60000 pixels in flight.*DDSNET_MAX_CLIENT_PIXELS=100000") as busy:
            await scheduler.submit(image(300, 200), Quality.fast, client="a", limits=limits)
        await scheduler.submit(image(300, 200), Quality.fast, client="b", limits=limits)  # another client's share
        with pytest.raises(OverLimit, match="120000 pixels, over DDSNET_MAX_CLIENT_PIXELS") as alone:
            await scheduler.submit(image(400, 300), Quality.fast, client="c", limits=limits)
        scheduler.cancel(first, "client_disconnected")
        await scheduler.submit(image(300, 200), Quality.fast, client="a", limits=limits)
        ceiling = CostLimits(max_request_seconds=0.1)  # 0.11 s at the slimmest width
        with pytest.raises(OverLimit, match="slimmest this request may run, over DDSNET_MAX_REQUEST_SECONDS") as slow:
            await scheduler.submit(image(384, 384), Quality.auto, client="d", limits=ceiling)
        return busy.value, alone.value, slow.value, scheduler

    busy, alone, slow, scheduler = scheduled(denoiser, scenario, controller=measured_controller(denoiser),
                                             clock=clock)
    assert (busy.status, busy.reason, busy.retry_after) == (429, "client_busy", 1)
    assert (alone.status, alone.reason) == (413, "client_pixels")
    assert (slow.status, slow.reason) == (413, "request_seconds")
    assert {share.pixels for share in scheduler.clients.values()} == {60_000} and len(scheduler.clients) == 2


def test_a_busy_client_is_told_to_retry_once_its_work_in_flight_is_estimated_done(denoiser):
    rates = {index: 1000 * rate for index, rate in speeds(denoiser).items()}  # 1 ms a pixel at the widest
    limits = CostLimits(max_client_pixels=100_000)

    async def scenario(scheduler: Scheduler):
        await scheduler.submit(image(300, 200), Quality.fast, client="a", limits=limits)
        with pytest.raises(ClientBusy) as busy:
            await scheduler.submit(image(300, 200), Quality.fast, client="a", limits=limits)
        with pytest.raises(ClientBusy) as early:
            scheduler.check_size(300, 200, Quality.fast, client="a", limits=limits)  # from the header alone
        return busy.value, early.value

    busy, early = scheduled(denoiser, scenario, controller=measured_controller(denoiser, rates=rates))
    queued_seconds = denoiser.split(image(300, 200)).window_pixels() * rates[denoiser.fast_index]
    assert queued_seconds > 2 and busy.retry_after == early.retry_after == math.ceil(queued_seconds)
    assert busy.reason == "client_busy"


def test_the_estimate_takes_each_requests_share_at_its_own_speed_where_speed_is_not_in_proportion_to_flops(denoiser):
    clock = FakeClock()
    done_at: dict[int, float] = {}
    # Slim widths spend fewer FLOPs but use them worse: 1.5x and 3x the widest's seconds per MFLOP.
    rates = {index: rate * {denoiser.best_index: 1.0, denoiser.fast_index: 3.0}.get(index, 1.5)
             for index, rate in speeds(denoiser).items()}
    fast, best = denoiser.fast_index, denoiser.best_index

    async def scenario(scheduler: Scheduler):
        finish = scheduler._finish

        def recorded_finish(job) -> None:
            done_at[job.id] = clock.now
            finish(job)

        scheduler._finish = recorded_finish
        large = await scheduler.submit(image(384, 384), Quality.fast, client="a")  # 25 tiles of 128x128
        small = await scheduler.submit(image(64, 64, 1), Quality.best, client="b")  # one 64x64 tile
        scheduler.start()
        await asyncio.wait_for(asyncio.gather(large.future, small.future), timeout=60)
        return small, scheduler.quantum

    small, quantum = scheduled(denoiser, scenario, controller=measured_controller(denoiser, rates=rates),
                               clock=clock, max_wait_ms=0, runtimes=timed_runtimes(denoiser, clock, rates=rates))
    # Before it: one turn of a, a quantum of MFLOPs, which takes a's seconds per MFLOP, not the widest's.
    a_turn = quantum * rates[fast] / denoiser.subnets[fast].mflops_per_pixel
    assert small.estimated_seconds == pytest.approx(a_turn + 64 * 64 * rates[best])
    # The turn runs whole tiles, as many as its quantum covers: the estimate is over by less than one.
    a_tile = 128 * 128 * rates[fast]
    assert done_at[small.id] <= small.estimated_seconds <= done_at[small.id] + a_tile


def test_the_plan_from_a_size_is_what_the_image_is_cut_into(denoiser):
    async def scenario(scheduler: Scheduler):
        return [scheduler.plan(height, width) for height, width in sizes]

    sizes = [(1, 1), (33, 47), (64, 64), (150, 97), (300, 200), (384, 384), (517, 1031)]
    plans = scheduled(denoiser, scenario)
    for (height, width), plan in zip(sizes, plans):
        tiled = denoiser.split(torch.zeros(1, 3, height, width))
        assert plan == (len(tiled.tiles), tiled.window_pixels()), (height, width)


def test_admission_estimates_are_within_a_factor_of_2_of_the_time_taken(denoiser):
    clock = FakeClock()
    done_at: dict[int, float] = {}
    # (when it arrives on the fake clock, client, size, quality)
    arrivals = [(0.0, "a", (384, 384), Quality.best), (0.0, "b", (200, 160), Quality.fast),
                (0.1, "c", (64, 64), Quality.best), (0.15, "b", (256, 256), Quality.best),
                (0.2, "c", (150, 97), Quality.best), (0.25, "a", (300, 200), Quality.fast),
                (0.3, "d", (128, 128), Quality.best)]
    due = deque(at for at, *_ in arrivals)
    arrived = threading.Condition()

    def wait_for_arrivals() -> None:
        """The worker holds, once the fake clock has passed an arrival, until that request is in."""
        with arrived:
            assert arrived.wait_for(lambda: not due or clock.now < due[0], timeout=30)

    async def scenario(scheduler: Scheduler):
        finish = scheduler._finish

        def recorded_finish(job) -> None:
            done_at[job.id] = clock.now  # no batch runs while the scheduler finishes one
            finish(job)

        scheduler._finish = recorded_finish
        jobs = []
        for seed, (at, client, size, quality) in enumerate(arrivals):
            if at > 0 and scheduler._task is None:
                scheduler.start()  # the requests at 0 are all in when the first tile runs
            while clock.now < at:
                await asyncio.sleep(0.0005)
            jobs.append(await scheduler.submit(image(*size, seed), quality, client=client))
            with arrived:
                due.popleft()
                arrived.notify_all()
        await asyncio.wait_for(asyncio.gather(*(job.future for job in jobs)), timeout=60)
        return jobs

    jobs = scheduled(denoiser, scenario, controller=measured_controller(denoiser), clock=clock, max_wait_ms=0,
                     runtimes=timed_runtimes(denoiser, clock, wait_for_arrivals))
    ratios = [(done_at[job.id] - job.enqueued_at) / job.estimated_seconds for job in jobs]
    assert all(0.5 <= ratio <= 2 for ratio in ratios), ratios


def test_the_share_of_each_client_is_shown_by_label_and_counted_by_bucket(denoiser):
    metrics = Metrics()

    async def scenario(scheduler: Scheduler):
        jobs = [await scheduler.submit(image(300, 200, seed), Quality.fast, client=name)
                for seed, name in enumerate(("peer:10.0.0.1", "peer:10.0.0.1", "peer:2001:db8::/64"))]
        during = scheduler.sharing()
        text = generate_latest(metrics.registry).decode()
        for job in jobs:
            scheduler.cancel(job, "timeout")
        return jobs, during, text, scheduler.sharing()

    jobs, during, text, after = scheduled(denoiser, scenario, metrics)
    tiles = len(jobs[0].image.tiles)
    rows = {row["client"]: row for row in during["clients"]}
    assert during["policy"] == "fair" and during["clients_in_flight"] == 2
    assert sorted((row["requests"], row["queued_tiles"], row["pixels_in_flight"]) for row in rows.values()) == [
        (1, tiles, 60_000), (2, 2 * tiles, 120_000)]
    assert not any("10.0.0.1" in label or "2001" in label for label in rows)
    by_bucket = {str(bucket): metric_value(text, "ddsnet_client_queue_tiles", bucket=str(bucket))
                 for bucket in range(16)}
    assert sum(by_bucket.values()) == 3 * tiles
    assert all(by_bucket[str(row["bucket"])] >= row["queued_tiles"] for row in rows.values())
    assert metric_value(text, "ddsnet_clients_in_flight") == 2
    assert after["clients"] == [] and after["clients_in_flight"] == 0


def test_interleaved_requests_of_two_clients_each_get_their_own_exact_answer(denoiser):
    inputs = [(image(384, 384, 0), Quality.best, "a"), (image(150, 97, 1), Quality.fast, "b"),
              (image(64, 64, 2), Quality.best, "b"), (image(300, 200, 3), Quality.best, "a")]
    batches: list[list] = []

    async def scenario(scheduler: Scheduler):
        jobs = [await scheduler.submit(noisy, quality, client=client) for noisy, quality, client in inputs]
        scheduler.start()
        return await asyncio.wait_for(asyncio.gather(*(job.future for job in jobs)), timeout=60), jobs

    results, jobs = scheduled(denoiser, scenario, max_batch_tiles=4, max_wait_ms=0,
                              on_batch=lambda subnet, batch: batches.append(batch))
    assert large_tiles_before_the_last_small_one(batches, jobs[0], jobs[1:3]) < len(jobs[0].image.tiles)
    for (noisy, _, _), result in zip(inputs, results):
        assert torch.equal(result.denoised, denoiser.run(noisy, result.subnet)[0])
