"""Where the stages compute, and the batches that workers make."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from training.compute import Compute, ComputeConfig, next_batch


def test_bad_compute_settings_are_refused():
    with pytest.raises(ValueError, match="compute.amp"):
        ComputeConfig(amp="fp8")
    with pytest.raises(ValueError, match="compute.workers"):
        ComputeConfig(workers=-1)


def test_the_cpu_compute_places_tensors_in_the_configured_layout():
    compute = Compute(ComputeConfig(channels_last=True))
    tensor = compute.tensor(torch.rand(1, 3, 4, 4))
    assert tensor.device.type == "cpu" and tensor.is_contiguous(memory_format=torch.channels_last)
    with compute.autocast():  # bf16 autocast applies on CUDA only
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


WORKERS_SCRIPT = """
import sys, torch
from training.compute import StepBatches, step_seed, worker_batches
from training.config import DataConfig
from training.degradations import DegradationConfig
data = DataConfig(train_dir=sys.argv[1], val_dir=sys.argv[1],
                  degradations=DegradationConfig(mix={"awgn": 1.0, "jpeg": 1.0}))
shape = lambda step: (16, 2) if step < 2 else (24, 1)
in_process = list(StepBatches(data, seed=4, start=0, stop=4, shape=shape))
two_workers = list(worker_batches(data, 4, 0, 4, shape, workers=2, pin_memory=False))
assert len(two_workers) == 4
for (clean, noisy), (worker_clean, worker_noisy) in zip(in_process, two_workers):
    assert torch.equal(clean, worker_clean) and torch.equal(noisy, worker_noisy)
assert in_process[2][0].shape == (1, 3, 24, 24)
assert step_seed(4, 1) != step_seed(4, 2) and step_seed(5, 1) != step_seed(4, 1)
print("same")
"""


def test_worker_batches_do_not_depend_on_the_number_of_workers(photo_dirs):
    # In a process of its own: DataLoader workers fork, and must not inherit the thread pools that other
    # tests' inference runtimes (OpenVINO, ONNX Runtime) leave in this one.
    run = subprocess.run([sys.executable, "-c", WORKERS_SCRIPT, str(photo_dirs / "train")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "same", run.stderr[-2000:]


def test_next_batch_takes_the_workers_batch_when_there_are_workers(photo_dirs):
    compute = Compute(ComputeConfig())
    made = iter([(torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8))])
    clean, noisy = next_batch(made, None, None, None, 1, 8, compute)
    assert clean.sum() == 0 and noisy.mean() == 1
