"""The load controller: under load, ``quality=auto`` gives up width to keep latency, instead of queueing.

A slimmable network's width is a dial that other serving systems do not have; they can only queue or refuse.
The controller turns it. It learns each sub-network's speed from the batches the scheduler runs (an EWMA of
seconds per window pixel), and for every ``auto`` request it estimates the wait: the work queued and running
that runs before the request is done (all of it when tiles run oldest first; under fair sharing, the share the
scheduler works out), plus the request's own work at a given width. It keeps the gate's pick when that fits in
the latency target, and otherwise the widest sub-network no wider than the pick that does, or the slimmest
when none does.

* Load is the only reason to step down for the target: with nothing queued or running, ``auto`` is the gate's
  pick, however large the image, unless the pick would miss the request's deadline or exceed the ceiling on one
  request's seconds; then the widest width that meets both runs (reason ``deadline``). Those two are hard
  bounds: they hold with the target off too, and refusal is left for when no width meets them.
* ``best`` and ``fast`` are never changed.
* Shedding is the last resort: when even the slimmest width would keep an ``auto`` request waiting, beyond its
  own compute, for more than ``shed_factor`` times the target, the scheduler refuses it at once (503,
  ``Retry-After``, reason ``overload``) rather than answer it late. Past the rate the slimmest width sustains,
  a queue only grows; refusing the excess keeps the answers that are given within the target.
* Hysteresis: once load has capped the width, the cap widens again only when the wider width fits in
  ``recover`` times the target, so that widths do not flap as the queue hovers around it.

The controller holds no clock of its own beyond the ``clock`` it is given, and no threads: the scheduler calls it
from the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

REASON_GATE = "gate"
REASON_LOAD = "load"
REASON_REQUESTED = "requested"
REASON_DEADLINE = "deadline"


@dataclass(frozen=True)
class Decision:
    """The sub-network a request runs at, why (``gate``, ``load``, ``deadline`` or ``requested``), and the
    estimated seconds from now until it is done."""

    subnet: int
    gate_subnet: int | None
    reason: str
    estimated_seconds: float


class LoadController:
    """Chooses a width for each ``auto`` request from the measured speed of every width and the backlog.

    Args:
        costs: MFLOPs per pixel of each sub-network, by index (the checkpoint's table).
        target_seconds: the latency the controller keeps ``auto`` requests within; 0 turns it off.
        smoothing: the EWMA weight of the newest batch.
        recover: the cap widens only when the wider width fits within ``recover * target``.
        clock: seconds, monotonic (``time.monotonic``); tests pass a fake one.
        profiles: each sub-network's profile, by index.
        shed_factor: ``auto`` requests that would wait longer than this many targets at the slimmest width are
            refused (:meth:`max_wait_seconds`); 0: never.
    """

    def __init__(self, costs: Sequence[float], target_seconds: float, smoothing: float = 0.2, recover: float = 0.7,
                 clock: Callable[[], float] = time.monotonic, profiles: Sequence[str] | None = None,
                 shed_factor: float = 0.0) -> None:
        if target_seconds < 0:
            raise ValueError("the latency target must be >= 0 (0 turns the controller off)")
        if shed_factor < 0:
            raise ValueError("the shedding factor must be >= 0 (0 turns shedding off)")
        if not 0 < smoothing <= 1 or not 0 < recover <= 1:
            raise ValueError("smoothing and recover must be in (0, 1]")
        self.costs = list(costs)
        self.target = target_seconds
        self.smoothing = smoothing
        self.recover = recover
        self.clock = clock
        # Widest first: the order in which the controller gives width up.
        self.by_width = sorted(range(len(self.costs)), key=lambda index: -self.costs[index])
        # Each sub-network's profile: width is given up within a profile, never across.
        self.profiles = list(profiles) if profiles is not None else [""] * len(self.costs)
        self.seconds_per_pixel: dict[int, float] = {}
        self.observed_at: dict[int, float] = {}
        self.cap = self.by_width[0]
        self.downgrades = 0
        self.shed_factor = shed_factor

    @property
    def enabled(self) -> bool:
        return self.target > 0

    def max_wait_seconds(self) -> float | None:
        """The longest an ``auto`` request may be expected to wait, beyond its own compute, before it is
        refused; None when the controller or shedding is off."""
        if not self.enabled or not self.shed_factor:
            return None
        return self.shed_factor * self.target

    def observe(self, subnet: int, pixels: int, seconds: float) -> None:
        """A batch of ``pixels`` window pixels ran at ``subnet`` in ``seconds``."""
        if pixels <= 0 or seconds <= 0:
            return
        rate = seconds / pixels
        previous = self.seconds_per_pixel.get(subnet)
        self.seconds_per_pixel[subnet] = rate if previous is None else previous + self.smoothing * (rate - previous)
        self.observed_at[subnet] = self.clock()

    def rate(self, subnet: int) -> float | None:
        """Seconds per pixel at ``subnet``: measured, or scaled by FLOPs from the nearest measured width; None
        before any batch has run."""
        if subnet in self.seconds_per_pixel:
            return self.seconds_per_pixel[subnet]
        if not self.seconds_per_pixel:
            return None
        nearest = min(self.seconds_per_pixel, key=lambda known: abs(self.costs[known] - self.costs[subnet]))
        return self.seconds_per_pixel[nearest] * self.costs[subnet] / self.costs[nearest]

    def backlog_seconds(self, pixels_by_subnet: dict[int, int]) -> float:
        """The estimated seconds to run ``pixels_by_subnet`` (window pixels queued or running, per width)."""
        return sum(pixels * (self.rate(subnet) or 0.0) for subnet, pixels in pixels_by_subnet.items())

    def choose(self, gate_subnet: int, pixels: int, pixels_ahead: dict[int, int],
               max_latency_seconds: float | None = None, finish: Callable[[int], float] | None = None,
               deadline_seconds: float | None = None, max_own_seconds: float | None = None) -> Decision:
        """The width for an ``auto`` request whose gate picked ``gate_subnet``.

        Args:
            gate_subnet: the gate's pick.
            pixels: the request's own window pixels (its tiles with their margins).
            pixels_ahead: window pixels queued or running ahead of it, per sub-network.
            max_latency_seconds: the request's own bound, at most the target.
            finish: sub-network -> the seconds until the request would be done at it, the work that runs
                before it included; default: all of ``pixels_ahead`` runs first.
            deadline_seconds: the seconds left before the request's deadline (a hard bound).
            max_own_seconds: the most seconds the request's own work may take (a hard bound).

        With the target off (0) only the hard bounds change the pick. When no width meets them, the slimmest
        comes back for the caller to refuse, and it is not counted as a downgrade.
        """
        backlog = self.backlog_seconds(pixels_ahead)

        def own(subnet: int) -> float:
            return pixels * (self.rate(subnet) or 0.0)

        def estimate(subnet: int) -> float:
            return backlog + own(subnet) if finish is None else finish(subnet)

        def widest_within(bound: float, widths: list[int]) -> int:
            return next((subnet for subnet in widths if estimate(subnet) <= bound), widths[-1])

        def within_limits(subnet: int) -> bool:
            return ((deadline_seconds is None or estimate(subnet) <= deadline_seconds)
                    and (max_own_seconds is None or own(subnet) <= max_own_seconds))

        loaded = any(pixels_ahead.values())
        if not loaded:
            self.cap = self.by_width[0]  # no load: nothing to give width up for
        ladder = self.ladder(gate_subnet)
        rank = ladder.index(gate_subnet)
        if self.enabled and loaded:
            # The cap is the server's state, a rank on the ladder of widths: the widest that keeps the target,
            # widened again only with room. Each profile has its ladder; the cap's rank carries across them.
            cap_rank = min(self.ladder(self.cap).index(self.cap), len(ladder) - 1)
            fit_rank = ladder.index(widest_within(self.target, ladder))
            if fit_rank > cap_rank:
                cap_rank = fit_rank
            elif fit_rank < cap_rank:
                cap_rank = ladder.index(widest_within(self.recover * self.target, ladder[fit_rank:cap_rank + 1]))
            self.cap = ladder[cap_rank]
            ranks = [rank, cap_rank]
            if max_latency_seconds is not None:
                ranks.append(ladder.index(widest_within(min(self.target, max_latency_seconds), ladder)))
            rank = max(ranks)
        reason = REASON_GATE if ladder[rank] == gate_subnet else REASON_LOAD
        if not within_limits(ladder[rank]):
            # Slimmer still, to meet the hard bounds; when no width does, the slimmest, for the caller to refuse.
            bounded = next((slimmer for slimmer in range(rank, len(ladder)) if within_limits(ladder[slimmer])), None)
            if bounded is None:
                return Decision(ladder[-1], gate_subnet, REASON_DEADLINE, estimate(ladder[-1]))
            rank, reason = bounded, REASON_DEADLINE
        if reason != REASON_GATE:
            self.downgrades += 1
        return Decision(ladder[rank], gate_subnet, reason, estimate(ladder[rank]))

    def ladder(self, subnet: int) -> list[int]:
        """The sub-networks of ``subnet``'s profile, widest first."""
        return [index for index in self.by_width if self.profiles[index] == self.profiles[subnet]]

    def state(self, pixels_ahead: dict[int, int]) -> dict:
        """What ``GET /info`` shows."""
        return {
            "enabled": self.enabled,
            "latency_target_ms": round(1000 * self.target, 1),
            "cap_subnet": self.cap,
            "backlog_seconds": round(self.backlog_seconds(pixels_ahead), 4),
            "seconds_per_megapixel": {str(subnet): round(1e6 * rate, 4)
                                      for subnet, rate in sorted(self.seconds_per_pixel.items())},
            "measured_seconds_ago": {str(subnet): round(self.clock() - at, 1)
                                     for subnet, at in sorted(self.observed_at.items())},
            "load_downgrades": self.downgrades,
        }


__all__ = ["Decision", "LoadController", "REASON_DEADLINE", "REASON_GATE", "REASON_LOAD", "REASON_REQUESTED"]
