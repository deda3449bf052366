"""The scheduler: tiles queued by sub-network width, batched, and run by one worker per device.

A request's life: the gate picks a sub-network (on the worker), the image is cut into tiles that share
window shapes with other images, the tiles join the lane of their (width, window shape), the scheduler
forms single-width batches, the worker runs them, and the request's future resolves once its last tile
is back.

Which tiles run next (``fair=True``, the default) is decided by deficit round robin on two levels, weighted by
a tile's cost (its window pixels times its sub-network's MFLOPs per pixel): between clients, and between the
requests of each client. Every turn gives the client (or request) a quantum of credit, the cost of the
costliest tile there can be; it runs tiles while its credit covers them, and then the next one's turn begins.
The tile whose turn it is picks the lane. On the CPU, where a batch's windows run one after another anyway, a
batch is that one tile: the turn is picked again before every window, and no batch waits to fill. On a GPU,
where a fuller batch costs little more, it fills from the lane, round robin over the lane's clients and their
requests; a tile that rides along in another client's batch is charged to its own client's credit and paid
for by a later turn. So a large photo's tiles take turns with the tiles of every request that arrives after
it, and a client sending a stream of large photos gets the same share of the device as a client sending small
ones. With ``fair=False`` the lane whose oldest tile has waited longest runs, oldest tiles first.

Admission: from the image's size (before it is decoded, :meth:`Scheduler.check_size`), again before the gate
runs, and once the width is known, a request's finish time is estimated from each width's measured speed and
the work that will run before it is done: all that is queued and running when tiles run oldest first; under
fair sharing, what is left of the running batch and then what every other request and client runs in the
rounds of the round robins until this one is done. The rounds are counted in MFLOPs, as the turns are, and
what each member runs in them is turned into seconds at its own width's measured speed. The estimate is a
lower bound under fair sharing: requests from other clients that arrive later take turns ahead of it. A
request that cannot be done by its deadline at the slimmest width it may run is refused before any of its
tiles runs (:class:`DeadlineMiss`); for ``auto`` the controller first tries slimmer widths, and an ``auto``
request that would wait past the controller's bound even at the slimmest width is shed (:class:`Overloaded`).
:class:`CostLimits` caps the image pixels each client may have in flight and one request's estimated seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import torch

from model.allocator import release_free_memory
from model.inference import Denoiser, Noise, Quality, WindowRuntime
from model.tiling import TiledImage, plan_tiles
from service.controller import REASON_REQUESTED, Decision, LoadController
from service.metrics import CLIENT_BUCKETS, Metrics


class Refused(Exception):
    """The scheduler does not take this request: answered with ``status``, counted under ``reason``, and
    ``retry_after`` (seconds) when waiting could help."""

    status = 503
    reason = "refused"

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(Refused):
    """The queue cannot take this request's tiles now."""

    reason = "queue_full"

    def __init__(self, message: str) -> None:
        super().__init__(f"queue full: {message}", retry_after=1)


class DeadlineMiss(Refused):
    """Even at the slimmest width it may run, the request would not be done by its deadline; no
    ``retry_after`` when it would not be even with nothing else to run."""

    reason = "deadline"


class Overloaded(Refused):
    """Even at the slimmest width, an ``auto`` request would wait longer than the controller allows
    (:meth:`LoadController.max_wait_seconds`); ``retry_after`` is how much longer."""

    reason = "overload"


class ClientBusy(Refused):
    """The client's pixels in flight, with this image's, would pass ``max_client_pixels``; ``retry_after``
    is the estimated seconds of the work it has in flight."""

    status = 429
    reason = "client_busy"


class OverLimit(Refused):
    """The request alone is over a cost limit (the image's pixels or tiles, or its estimated seconds)."""

    status = 413

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class CostLimits:
    """What one client and one request may cost; 0 turns a limit off.

    Args:
        max_client_pixels: the most image pixels one client may have in flight (admitted and not yet done).
        max_request_seconds: the most seconds one request's own compute may take, estimated at the slimmest
            width it may run.
    """

    max_client_pixels: int = 0
    max_request_seconds: float = 0.0


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
    received_at: float = 0.0  # when the upload arrived (the scheduler's clock)
    gate_subnet: int | None = None  # what the gate picked (auto only)
    reason: str = REASON_REQUESTED  # why ``subnet`` runs: gate, load, deadline or requested
    profile: str = ""  # the profile of ``subnet``
    profile_reason: str = ""  # why that profile: requested, jpeg_header or gate
    first_batch_at: float | None = None
    compute_seconds: float = 0.0
    cancelled: bool = False
    client: str = ""  # who sent it (see ``service.guards.client_identity``)
    estimated_seconds: float = 0.0  # at admission: the seconds until it would be done
    tile_cost: float = 0.0  # MFLOPs of one tile: all of an image's windows have one shape
    deficit: float = 0.0  # its credit in its client's round robin
    queued: deque[TileWork] = field(default_factory=deque)  # its tiles not yet in a batch, in order
    settled: bool = False  # done, failed or cancelled: its pixels are no longer in flight

    @property
    def lane(self) -> tuple[int, tuple[int, int]]:
        """(sub-network, window shape): the queue its tiles batch in."""
        return self.subnet, self.image.tiles[0].shape

    @property
    def window_pixels(self) -> int:
        """Pixels of one of its windows."""
        height, width = self.image.tiles[0].shape
        return height * width


@dataclass(eq=False)
class TileWork:
    job: Job
    index: int
    enqueued_at: float = field(default_factory=time.perf_counter)


class _Credited(Protocol):
    deficit: float


Member = TypeVar("Member", bound=_Credited)


class DeficitRoundRobin(Generic[Member]):
    """Deficit round robin over members that each hold a ``deficit`` (their credit).

    The member at the head of the ring gets ``quantum`` of credit when its turn begins, and keeps the turn
    while its credit covers the cost of its next piece of work; then the next member's turn begins. A member
    charged more than its credit (work taken out of turn) goes into debt and pays it back from later turns.
    """

    def __init__(self, quantum: float) -> None:
        if quantum <= 0:
            raise ValueError("the quantum must be > 0")
        self.quantum = quantum
        self.ring: deque[Member] = deque()
        self._granted: Member | None = None  # the head, once its turn's quantum is given

    def __len__(self) -> int:
        return len(self.ring)

    def __iter__(self) -> Iterator[Member]:
        """Members in turn order, the one whose turn it is first."""
        return iter(self.ring)

    def add(self, member: Member) -> None:
        """``member`` joins at the back; its first turn comes after everyone else's."""
        self.ring.append(member)

    def remove(self, member: Member) -> None:
        if self.ring and self.ring[0] is member:
            self._granted = None  # the next member's turn begins
        self.ring.remove(member)

    def credit_this_round(self, member: Member, next_cost: float) -> float:
        """What ``member`` may still run before the ring comes round to it again: the rest of its turn when the
        turn is under way (nothing once its credit no longer covers ``next_cost``), else its deficit plus the
        quantum its turn begins with."""
        if self.ring and self.ring[0] is member and self._granted is member:
            return member.deficit if member.deficit >= next_cost else 0.0
        return max(0.0, member.deficit + self.quantum)

    def head(self, cost: Callable[[Member], float]) -> Member:
        """The member whose turn it is, given ``cost(member)`` of each one's next piece of work. The ring must
        not be empty."""
        while True:
            member = self.ring[0]
            if member is not self._granted:
                member.deficit += self.quantum
                self._granted = member
            if member.deficit >= cost(member):
                return member
            self.ring.rotate(-1)
            self._granted = None


@dataclass(eq=False)
class ClientShare:
    """One client with requests in flight: its requests with tiles queued take turns, and it takes turns
    with the other clients."""

    name: str  # the identity itself: never shown
    label: str  # a salted hash of it, what ``GET /info`` shows
    bucket: int  # its series of the per-client metrics
    jobs: DeficitRoundRobin[Job]
    deficit: float = 0.0
    requests: int = 0
    pixels: int = 0  # image pixels in flight
    queued_tiles: int = 0

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


@dataclass(frozen=True)
class _Queued:
    """One member of a round robin, for estimates: the MFLOPs it has queued, the MFLOPs its credit lets it run
    in this round, and the seconds one of its MFLOPs takes (its width's measured speed)."""

    mflops: float
    credit: float
    seconds_per_mflop: float


def _round_robin(own: _Queued, ahead: list[_Queued], behind: list[_Queued], quantum: float) -> tuple[float, float]:
    """(MFLOPs, seconds) that run until ``own``'s work is done by round robin, ``quantum`` MFLOPs a turn, its
    own work included; each member's MFLOPs take seconds at its own speed.

    Args:
        own: the member whose work is to be done.
        ahead: the members that go before it in every round.
        behind: those that go after it, in every round but its last.
    """
    turns = 1 + math.ceil(max(0.0, own.mflops - own.credit) / quantum)
    ran = [(min(member.mflops, member.credit + (turns - 1) * quantum), member.seconds_per_mflop) for member in ahead]
    ran += [(min(member.mflops, (turns - 1) * quantum), member.seconds_per_mflop) for member in behind]
    return (own.mflops + sum(mflops for mflops, _ in ran),
            own.mflops * own.seconds_per_mflop + sum(mflops * rate for mflops, rate in ran))


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
        fair: share the device between clients and requests by deficit round robin; else oldest tile first.
        clock: seconds, monotonic (``time.perf_counter``); tests pass a fake one. The estimates, the accounts
            and the wait for a batch to fill read it; the wait ends when it has lasted as long as ``clock``
            said it should, so a fake clock that stands still holds a batch back at most ``max_wait_ms``.
    """

    def __init__(self, denoiser: Denoiser, metrics: Metrics, runtimes: Mapping[int, WindowRuntime] | None = None,
                 max_batch_tiles: int = 4, max_wait_ms: float = 5.0, max_queue_tiles: int = 512,
                 on_batch: Callable[[int, list[Job]], None] | None = None,
                 controller: LoadController | None = None, fair: bool = True,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.denoiser = denoiser
        self.metrics = metrics
        self.runtimes = runtimes
        self.max_batch_tiles = max_batch_tiles
        self.max_wait = max_wait_ms / 1000
        self.max_queue_tiles = max_queue_tiles
        self.on_batch = on_batch
        self.fair = fair
        self.clock = clock
        # Jobs with tiles queued, by lane (sub-network, window shape), in arrival order.
        self.lanes: dict[tuple[int, tuple[int, int]], dict[Job, None]] = {}
        self.queued_tiles = 0
        # Window pixels per sub-network, queued and running: the work the controller estimates a wait from.
        self.pending_pixels: dict[int, int] = dict.fromkeys(range(len(denoiser.subnets)), 0)
        self.running: tuple[int, int, float] | None = None  # the batch in flight: sub-network, window pixels, start
        # Every client with a request in flight, and the round robin of those with tiles queued.
        self.clients: dict[str, ClientShare] = {}
        window = denoiser.tile + 2 * denoiser.margin
        self.quantum = max(s.mflops_per_pixel for s in denoiser.subnets) * window * window
        self.turns: DeficitRoundRobin[ClientShare] = DeficitRoundRobin(self.quantum)
        # On the CPU a batch's windows run one at a time: a fuller batch gains nothing there.
        self.sequential = denoiser.device.type == "cpu"
        self._salt = secrets.token_bytes(16)  # client labels cannot be reversed into addresses or keys
        self.controller = controller or LoadController([s.mflops_per_pixel for s in denoiser.subnets], 0,
                                                       profiles=[s.profile for s in denoiser.subnets])
        metrics.latency_target.set(self.controller.target)
        # Every downgrade a load can cause is a series from the start, so that the dashboard shows 0, not no data.
        widths = self.controller.by_width
        for rank, wider in enumerate(widths):
            for slimmer in widths[rank + 1:]:
                metrics.load_downgrades.labels(str(wider), str(slimmer))
        metrics.backlog_seconds.set_function(lambda: self.controller.backlog_seconds(self.pending_pixels))
        metrics.clients_in_flight.set_function(lambda: len(self.clients))
        for bucket in range(CLIENT_BUCKETS):
            metrics.client_queue_tiles.labels(str(bucket)).set(0)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddsnet-worker")
        # The gate has a lane of its own, so that choosing a sub-network never waits behind a running batch.
        self.gate_lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddsnet-gate")
        self._ids = itertools.count()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        for subnet in range(len(denoiser.subnets)):
            metrics.queue_tiles.labels(str(subnet)).set(0)

    @property
    def queues(self) -> dict[tuple[int, tuple[int, int]], list[TileWork]]:
        """The queued tiles by lane (sub-network, window shape), in arrival order."""
        return {key: [work for job in jobs for work in job.queued] for key, jobs in self.lanes.items()}

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
            started = self.clock()
            await self.run_on_worker(self.run_windows, window, index)
            self.controller.observe(index, side * side, self.clock() - started)

    def tile_cost(self, subnet: int, window_pixels: int) -> float:
        """MFLOPs of ``window_pixels`` at ``subnet``; of one window, what a tile is charged in the round robin."""
        return self.denoiser.subnets[subnet].mflops_per_pixel * window_pixels

    def own_seconds(self, subnet: int, window_pixels: int) -> float:
        """Estimated seconds of ``window_pixels`` at ``subnet``, from its measured speed (0 before any)."""
        return window_pixels * (self.controller.rate(subnet) or 0.0)

    def _seconds_per_mflop(self, subnet: int) -> float:
        return (self.controller.rate(subnet) or 0.0) / self.denoiser.subnets[subnet].mflops_per_pixel

    def _running_seconds(self) -> float:
        """Estimated seconds left of the batch that is running (0 when none is)."""
        if self.running is None:
            return 0.0
        subnet, pixels, started = self.running
        return max(0.0, self.own_seconds(subnet, pixels) - (self.clock() - started))

    def finish_seconds(self, client: str, subnet: int, window_pixels: int) -> float:
        """Estimated seconds until a request from ``client`` of ``window_pixels`` at ``subnet``, arriving now,
        is done.

        Oldest first, everything queued and running goes before it. Under fair sharing, what is left of the
        running batch goes first; then the rounds of the two round robins until the request is done, each
        member running, in each round, what its credit allows: within the client, its other requests (the new
        one joins at the back), and between clients, every other client with tiles queued, those ahead of it in
        the ring in every round it needs, those behind it in every round but its last. Rounds are counted in
        MFLOPs, as the round robin charges them; what a request runs takes seconds at its own width's measured
        speed, and what a client runs at the mean speed of its queued work.
        """
        if not self.fair:
            return self.controller.backlog_seconds(self.pending_pixels) + self.own_seconds(subnet, window_pixels)
        own = _Queued(self.tile_cost(subnet, window_pixels), self.quantum, self._seconds_per_mflop(subnet))
        share = self.clients.get(client)
        waiting = share is not None and share.queued_tiles > 0
        jobs = [_Queued(self._queued_mflops(job), share.jobs.credit_this_round(job, job.tile_cost),
                        self._seconds_per_mflop(job.subnet)) for job in share.jobs] if waiting else []
        mflops, seconds = _round_robin(own, jobs, [], self.quantum)
        first = self.turns.credit_this_round(share, share.jobs.ring[0].tile_cost) if waiting else self.quantum
        mine = _Queued(mflops, first, seconds / mflops)
        ring = list(self.turns)
        position = ring.index(share) if waiting else len(ring)
        ahead = [self._client_queued(other) for other in ring[:position]]
        behind = [self._client_queued(other) for other in ring[position + 1:]]
        return self._running_seconds() + _round_robin(mine, ahead, behind, self.quantum)[1]

    def _queued_mflops(self, job: Job) -> float:
        return len(job.queued) * job.tile_cost

    def _queued_seconds(self, job: Job) -> float:
        return self.own_seconds(job.subnet, len(job.queued) * job.window_pixels)

    def _client_queued(self, share: ClientShare) -> _Queued:
        """``share``'s queued work as one member of the round robin between clients."""
        mflops = sum(self._queued_mflops(job) for job in share.jobs)
        seconds = sum(self._queued_seconds(job) for job in share.jobs)
        return _Queued(mflops, self.turns.credit_this_round(share, share.jobs.ring[0].tile_cost),
                       seconds / mflops if mflops else 0.0)

    def plan(self, height: int, width: int) -> tuple[int, int]:
        """(tiles, window pixels) of a ``height x width`` image: what :meth:`submit` queues for it."""
        multiple = self.denoiser.multiple
        tiles = plan_tiles(height + -height % multiple, width + -width % multiple, self.denoiser.tile,
                           self.denoiser.margin, multiple)
        return len(tiles), sum(tile.shape[0] * tile.shape[1] for tile in tiles)

    def allowed_subnets(self, quality: Quality, noise: Noise) -> list[int]:
        """The sub-networks a request may run at before the gate has spoken: ``best`` and ``fast`` their own
        in each profile it may get, ``auto`` any width of those profiles."""
        profiles = self.denoiser.profiles if noise is Noise.auto else [noise.value]
        profiles = [profile for profile in profiles if profile in self.denoiser.rows]
        if quality is Quality.best:
            return [self.denoiser.best_of(profile) for profile in profiles]
        if quality is Quality.fast:
            return [self.denoiser.fast_of(profile) for profile in profiles]
        return [index for profile in profiles for index in self.denoiser.rows[profile]]

    def check_size(self, height: int, width: int, quality: Quality, noise: Noise = Noise.auto, client: str = "",
                   deadline: float | None = None, limits: CostLimits = CostLimits()) -> None:
        """Refuse, from its size alone, a request that :meth:`submit` would refuse before the gate runs; the
        service calls it with the size an upload's header declares, before decoding it.

        Raises:
            QueueFull, ClientBusy, OverLimit, DeadlineMiss: as :meth:`submit`.
        """
        tiles, window_pixels = self.plan(height, width)
        if tiles > self.max_queue_tiles:  # it would not fit in an empty queue: waiting cannot help
            raise OverLimit(f"the image needs {tiles} tiles, over DDSNET_MAX_QUEUE_TILES={self.max_queue_tiles}",
                            "queue_tiles")
        if self.queued_tiles + tiles > self.max_queue_tiles:
            raise QueueFull(f"{self.queued_tiles} tiles queued; this image needs {tiles} more")
        pixels = height * width
        if limits.max_client_pixels and pixels > limits.max_client_pixels:
            raise OverLimit(f"the image has {pixels} pixels, over DDSNET_MAX_CLIENT_PIXELS="
                            f"{limits.max_client_pixels}", "client_pixels")
        share = self.clients.get(client)
        if share is not None and limits.max_client_pixels and share.pixels + pixels > limits.max_client_pixels:
            raise ClientBusy(f"this client has {share.pixels} pixels in flight; with this image's {pixels} that "
                             f"is over DDSNET_MAX_CLIENT_PIXELS={limits.max_client_pixels}",
                             retry_after=max(1, math.ceil(self.client_seconds(share))))
        self.check_admission(self.allowed_subnets(quality, noise), window_pixels, client, deadline, limits,
                             self.max_wait_seconds(quality))

    def max_wait_seconds(self, quality: Quality) -> float | None:
        """The longest a request of ``quality`` may wait beyond its own compute: the controller's bound for
        ``auto``, none for ``fast`` and ``best``, which wait until their deadline."""
        return self.controller.max_wait_seconds() if quality is Quality.auto else None

    def client_seconds(self, share: ClientShare) -> float:
        """Estimated seconds of the work ``share`` has in flight: its queued tiles at their widths' measured
        speeds, and what is left of the running batch."""
        return self._running_seconds() + sum(self._queued_seconds(job) for job in share.jobs)

    def check_admission(self, subnets: list[int], window_pixels: int, client: str, deadline: float | None,
                        limits: CostLimits, max_wait: float | None = None) -> None:
        """Refuse a request of ``window_pixels`` (all its windows) whose slimmest allowed width, of ``subnets``,
        is over ``limits.max_request_seconds`` or cannot be done by ``deadline`` (the scheduler's clock), or
        that would wait more than ``max_wait`` seconds beyond its own compute at every one of ``subnets``.

        Raises:
            OverLimit: over the ceiling on one request's seconds.
            DeadlineMiss: not done in time even at the slimmest of ``subnets``; without ``retry_after`` when
                its own compute alone is longer than the time left.
            Overloaded: over ``max_wait`` at every one of ``subnets``.
        """
        if not subnets:
            return
        slimmest = min(subnets, key=lambda subnet: self.own_seconds(subnet, window_pixels))
        own = self.own_seconds(slimmest, window_pixels)
        if limits.max_request_seconds and own > limits.max_request_seconds:
            raise OverLimit(f"estimated {own:.1f} s of compute at sub-network {slimmest}, the slimmest this request "
                            f"may run, over DDSNET_MAX_REQUEST_SECONDS={limits.max_request_seconds:g}",
                            "request_seconds")
        if max_wait is None and deadline is None:
            return
        left = None if deadline is None else deadline - self.clock()
        if left is not None and own > left:
            raise DeadlineMiss(f"cannot be done by its deadline even with nothing queued: estimated {own:.2f} s of "
                               f"compute at sub-network {slimmest}, the slimmest it may run, with {max(left, 0.0):.2f}"
                               " s left; a retry with this deadline cannot help")
        finishes = {subnet: self.finish_seconds(client, subnet, window_pixels) for subnet in subnets}
        if max_wait is not None:
            shortest = min(finish - self.own_seconds(subnet, window_pixels) for subnet, finish in finishes.items())
            if shortest > max_wait:
                raise Overloaded(f"overloaded: even at the slimmest width this request would wait an estimated "
                                 f"{shortest:.2f} s, over the {max_wait:.2f} s that auto allows",
                                 retry_after=max(1, math.ceil(shortest - max_wait)))
        if left is None:
            return
        soonest = min(finishes, key=finishes.__getitem__)
        finish = finishes[soonest]
        if finish > left:
            raise DeadlineMiss(f"cannot be done by its deadline: estimated {finish:.2f} s at sub-network {soonest}, "
                               f"the soonest done of the widths it may run, with {max(left, 0.0):.2f} s left",
                               retry_after=max(1, math.ceil(finish - left)))

    async def submit(self, noisy: torch.Tensor, quality: Quality, received_at: float | None = None,
                     max_latency_seconds: float | None = None, noise: Noise = Noise.auto,
                     jpeg_quality: int | None = None, client: str = "", deadline: float | None = None,
                     limits: CostLimits = CostLimits()) -> Job:
        """Admit the request, select a sub-network and queue the image's tiles; await ``job.future`` for the
        result.

        ``received_at`` (the scheduler's clock; default: now) is when the upload arrived: the result's
        ``queue_seconds`` counts from it, decode and gate included. For ``auto``, the controller may give up
        width to the load (within ``max_latency_seconds`` when given) or to meet ``deadline``, never leaving the
        profile chosen (by ``noise``, the upload's ``jpeg_quality`` or the gate); all of a request's tiles run
        at one sub-network. ``client`` is who sent it, for fair sharing and ``limits``; ``deadline`` (the
        scheduler's clock) is when the answer stops being of use.

        Raises:
            QueueFull: the tiles would overflow ``max_queue_tiles`` now.
            ClientBusy, OverLimit: over one of ``limits``, or more tiles than ``max_queue_tiles`` alone.
            DeadlineMiss: it cannot be done by ``deadline``; checked before the gate runs, and again after.
        """
        height, width = noisy.shape[-2:]
        self.check_size(height, width, quality, noise, client, deadline, limits)
        image = self.denoiser.split(noisy)
        pixels = image.height * image.width
        window_pixels = image.window_pixels()  # all its windows, margins included
        share = self._reserve(client, pixels)  # in flight from here, so that a second upload sees this one
        try:
            chosen = await asyncio.get_running_loop().run_in_executor(
                self.gate_lane, self.denoiser.select, noisy, quality, noise, jpeg_quality)
            picked, gate_macs = chosen.index, chosen.gate_macs
            if self.queued_tiles + len(image.tiles) > self.max_queue_tiles:
                raise QueueFull(f"{self.queued_tiles} tiles queued; this image needs {len(image.tiles)} more")
            decision = self._decide(picked, quality, window_pixels, client, deadline, limits, max_latency_seconds)
            self.check_admission([decision.subnet], window_pixels, client, deadline, limits,
                                 self.max_wait_seconds(quality))
        except BaseException:
            self._release(share, pixels)
            raise
        if decision.subnet != picked:
            self.metrics.load_downgrades.labels(str(picked), str(decision.subnet)).inc()
        subnet = decision.subnet
        now = self.clock()
        job = Job(next(self._ids), image, subnet, asyncio.get_running_loop().create_future(), len(image.tiles), now,
                  gate_flops=2 * gate_macs, received_at=now if received_at is None else received_at,
                  gate_subnet=decision.gate_subnet, reason=decision.reason, profile=chosen.profile,
                  profile_reason=chosen.profile_reason, client=client, estimated_seconds=decision.estimated_seconds,
                  tile_cost=self.tile_cost(subnet, window_pixels // len(image.tiles)))
        job.queued.extend(TileWork(job, index, now) for index in range(len(image.tiles)))
        self.lanes.setdefault(job.lane, {})[job] = None
        self.pending_pixels[subnet] += window_pixels
        if not share.queued_tiles:
            self.turns.add(share)
        share.jobs.add(job)
        self._count_client_queued(share, len(image.tiles))
        self._count_queued(subnet, len(image.tiles))
        self._wakeup.set()
        return job

    def _decide(self, picked: int, quality: Quality, window_pixels: int, client: str, deadline: float | None,
                limits: CostLimits, max_latency_seconds: float | None) -> Decision:
        """The width the request runs at: for ``auto``, the controller's choice; else the pick."""
        def finish(subnet: int) -> float:
            return self.finish_seconds(client, subnet, window_pixels)

        if quality is not Quality.auto:
            return Decision(picked, None, REASON_REQUESTED, finish(picked))
        return self.controller.choose(
            picked, window_pixels, self.pending_pixels, max_latency_seconds, finish,
            deadline_seconds=None if deadline is None else deadline - self.clock(),
            max_own_seconds=limits.max_request_seconds or None)

    def _reserve(self, client: str, pixels: int) -> ClientShare:
        """Count ``pixels`` in flight for ``client``; its share, made on its first request in flight."""
        share = self.clients.get(client)
        if share is None:
            label = hashlib.blake2b(client.encode(), key=self._salt, digest_size=4).hexdigest()
            share = ClientShare(client, label, int(label, 16) % CLIENT_BUCKETS, DeficitRoundRobin(self.quantum))
            self.clients[client] = share
        share.requests += 1
        share.pixels += pixels
        return share

    def _release(self, share: ClientShare, pixels: int) -> None:
        share.requests -= 1
        share.pixels -= pixels
        if share.requests == 0:
            del self.clients[share.name]

    def _settle(self, job: Job) -> None:
        """The job is done, failed or cancelled: its pixels leave its client's count."""
        if not job.settled:
            job.settled = True
            self._release(self.clients[job.client], job.image.height * job.image.width)

    def cancel(self, job: Job, reason: str) -> None:
        """Drop the job's queued tiles; on the CPU its windows in a running batch are skipped."""
        if job.cancelled or job.future.done():
            return
        self._drop(job, reason)
        job.future.cancel()

    def _drop(self, job: Job, reason: str) -> None:
        """Mark ``job`` cancelled and remove its queued tiles, counting them under ``reason``."""
        job.cancelled = True
        dropped = len(job.queued)
        if dropped:
            self.pending_pixels[job.subnet] -= dropped * job.window_pixels
            job.queued.clear()
            self._unqueue(job, dropped)
            self.metrics.dropped_tiles.labels(reason).inc(dropped)
        self._settle(job)

    def _unqueue(self, job: Job, tiles: int) -> None:
        """``tiles`` of ``job``'s left the queue; once it has none left, it leaves its lane and its client's
        turns, and a client with nothing queued leaves the turns between clients."""
        share = self.clients[job.client]
        self._count_queued(job.subnet, -tiles)
        self._count_client_queued(share, -tiles)
        if job.queued:
            return
        lane = self.lanes[job.lane]
        del lane[job]
        if not lane:
            del self.lanes[job.lane]
        share.jobs.remove(job)
        if not share.queued_tiles:
            self.turns.remove(share)
            share.deficit = min(share.deficit, 0.0)  # no credit is banked while idle; a debt is kept

    def _fail(self, jobs: list[Job], error: BaseException) -> None:
        """A batch failed: its requests get the error, and their other tiles are dropped unrun."""
        for job in dict.fromkeys(jobs):
            if not job.future.done():
                self._drop(job, "inference_error")
                job.future.set_exception(error)

    def _count_queued(self, subnet: int, delta: int) -> None:
        self.queued_tiles += delta
        self.metrics.queue_tiles.labels(str(subnet)).inc(delta)

    def _count_client_queued(self, share: ClientShare, delta: int) -> None:
        share.queued_tiles += delta
        self.metrics.client_queue_tiles.labels(str(share.bucket)).inc(delta)

    def _next_turn(self) -> Job | None:
        """The job whose tile runs next: by deficit round robin between clients and then between a client's
        requests, or (oldest first) the first job of the lane whose oldest tile has waited longest."""
        if not self.lanes:
            return None
        if not self.fair:
            return min((next(iter(jobs)) for jobs in self.lanes.values()), key=lambda job: job.enqueued_at)

        def next_job(share: ClientShare) -> Job:
            return share.jobs.head(lambda job: job.tile_cost)

        return next_job(self.turns.head(lambda share: next_job(share).tile_cost))

    def _take(self, job: Job) -> TileWork:
        """``job``'s next tile, out of the queue and charged to its and its client's credit."""
        work = job.queued.popleft()
        share = self.clients[job.client]
        job.deficit -= job.tile_cost
        share.deficit -= job.tile_cost
        self._unqueue(job, 1)
        return work

    @property
    def batch_tiles(self) -> int:
        """The most tiles a batch takes: one under fair sharing on the CPU, where a batch's windows run one
        after another and a fuller batch gains nothing, so that the turn is picked again before every window;
        else ``max_batch_tiles``."""
        return 1 if self.fair and self.sequential else self.max_batch_tiles

    def _fill(self, first: Job) -> list[TileWork]:
        """A batch from ``first``'s lane, ``first``'s next tile first, up to :attr:`batch_tiles`.

        Oldest first: the lane's tiles in arrival order. Fairly on the CPU: that one tile. Fairly on a GPU,
        where a fuller batch costs little more: the lane's tiles, round robin over its clients in turn order
        and over each client's requests in the lane, each charged to its client.
        """
        lane = self.lanes[first.lane]
        batch = [self._take(first)]
        if not self.fair:
            for job in list(lane):
                while job.queued and len(batch) < self.max_batch_tiles:
                    batch.append(self._take(job))
            return batch
        if self.batch_tiles == 1:
            return batch
        shares = list(self.turns)
        if shares and shares[0] is self.clients[first.client]:
            shares = shares[1:] + shares[:1]  # the client whose turn it is had the first tile
        rounds = [deque(job for job in share.jobs if job in lane) for share in shares]
        rounds = [jobs for jobs in rounds if jobs]
        while rounds and len(batch) < self.max_batch_tiles:
            for jobs in list(rounds):
                if len(batch) >= self.max_batch_tiles:
                    break
                job = jobs[0]
                batch.append(self._take(job))
                jobs.rotate(-1)
                if not job.queued:
                    jobs.remove(job)
                if not jobs:
                    rounds.remove(jobs)
        return batch

    async def _schedule(self) -> None:
        waited = False  # the last wait for a batch to fill lasted its time
        while True:
            first = self._next_turn()
            if first is None:
                waited = False
                # Cleared before the trim, so that a submit while the trim runs still wakes the wait below.
                self._wakeup.clear()
                # Idle: give the freed image and activation buffers back to the OS, off the event loop.
                await self.run_on_worker(release_free_memory)
                await self._wakeup.wait()
                continue
            lane = self.lanes[first.lane]
            deadline = next(iter(lane)).enqueued_at + self.max_wait
            if not waited and sum(len(job.queued) for job in lane) < self.batch_tiles and self.clock() < deadline:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), deadline - self.clock())
                except asyncio.TimeoutError:
                    waited = True  # by the clock's reckoning, even one that stood still meanwhile
                continue
            waited = False
            subnet, window_pixels = first.subnet, first.window_pixels
            batch = self._fill(first)
            self.running = (subnet, len(batch) * window_pixels, self.clock())
            try:
                await self._run_batch(subnet, batch)
            except Exception as error:  # noqa: BLE001 - one bad batch fails its requests, never the scheduler
                self._fail([work.job for work in batch], error)
            finally:
                # Queued until now and running meanwhile: the batch leaves the pending work once it is done.
                self.pending_pixels[subnet] -= len(batch) * window_pixels
                self.running = None

    async def _run_batch(self, subnet: int, batch: list[TileWork]) -> None:
        """Run a batch and put each output in its image. On a GPU the windows run as one batch. On the CPU they
        run one at a time, which costs nothing there: each request gets its tile as soon as it is done, not
        when the batch is, and a window whose request was cancelled meanwhile (a timeout, a client gone) is
        skipped."""
        batch = [work for work in batch if not work.job.cancelled]
        if not batch:
            return
        label = str(subnet)
        started = self.clock()
        for work in batch:
            self.metrics.queue_wait_seconds.labels(label).observe(started - work.enqueued_at)
            if work.job.first_batch_at is None:
                work.job.first_batch_at = started
        windows = [work.job.image.window(work.index) for work in batch]
        if self.on_batch:
            self.on_batch(subnet, [work.job for work in batch])
        height, window_width = windows[0].shape[-2:]
        macs = self.denoiser.window_macs(subnet, height, window_width)
        widest_macs = self.denoiser.window_macs(self.denoiser.best_index, height, window_width)
        ran = 0
        try:
            if self.sequential:
                for work, window in zip(batch, windows):
                    if work.job.cancelled:
                        continue
                    window_started = self.clock()
                    output = await self.run_on_worker(self._compute_one, window, subnet)
                    ran += 1
                    self._put(work, output, 2 * macs, 2 * widest_macs, self.clock() - window_started)
            else:
                outputs = await self.run_on_worker(self._compute, windows, subnet)
                ran = len(batch)
                seconds = (self.clock() - started) / len(batch)
                for work, output in zip(batch, outputs):
                    self._put(work, output, 2 * macs, 2 * widest_macs, seconds)
        except Exception as error:  # noqa: BLE001 - a failed batch fails its requests, never the scheduler
            self._fail([work.job for work in batch], error)
            return
        elapsed = self.clock() - started
        self.metrics.inference_seconds.labels(label).observe(elapsed)
        self.metrics.batch_tiles.labels(label).observe(len(batch))
        self.controller.observe(subnet, height * window_width * ran, elapsed)

    def _put(self, work: TileWork, output: torch.Tensor, flops: int, widest_flops: int, seconds: float) -> None:
        """A tile is back: into its image, and its request is done with its last one."""
        job = work.job
        if job.future.done():
            return
        job.image.put(work.index, output)
        job.flops += flops
        job.widest_flops += widest_flops
        job.compute_seconds += seconds
        job.remaining -= 1
        if job.remaining == 0:
            self._finish(job)

    def _compute(self, windows: list[torch.Tensor], subnet: int) -> list[torch.Tensor]:
        """The batch's outputs, ``(1, 3, h, w)`` each, from one run of all its windows."""
        return list(self.run_windows(torch.cat(windows), subnet).cpu().split(1))

    def _compute_one(self, window: torch.Tensor, subnet: int) -> torch.Tensor:
        """One window's output, ``(1, 3, h, w)``."""
        return self.run_windows(window, subnet).cpu()

    def _finish(self, job: Job) -> None:
        label = str(job.subnet)
        flops = job.flops + job.gate_flops
        self.metrics.flops.labels(label).inc(flops)
        self.metrics.flops_widest.inc(job.widest_flops)
        self.metrics.pixels.inc(job.image.height * job.image.width)
        queue_seconds = (job.first_batch_at or job.enqueued_at) - job.received_at
        self._settle(job)
        job.future.set_result(ScheduledResult(job.image.result(), job.subnet, flops, queue_seconds,
                                              job.compute_seconds, job.widest_flops, job.gate_subnet, job.reason,
                                              job.profile, job.profile_reason))

    def sharing(self, top: int = 20) -> dict:
        """What ``GET /info`` shows of the sharing: the policy, and the ``top`` clients by queued tiles, each by
        its label (a salted hash of its identity) and metric bucket."""
        clients = sorted(self.clients.values(), key=lambda share: (-share.queued_tiles, share.label))[:top]
        return {
            "policy": "fair" if self.fair else "oldest_first",
            "quantum_mflops": round(self.quantum, 1),
            "clients_in_flight": len(self.clients),
            "clients": [{"client": share.label, "bucket": share.bucket, "requests": share.requests,
                         "queued_tiles": share.queued_tiles, "pixels_in_flight": share.pixels,
                         "queued_seconds": round(sum(self._queued_seconds(job) for job in share.jobs), 4)}
                        for share in clients],
        }
