"""The scheduler (service/scheduler.py): queues by width and window shape, oldest first, cancellation,
back-pressure, the gate's own lane, and the runtimes it is handed."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from prometheus_client import generate_latest

from model import Denoiser, Quality, load_checkpoint
from service.metrics import Metrics
from service.scheduler import QueueFull, Scheduler
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


def test_tiles_queue_by_width_and_window_shape_and_every_batch_holds_one_width(denoiser):
    batches: list[tuple[int, list]] = []

    async def scenario(scheduler: Scheduler):
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

    jobs = scheduled(denoiser, scenario, max_batch_tiles=3, max_wait_ms=50,
                     on_batch=lambda subnet, batch: batches.append((subnet, batch)))
    assert {job.subnet for job in jobs} >= {denoiser.best_index, denoiser.fast_index}
    assert all(all(job.subnet == subnet for job in batch) and len(batch) <= 3 for subnet, batch in batches)
    assert sum(len(batch) for _, batch in batches) == sum(len(job.image.tiles) for job in jobs)
    assert max(len(batch) for _, batch in batches) > 1


def test_the_queue_whose_oldest_tile_waited_longest_runs_first(denoiser):
    order: list[int] = []

    async def scenario(scheduler: Scheduler):
        # Two slim requests around a wide one: serving by width or by queue length would run both slim ones first.
        jobs = [await scheduler.submit(image(64, 64, seed), quality)
                for seed, quality in enumerate((Quality.fast, Quality.best, Quality.fast))]
        scheduler.start()
        await asyncio.wait_for(asyncio.gather(*(job.future for job in jobs)), timeout=60)
        return jobs

    jobs = scheduled(denoiser, scenario, max_batch_tiles=1, max_wait_ms=0,
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
    client, _ = make_client(max_batch_tiles=8, max_wait_ms=50)
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
