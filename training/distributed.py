"""Data-parallel training over the processes that ``torchrun`` starts (stage 1 and stage 2's fine-tune).

``torchrun --nproc-per-node N -m training supernet ...`` starts N processes. Each one trains a full copy of the
network on its rows of every step's global batch; their gradients are averaged before the clipping and the
optimizer step, so every copy takes the same step and the weights stay equal on every process. Rank 0
validates, logs and saves; the others train.

The data: every process draws the whole global batch from the same seeded sampler and noise generator and keeps
its rows, ``[r * B / N, (r + 1) * B / N)`` on rank ``r``. The crops and noise therefore do not depend on the
number of processes: N processes see exactly the batches one process would, a run's state (saved by rank 0) is
the state of every process, and a run may be resumed under another number of processes. The price is that
every process cuts and corrupts the whole batch, N times the crop work of one process; a per-process seeded
sampler would share that work but make the batches depend on N and need a sampler state per process.

The gradients: the sandwich step accumulates several widths' backward passes into one step, each on a slice
of the shared weights. The accumulated gradients are averaged once per step, in one all-reduce, where
``DistributedDataParallel`` would all-reduce at every backward pass (unless all but the last ran under
``no_sync``) and would wrap the network that the EMA, the validation and the checkpoint use bare. Each
process's loss is the mean over its rows (``l1`` over their pixels, ``log_mse`` over their images), and the
rows split evenly, so the average of the processes' gradients is the gradient of the global batch's loss,
and the clipping that follows sees what one process would.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """The processes of one run and this one's place among them.

    Args:
        rank: this process's index, 0 .. ``size - 1``; rank 0 validates, logs and saves.
        size: the number of processes (1: an ordinary run, and every method below does nothing).
        local_rank: this process's index on its machine: the CUDA device it computes on.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> World:
        """The world that ``torchrun`` describes in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; one process
        without them."""
        return cls(int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1)), int(environ.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        """Whether this process is the one that validates, logs and writes files."""
        return self.rank == 0

    def place(self, device: torch.device) -> torch.device:
        """This process's device for a configured ``device``: each process of a run on CUDA takes its own GPU,
        ``cuda:LOCAL_RANK``."""
        if self.size == 1 or device.type != "cuda":
            return device
        if device.index is not None:
            raise ValueError(f"compute.device is {device}, but under torchrun each process computes on "
                             "cuda:LOCAL_RANK; set compute.device to cuda or auto")
        return torch.device("cuda", self.local_rank)

    def check_batches(self, batches: Iterable[int]) -> None:
        """Refuse global batch sizes that do not split evenly over the processes."""
        uneven = sorted({batch for batch in batches if batch % self.size})
        if uneven:
            raise ValueError(f"batch size(s) {', '.join(map(str, uneven))} do not split over {self.size} "
                             f"processes: the batch sizes are global, so each must be a multiple of {self.size}")

    def rows(self, batch: int) -> slice:
        """This process's rows of a global batch of ``batch``."""
        self.check_batches([batch])
        share = batch // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace every gradient by its mean over the processes, in one all-reduce.

        Every process must hold gradients for the same parameters: it does, since every process trains the
        same widths at each step.
        """
        if self.size == 1:
            return
        grads = [param.grad for param in parameters if param.grad is not None]
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat)  # a sum: gloo has no average
        flat.div_(self.size)
        for grad, piece in zip(grads, flat.split([grad.numel() for grad in grads])):
            grad.copy_(piece.view(grad.shape))

    def mean_record(self, record: dict) -> dict:
        """A step's log record with its floats (and the floats in its lists) averaged over the processes,
        rounded to 6 digits as the steps round their losses: the global batch's losses, where each process
        measured its rows'."""
        if self.size == 1:
            return record
        places = [(key, None) for key, value in record.items() if isinstance(value, float)]
        places += [(key, index) for key, value in record.items() if isinstance(value, list)
                   for index, item in enumerate(value) if isinstance(item, float)]
        values = [record[key] if index is None else record[key][index] for key, index in places]
        summed = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(summed)
        averaged = {key: list(value) if isinstance(value, list) else value for key, value in record.items()}
        for (key, index), total in zip(places, summed.tolist()):
            if index is None:
                averaged[key] = round(total / self.size, 6)
            else:
                averaged[key][index] = round(total / self.size, 6)
        return averaged

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` (anything picklable), on every process: for a decision that must be the same
        everywhere, such as rank 0's clock saying the time is up."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self._collective_device())
        return box[0]

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


# An ordinary run: one process.
ONE_PROCESS = World()


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """The process group of a run of several processes, for the duration of the block: NCCL between GPUs,
    gloo on the CPU. One process needs none, and gets none.

    Args:
        world: the run's processes (:meth:`World.from_env`).
        device: this process's device (:meth:`World.place`).
    """
    if world.size == 1:
        yield
        return
    options = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        options["device_id"] = device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank, world_size=world.size,
                            **options)
    try:
        # Every process has read its config (and a resumed run's saved one) before rank 0 rewrites it.
        dist.barrier()
        yield
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    end_collectives(world)


def end_collectives(world: World) -> None:
    """Close the run's process group once no collective is left, on every process together: each waits
    for the others, then destroys the group. A process that tears its group down while a peer is still
    connected can abort in gloo's threads. Rank 0's work after this point (a stage's closing table,
    its files) runs as one process, unbounded by the group's timeout. Does nothing in one process or a
    second time."""
    if world.size == 1 or not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
