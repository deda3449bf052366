"""The one training loop. Every stage that trains weights runs it, and says only what differs.

Stage 1 (the supernet), stage 2's fine-tune, the static baselines and stage 3 (the gate) all train the same
way: at each step set the learning rate, take a batch of ``(clean, noisy)`` crops, take one optimisation step,
update an EMA of the weights, and now and then log, validate and save. What differs is handed in as a
:class:`Loop`: the step itself (the loss, and the widths it trains), the schedules, the validation and the
save. nanoGPT's ``train.py`` is the model: one loop, one ``get_lr``, read top to bottom.

A run that stops early (``max_minutes``, ``stop_at``) saves and returns the step it reached; a resumed run
starts the loop at that step, and because every random draw comes from state that the save holds (the crop
sampler, the noise generator, and whatever the step keeps), it continues exactly as an uninterrupted run.

Under ``torchrun`` the loop runs in every process (see :mod:`training.distributed`): each trains on its rows of
the global batch, the logged losses are the means over the processes, and rank 0 alone logs, validates and
saves; rank 0's clock decides ``max_minutes`` for all of them, so that they stop at the same step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from training.common import JsonLog
from training.compute import Compute, next_batch, worker_batches
from training.data import PatchSampler


def cosine_lr(step: int, total: int, peak: float, floor: float = 0.0, warmup: int = 0) -> float:
    """The learning rate at ``step`` of ``total``: a linear warm-up to ``peak`` over ``warmup`` steps, then a
    half cosine down to ``floor`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def crop_for_step(schedule: list[list[float]], step: int, total: int) -> tuple[int, int]:
    """The ``(crop, batch)`` in force at ``step``: the last schedule entry whose start fraction has passed.

    ``schedule`` rows are ``[fraction of training at which it starts, crop side, batch size]``.
    """
    crop, batch = int(schedule[0][1]), int(schedule[0][2])
    for start, entry_crop, entry_batch in schedule:
        if step >= start * total:
            crop, batch = int(entry_crop), int(entry_batch)
    return crop, batch


class Ema:
    """An exponential moving average of a network's weights, kept in a copy of it (what stages 1 and the
    static baselines export).

    Args:
        net: the network being trained; the average starts at its current weights.
        copy: an untrained module of the same architecture, on the same device, to hold the average.
        decay: the weight of the old average at each update.
    """

    def __init__(self, net: torch.nn.Module, copy: torch.nn.Module, decay: float) -> None:
        copy.load_state_dict(net.state_dict())
        copy.requires_grad_(False)
        self.net, self.module, self.decay = net, copy, decay

    @torch.no_grad()
    def update(self) -> None:
        for average, param in zip(self.module.parameters(), self.net.parameters()):
            average.lerp_(param, 1 - self.decay)


@dataclass
class Loop:
    """One stage's training loop: what it trains, on what, and when it logs, validates, saves and stops.

    Args:
        name: the progress bar's label.
        steps: the step the loop ends at.
        train_step: one optimisation step on a batch ``(clean, noisy)``, each ``(B, 3, crop, crop)`` on the
            compute device: zero the gradients, compute the loss of the widths it trains, step the optimizers.
            Returns the fields to log (losses, accuracies). In a data-parallel run the batch is this process's
            rows, and the step averages the gradients over the processes
            (:meth:`~training.distributed.World.average_gradients`) before it clips them.
        optimizers: whose learning rate ``lr`` sets at each step.
        lr: the learning rate at a step (see :func:`cosine_lr`).
        shape: the ``(crop, batch)`` at a step (see :func:`crop_for_step`).
        log: where to write; every ``log_every`` steps and at the end, one record with ``step_key``, ``lr``,
            the crop and batch, ``log_fields`` and what ``train_step`` returned.
        ema: updated after every step, when given.
        validate: called every ``val_every`` steps and at the end; its fields are logged.
        save: called with ``(step, elapsed seconds)`` every ``save_every`` steps, at the end, and on an early
            stop.
        max_minutes, stop_at: stop early (and save) after this long in this process, or at this step.
    """

    name: str
    steps: int
    train_step: Callable[[torch.Tensor, torch.Tensor], dict]
    optimizers: list[torch.optim.Optimizer]
    lr: Callable[[int], float]
    shape: Callable[[int], tuple[int, int]]
    log: JsonLog
    log_every: int = 10
    step_key: str = "step"
    log_fields: dict = field(default_factory=dict)
    ema: Ema | None = None
    validate: Callable[[], dict] | None = None
    val_every: int = 0
    save: Callable[[int, float], None] | None = None
    save_every: int = 0
    max_minutes: float = 0.0
    stop_at: int = 0

    def due(self, step: int, every: int) -> bool:
        return step == self.steps or (every > 0 and step % every == 0)


@dataclass
class Batches:
    """Where a loop's batches come from: cut by ``sampler`` and corrupted in this process, or made by
    ``compute.config.workers`` DataLoader processes (see :mod:`training.compute`)."""

    data: object  # a DataConfig
    sampler: PatchSampler
    generator: torch.Generator
    compute: Compute
    seed: int

    @classmethod
    def for_run(cls, data, seed: int, compute: Compute) -> Batches:
        """The crop sampler over ``data.train_dir`` and the noise generator, both seeded by ``seed``."""
        sampler = PatchSampler.for_data(data, seed)
        return cls(data, sampler, torch.Generator().manual_seed(seed), compute, seed)

    def reseed(self) -> None:
        """Start the crops and the noise again from the run's seed (each static baseline sees the same)."""
        self.sampler.rng.seed(self.seed)
        self.generator.manual_seed(self.seed)

    def stream(self, start: int, stop: int, shape: Callable[[int], tuple[int, int]]
               ) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
        """A function from a step to its batch (this process's rows of it), for the steps ``start .. stop - 1``
        in order."""
        workers: Iterator | None = None
        if self.compute.config.workers:
            workers = worker_batches(self.data, self.seed, start, stop, shape, self.compute.config.workers,
                                     pin_memory=self.compute.device.type == "cuda")

        def batch_at(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            crop, batch = shape(step)
            return next_batch(workers, self.sampler, self.data, self.generator, batch, crop, self.compute,
                              self.compute.world.rows(batch))

        return batch_at


def run_loop(loop: Loop, batches: Batches, start: int = 0, started: float | None = None) -> int:
    """Train from step ``start`` until ``loop.steps`` or an early stop; returns the step reached.

    ``started`` is the ``time.time()`` the run's elapsed seconds count from (earlier processes of a resumed
    run included); the default is now.
    """
    started = time.time() if started is None else started
    this_start = time.time()
    world = batches.compute.world
    if world.size > 1:  # refused before the first step rather than at the schedule's switch
        world.check_batches(loop.shape(at)[1] for at in range(start, loop.steps))
    batch_at = batches.stream(start, loop.steps, loop.shape)
    progress = tqdm(total=loop.steps, initial=start, desc=loop.name, dynamic_ncols=True, disable=not world.main)
    step = start
    while step < loop.steps:
        lr = loop.lr(step)
        for optimizer in loop.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        crop, batch = loop.shape(step)
        clean, noisy = batch_at(step)
        record = loop.train_step(clean, noisy)
        if loop.ema is not None:
            loop.ema.update()
        step += 1
        progress.update(1)
        elapsed = time.time() - started
        if loop.due(step, loop.log_every):
            record = world.mean_record(record)
            if world.main:
                loop.log.write(**{loop.step_key: step}, **loop.log_fields, lr=lr, crop=crop, batch=batch, **record,
                               seconds=round(elapsed, 1))
            progress.set_postfix({key: f"{value:.4f}" for key, value in record.items() if isinstance(value, float)},
                                 lr=f"{lr:.2e}")
        if world.main and loop.validate is not None and loop.due(step, loop.val_every):
            loop.log.write(**{loop.step_key: step}, **loop.validate(), seconds=round(elapsed, 1))
        over_time = loop.max_minutes > 0 and world.share(time.time() - this_start > 60 * loop.max_minutes)
        stop = over_time or step == loop.stop_at
        if world.main and loop.save is not None and (loop.due(step, loop.save_every) or stop):
            loop.save(step, elapsed)
        if stop:
            break
    progress.close()
    return step
