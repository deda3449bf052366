"""The scheduler: tiles queued by sub-network width, batched, and run by one worker per device.

A request's life: the gate picks a sub-network (on the worker), the image is cut into tiles that share
window shapes with other images, the tiles join the queue of their (width, window shape), the scheduler
forms single-width batches, the worker runs them, and the request's future resolves once its last tile
is back. The scheduler serves the queue whose oldest tile has waited longest, so no width starves.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import itertools
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from model.inference import Denoiser, Noise, Quality, WindowRuntime
from model.tiling import TiledImage
from service.controller import REASON_REQUESTED, Decision, LoadController
from service.metrics import Metrics

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc's ``malloc_trim``), so that a burst of large images
    does not leave the process at its peak size; a no-op without glibc."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


class QueueFull(Exception):
    """The queue cannot take this request's tiles now."""


@dataclass(eq=False)
class Job:
    """One request in flight."""

    id: int
    image: TiledImage
    subnet: int
    future: asyncio.Future
    remaining: int
    enqueued_at: float
    gate_flops: int = 0
    flops: int = 0
    widest_flops: int = 0
    received_at: float = 0.0  # when the upload arrived (time.perf_counter)
    gate_subnet: int | None = None  # what the gate picked (auto only)
    reason: str = REASON_REQUESTED  # why ``subnet`` runs: gate, load or requested
    profile: str = ""  # the profile of ``subnet``
    profile_reason: str = ""  # why that profile: requested, jpeg_header or gate
    first_batch_at: float | None = None
    compute_seconds: float = 0.0
    cancelled: bool = False


@dataclass(eq=False)
class TileWork:
    job: Job
    index: int
    enqueued_at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class ScheduledResult:
    denoised: torch.Tensor
    subnet: int
    flops: int
    queue_seconds: float
    compute_seconds: float
    widest_flops: float = 0.0  # what the widest sub-network would have spent on the same tiles
    gate_subnet: int | None = None
    reason: str = REASON_REQUESTED
    profile: str = ""
    profile_reason: str = ""


class Scheduler:
    """Owns the queues, the worker thread and the gate's lane; runs the model through its runtimes.

    Args:
        denoiser: the loaded model.
        metrics: where to count.
        runtimes: sub-network index -> its compiled runtime (``service.backends.Runtimes``); the sliced
            supernet runs when absent.
        max_batch_tiles, max_wait_ms, max_queue_tiles: batching and back-pressure limits.
        on_batch: called with ``(subnet, [the job of each tile])`` for every batch run (instrumentation).
        controller: gives up width for ``auto`` requests under load (off when absent).
    """

    def __init__(self, denoiser: Denoiser, metrics: Metrics, runtimes: Mapping[int, WindowRuntime] | None = None,
                 max_batch_tiles: int = 4, max_wait_ms: float = 5.0, max_queue_tiles: int = 512,
                 on_batch: Callable[[int, list[Job]], None] | None = None,
                 controller: LoadController | None = None) -> None:
        self.denoiser = denoiser
        self.metrics = metrics
        self.runtimes = runtimes
        self.max_batch_tiles = max_batch_tiles
        self.max_wait = max_wait_ms / 1000
        self.max_queue_tiles = max_queue_tiles
        self.on_batch = on_batch
        self.queues: dict[tuple[int, tuple[int, int]], deque[TileWork]] = {}
        self.queued_tiles = 0
        # Window pixels per sub-network, queued and running: the work the controller estimates a wait from.
        self.pending_pixels: dict[int, int] = dict.fromkeys(range(len(denoiser.subnets)), 0)
        self.controller = controller or LoadController([s.mflops_per_pixel for s in denoiser.subnets], 0,
                                                       profiles=[s.profile for s in denoiser.subnets])
        metrics.latency_target.set(self.controller.target)
        # Every downgrade a load can cause is a series from the start, so that the dashboard shows 0, not no data.
        widths = self.controller.by_width
        for rank, wider in enumerate(widths):
            for slimmer in widths[rank + 1:]:
                metrics.load_downgrades.labels(str(wider), str(slimmer))
        metrics.backlog_seconds.set_function(lambda: self.controller.backlog_seconds(self.pending_pixels))
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddsnet-worker")
        # The gate has a lane of its own, so that choosing a sub-network never waits behind a running batch.
        self.gate_lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddsnet-gate")
        self._ids = itertools.count()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        for subnet in range(len(denoiser.subnets)):
            metrics.queue_tiles.labels(str(subnet)).set(0)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._schedule(), name="ddsnet-scheduler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.worker.shutdown(wait=True)
        self.gate_lane.shutdown(wait=True)

    async def run_on_worker(self, function: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.worker, function, *args)

    def run_windows(self, windows: torch.Tensor, index: int) -> torch.Tensor:
        """Sub-network ``index`` on ``(B, 3, h, w)`` windows, through its runtime (built here on first use)."""
        runtime = None if self.runtimes is None else self.runtimes[index]
        return self.denoiser.run_windows(windows, index, runtime)

    async def warm_up(self) -> None:
        """Build every sub-network's runtime and run the gate once, so the first request pays no start-up cost;
        then time each sub-network on one window, so the controller knows the widths' speeds from the start."""
        sample = torch.rand(1, 3, 64, 64)
        await asyncio.get_running_loop().run_in_executor(self.gate_lane, self.denoiser.select, sample, Quality.auto)
        side = min(256, self.denoiser.tile)
        window = torch.rand(1, 3, side, side)
        for index in range(len(self.denoiser.subnets)):
            await self.run_on_worker(self.run_windows, sample, index)
            await self.run_on_worker(self.run_windows, window, index)  # a new shape compiles once
            started = time.perf_counter()
            await self.run_on_worker(self.run_windows, window, index)
            self.controller.observe(index, side * side, time.perf_counter() - started)

    async def submit(self, noisy: torch.Tensor, quality: Quality, received_at: float | None = None,
                     max_latency_seconds: float | None = None, noise: Noise = Noise.auto,
                     jpeg_quality: int | None = None) -> Job:
        """Select a sub-network and queue the image's tiles; await ``job.future`` for the result.

        ``received_at`` (``time.perf_counter()``; default: now) is when the upload arrived: the result's
        ``queue_seconds`` counts from it, decode and gate included. For ``auto``, the controller may give up
        width to the load (within ``max_latency_seconds`` when given), never leaving the profile chosen (by
        ``noise``, the upload's ``jpeg_quality`` or the gate); all of a request's tiles run at one sub-network.

        Raises:
            QueueFull: the tiles would overflow ``max_queue_tiles``.
        """
        image = self.denoiser.split(noisy)
        if self.queued_tiles + len(image.tiles) > self.max_queue_tiles:
            raise QueueFull(f"{self.queued_tiles} tiles queued; this image needs {len(image.tiles)} more")
        chosen = await asyncio.get_running_loop().run_in_executor(
            self.gate_lane, self.denoiser.select, noisy, quality, noise, jpeg_quality)
        picked, gate_macs = chosen.index, chosen.gate_macs
        if self.queued_tiles + len(image.tiles) > self.max_queue_tiles:
            raise QueueFull(f"{self.queued_tiles} tiles queued; this image needs {len(image.tiles)} more")
        if quality is Quality.auto:
            pixels = sum(tile.shape[0] * tile.shape[1] for tile in image.tiles)
            decision = self.controller.choose(picked, pixels, self.pending_pixels, max_latency_seconds)
            if decision.subnet != picked:
                self.metrics.load_downgrades.labels(str(picked), str(decision.subnet)).inc()
        else:
            decision = Decision(picked, None, REASON_REQUESTED, 0.0)
        subnet = decision.subnet
        now = time.perf_counter()
        job = Job(next(self._ids), image, subnet, asyncio.get_running_loop().create_future(), len(image.tiles), now,
                  gate_flops=2 * gate_macs, received_at=now if received_at is None else received_at,
                  gate_subnet=decision.gate_subnet, reason=decision.reason, profile=chosen.profile,
                  profile_reason=chosen.profile_reason)
        for index, tile in enumerate(image.tiles):
            self.queues.setdefault((subnet, tile.shape), deque()).append(TileWork(job, index, now))
            self.pending_pixels[subnet] += tile.shape[0] * tile.shape[1]
        self._count_queued(subnet, len(image.tiles))
        self._wakeup.set()
        return job

    def cancel(self, job: Job, reason: str) -> None:
        """Drop the job's queued tiles; on the CPU its windows in a running batch are skipped."""
        if job.cancelled or job.future.done():
            return
        self._drop(job, reason)
        job.future.cancel()

    def _drop(self, job: Job, reason: str) -> None:
        """Mark ``job`` cancelled and remove its queued tiles, counting them under ``reason``."""
        job.cancelled = True
        dropped = 0
        for key, queue in self.queues.items():
            kept = deque(work for work in queue if work.job is not job)
            dropped += len(queue) - len(kept)
            self.pending_pixels[key[0]] -= (len(queue) - len(kept)) * key[1][0] * key[1][1]
            self.queues[key] = kept
        self._count_queued(job.subnet, -dropped)
        if dropped:
            self.metrics.dropped_tiles.labels(reason).inc(dropped)

    def _fail(self, jobs: list[Job], error: BaseException) -> None:
        """A batch failed: its requests get the error, and their other tiles are dropped unrun."""
        for job in dict.fromkeys(jobs):
            if not job.future.done():
                self._drop(job, "inference_error")
                job.future.set_exception(error)

    def _count_queued(self, subnet: int, delta: int) -> None:
        self.queued_tiles += delta
        self.metrics.queue_tiles.labels(str(subnet)).inc(delta)

    def _oldest_queue(self) -> tuple[int, tuple[int, int]] | None:
        waiting = [(queue[0].enqueued_at, key) for key, queue in self.queues.items() if queue]
        return min(waiting)[1] if waiting else None

    async def _schedule(self) -> None:
        while True:
            key = self._oldest_queue()
            if key is None:
                # Cleared before the trim, so that a submit while the trim runs still wakes the wait below.
                self._wakeup.clear()
                # Idle: give the freed image and activation buffers back to the OS, off the event loop.
                await self.run_on_worker(release_free_memory)
                await self._wakeup.wait()
                continue
            queue = self.queues[key]
            deadline = queue[0].enqueued_at + self.max_wait
            if len(queue) < self.max_batch_tiles and time.perf_counter() < deadline:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), deadline - time.perf_counter())
                except asyncio.TimeoutError:
                    pass
                continue
            batch = [queue.popleft() for _ in range(min(self.max_batch_tiles, len(queue)))]
            self._count_queued(key[0], -len(batch))
            try:
                await self._run_batch(key[0], batch)
            except Exception as error:  # noqa: BLE001 - one bad batch fails its requests, never the scheduler
                self._fail([work.job for work in batch], error)
            finally:
                # Queued until now and running meanwhile: the batch leaves the pending work once it is done.
                self.pending_pixels[key[0]] -= len(batch) * key[1][0] * key[1][1]

    async def _run_batch(self, subnet: int, batch: list[TileWork]) -> None:
        batch = [work for work in batch if not work.job.cancelled]
        if not batch:
            return
        label = str(subnet)
        started = time.perf_counter()
        for work in batch:
            self.metrics.queue_wait_seconds.labels(label).observe(started - work.enqueued_at)
            if work.job.first_batch_at is None:
                work.job.first_batch_at = started
        windows = [work.job.image.window(work.index) for work in batch]
        if self.on_batch:
            self.on_batch(subnet, [work.job for work in batch])
        try:
            outputs = await self.run_on_worker(self._compute, windows, subnet, [work.job for work in batch])
        except Exception as error:  # noqa: BLE001 - a failed batch fails its requests, never the scheduler
            self._fail([work.job for work in batch], error)
            return
        elapsed = time.perf_counter() - started
        self.metrics.inference_seconds.labels(label).observe(elapsed)
        self.metrics.batch_tiles.labels(label).observe(len(batch))
        height, window_width = windows[0].shape[-2:]
        self.controller.observe(subnet, height * window_width * sum(o is not None for o in outputs), elapsed)
        macs = self.denoiser.window_macs(subnet, height, window_width)
        widest_macs = self.denoiser.window_macs(self.denoiser.best_index, height, window_width)
        for work, output in zip(batch, outputs):
            job = work.job
            if job.future.done() or output is None:
                continue
            job.image.put(work.index, output)
            job.flops += 2 * macs
            job.widest_flops += 2 * widest_macs
            job.compute_seconds += elapsed / len(batch)
            job.remaining -= 1
            if job.remaining == 0:
                self._finish(job)

    def _compute(self, windows: list[torch.Tensor], subnet: int, jobs: list[Job]) -> list[torch.Tensor | None]:
        """The batch's outputs, ``(1, 3, h, w)`` each. On a GPU the windows run as one batch. On the CPU they
        run one at a time, which costs nothing there, and a window whose request was cancelled meanwhile (a
        timeout, a client gone) is skipped: its output is ``None``."""
        if self.denoiser.device.type != "cpu":
            return list(self.run_windows(torch.cat(windows), subnet).cpu().split(1))
        return [None if job.cancelled else self.run_windows(window, subnet).cpu()
                for window, job in zip(windows, jobs)]

    def _finish(self, job: Job) -> None:
        label = str(job.subnet)
        flops = job.flops + job.gate_flops
        self.metrics.flops.labels(label).inc(flops)
        self.metrics.flops_widest.inc(job.widest_flops)
        self.metrics.pixels.inc(job.image.height * job.image.width)
        queue_seconds = (job.first_batch_at or job.enqueued_at) - job.received_at
        job.future.set_result(ScheduledResult(job.image.result(), job.subnet, flops, queue_seconds,
                                              job.compute_seconds, job.widest_flops, job.gate_subnet, job.reason,
                                              job.profile, job.profile_reason))
