"""Where and how the stages compute: the device, bf16 autocast, channels-last, and batches made by workers.

The defaults (CPU, float32, batches made in the training process) keep a run bit-reproducible and exactly
resumable. On a GPU, ``device: auto`` (or ``cuda``), ``amp: bf16``, ``channels_last: true`` and
``workers: N`` keep it busy: N DataLoader processes cut the crops and add the noise while it trains. With
workers, every step's crops and noise come from a seed made of the run's seed and the step, so the batches
do not depend on the number of workers. Under ``torchrun`` each process computes on its own device and
trains on its rows of every batch (see :mod:`training.distributed`).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from model.inference import resolve_device
from training.data import PatchSampler, noisy_batch
from training.distributed import ONE_PROCESS, World


@dataclass
class ComputeConfig:
    """How a stage computes."""

    # "cpu", "cuda", "cuda:1", ..., or "auto": CUDA when available, else the CPU.
    device: str = "cpu"
    # "bf16": bfloat16 autocast on CUDA (losses in float32); "none": float32 throughout.
    amp: str = "none"
    # Channels-last memory layout for the network and its inputs.
    channels_last: bool = False
    # > 0: this many DataLoader worker processes make the training batches (crops and noise).
    workers: int = 0

    def __post_init__(self) -> None:
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"compute.amp must be 'none' or 'bf16', not {self.amp!r}")
        if self.workers < 0:
            raise ValueError(f"compute.workers must be >= 0, not {self.workers}")


class Compute:
    """A resolved :class:`ComputeConfig`: the device, and how tensors and modules are placed on it.

    Args:
        config: the stage's compute settings.
        world: the processes of a data-parallel run; this one's device is its own GPU among them.
    """

    def __init__(self, config: ComputeConfig, world: World = ONE_PROCESS) -> None:
        self.device = world.place(resolve_device(config.device))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"compute.device is {config.device!r}, but CUDA is not available")
        self.config, self.world = config, world
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format

    def module(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` moved to the device, in the configured memory format."""
        return module.to(self.device, memory_format=self.memory_format)

    def tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """A ``(B, C, H, W)`` tensor moved to the device, in the configured memory format."""
        non_blocking = self.device.type == "cuda" and tensor.is_pinned()
        return tensor.to(self.device, non_blocking=non_blocking, memory_format=self.memory_format)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast on CUDA when ``amp: bf16``; otherwise nothing."""
        if self.config.amp == "bf16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def step_seed(seed: int, step: int) -> int:
    """The seed of one step's batch when workers make the batches."""
    return (seed * 1_000_003 + step) % 2**63


class StepBatches(IterableDataset):
    """``(clean, noisy)`` training batches for steps ``start .. stop - 1``, each from its own seed.

    Worker ``w`` of ``W`` makes steps ``start + w``, ``start + w + W``, ...; the DataLoader hands the workers'
    batches out in turn, so the steps arrive in order.
    """

    def __init__(self, data, seed: int, start: int, stop: int, shape: Callable[[int], tuple[int, int]]) -> None:
        self.data, self.seed, self.start, self.stop, self.shape = data, seed, start, stop, shape
        self.sampler: PatchSampler | None = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.sampler is None:  # loaded in each worker process, once
            self.sampler = PatchSampler.for_data(self.data)
        for step in range(self.start + worker, self.stop, workers):
            crop, batch = self.shape(step)
            self.sampler.rng = random.Random(step_seed(self.seed, step))
            generator = torch.Generator().manual_seed(step_seed(self.seed, step))
            clean = self.sampler.sample(batch, crop)
            yield clean, noisy_batch(clean, self.data, generator, self.sampler.rng)


def next_batch(batches: Iterator | None, sampler: PatchSampler, data, generator: torch.Generator, batch: int,
               crop: int, compute: Compute, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's ``(clean, noisy)`` on the compute device: from the workers' ``batches`` when there are
    workers, else cut by ``sampler`` and corrupted in this process. ``rows`` of the batch are kept (a process's
    share of a data-parallel run's batch), cut before they are moved."""
    if batches is None:
        clean = sampler.sample(batch, crop)
        noisy = noisy_batch(clean, data, generator, sampler.rng)
    else:
        clean, noisy = next(batches)
    return compute.tensor(clean[rows]), compute.tensor(noisy[rows])


def worker_batches(data, seed: int, start: int, stop: int, shape: Callable[[int], tuple[int, int]],
                   workers: int, pin_memory: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of :class:`StepBatches` through a DataLoader with ``workers`` processes."""
    loader = DataLoader(StepBatches(data, seed, start, stop, shape), batch_size=None, num_workers=workers,
                        pin_memory=pin_memory, persistent_workers=False, prefetch_factor=4)
    return iter(loader)
