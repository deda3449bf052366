"""Data-parallel training under torchrun: two processes train the weights that one process trains on the same
global batch, resume, and refuse what they cannot split.

Each process draws the whole global batch and trains on its half, and the gradients are averaged once per step,
so a run of two processes computes what a run of one does, up to the order of floating-point sums: a
convolution's weight gradient sums over 2 images instead of 4 before the all-reduce adds the halves, and oneDNN
may block a batch of 2 differently from one of 4. Adam divides each gradient by its own running magnitude, so
a last-bit difference in a gradient near zero moves its weight by up to that relative difference times the
learning rate: at 5e-4 the weights (of order 0.1) of one and two processes differ by about 2e-8 in stage 1
and 7e-8 in the fine-tune, where stage 1's last two steps move them by up to 5e-4. The tolerance is 1e-5
relative and 1e-6 absolute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model import load_checkpoint
from tests.training.conftest import read_log, supernet_config, tiny_data
from training.cli import main as train_main
from training.common import JsonLog, read_state_meta
from training.compute import Compute, ComputeConfig
from training.config import DataConfig, TailorStage, load_config, save_config
from training.distributed import World, end_collectives
from training.loop import Batches, Loop, run_loop
from training.supernet import train_supernet
from training.tailor import tailor

REPO = Path(__file__).resolve().parents[2]
RTOL, ATOL = 1e-5, 1e-6
# Batch 4: two rows on each of two processes; the crop changes half way, at step 2.
SCHEDULE = [[0, 16, 4], [0.5, 24, 4]]


def torchrun(*args: str) -> None:
    """``ddsnet-train ARGS`` in two processes on the CPU (gloo), as ``torchrun --nproc-per-node 2`` runs it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "training", *args]
    # One thread per process: the two share the machine's cores.
    run = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("wrote ") == 1  # rank 0 alone reports


def assert_close(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> float:
    """Every floating-point tensor within the tolerance; returns the largest absolute difference."""
    assert expected.keys() == actual.keys()
    worst = 0.0
    for name, tensor in expected.items():
        if tensor.is_floating_point():
            assert torch.allclose(actual[name], tensor, rtol=RTOL, atol=ATOL), name
            worst = max(worst, (actual[name].double() - tensor.double()).abs().max().item())
        else:
            assert torch.equal(actual[name], tensor), name
    return worst


def train_records(run: Path) -> list[dict]:
    return [r for r in read_log(run) if "loss_widest" in r]


def test_two_processes_train_what_one_trains_on_the_same_global_batch_and_resume(photo_dirs, tmp_path):
    one, stopped = tmp_path / "one", tmp_path / "one_stopped"
    train_supernet(supernet_config(photo_dirs, one, crop_schedule=SCHEDULE))
    train_supernet(supernet_config(photo_dirs, stopped, crop_schedule=SCHEDULE, stop_at=2))
    two = tmp_path / "two"
    config_file = tmp_path / "two.yaml"
    save_config(supernet_config(photo_dirs, two, crop_schedule=SCHEDULE, stop_at=2), config_file)

    torchrun("supernet", "--config", str(config_file))
    # The state at step 2 (weights, EMA, Adam moments, the sampler's and the noise's RNG states) is one
    # process's state at step 2.
    halfway = load_file(stopped / "state.safetensors")
    assert_close(halfway, load_file(two / "state.safetensors"))
    assert read_state_meta(two / "state.safetensors")["sampler_rng"] == \
        read_state_meta(stopped / "state.safetensors")["sampler_rng"]
    torchrun("supernet", "--resume", "--set", f"out_dir={two}", "--set", "stop_at=0")

    expected, actual = load_checkpoint(one / "supernet.safetensors"), load_checkpoint(two / "supernet.safetensors")
    worst = assert_close(expected.net.state_dict(), actual.net.state_dict())
    final = load_file(one / "state.safetensors")
    worst = max(worst, assert_close(final, load_file(two / "state.safetensors")))
    # Not a trivial equality: steps 3 and 4 moved the weights far more than the processes differ.
    moved = max((final[name] - halfway[name]).abs().max().item() for name in final if name.startswith("net."))
    assert moved > 100 * max(worst, ATOL)

    # One record per step, from rank 0, with the global batch's losses.
    records, reference = train_records(two), train_records(one)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["batch"] for r in records] == [4, 4, 4, 4]
    for ours, theirs in zip(records, reference):
        assert ours["loss_widest"] == pytest.approx(theirs["loss_widest"], abs=1e-5)
        assert ours["loss_random"] == pytest.approx(theirs["loss_random"], abs=1e-5)
    assert [r["step"] for r in read_log(two) if "val_psnr_widest" in r] == [2, 4]


def test_two_processes_fine_tune_the_tailored_configurations_as_one_does(photo_dirs, supernet, tmp_path):
    # The l1 loss here (stage 1's test has log_mse): a mean over pixels, where log_mse is a mean over images;
    # over halves of equal size, both average to the whole batch's.
    overrides = [f"supernet={supernet}", "search_crop=32", f"data={json.dumps(tiny_data(photo_dirs))}",
                 "finetune_crop=16", "finetune_batch=4", "finetune_steps=2", "finetune_lr=0.0005", "log_every=1",
                 "loss=l1"]
    one = tailor(load_config(TailorStage, None, [f"out_dir={tmp_path / 'one'}", *overrides]))
    torchrun("tailor", *(item for override in [f"out_dir={tmp_path / 'two'}", *overrides]
                         for item in ("--set", override)))

    two = tmp_path / "two"
    # Rank 0 measured the table before the fine-tune on the searched weights, as one process does.
    before = (tmp_path / "one" / "table_before_finetune.json").read_text()
    assert (two / "table_before_finetune.json").read_text() == before
    expected, actual = load_checkpoint(one), load_checkpoint(two / "tailored.safetensors")
    assert [s.widths for s in actual.subnets] == [s.widths for s in expected.subnets]
    assert_close(expected.net.state_dict(), actual.net.state_dict())
    # The search's cuts and the steps are logged once, by rank 0.
    cuts = sum("fraction" in r for r in read_log(two))
    assert cuts == sum("fraction" in r for r in read_log(tmp_path / "one")) > 0
    assert [r["finetune_step"] for r in read_log(two) if "finetune_step" in r] == [1, 2]


def test_a_process_takes_its_rows_of_the_global_batch():
    assert World(0, 2).rows(8) == slice(0, 4) and World(1, 2).rows(8) == slice(4, 8)
    assert World().rows(6) == slice(0, 6)
    with pytest.raises(ValueError, match="multiple of 4"):
        World(1, 4).rows(6)


def test_under_torchrun_each_process_computes_on_its_own_gpu():
    assert World(3, 4, local_rank=1).place(torch.device("cuda")) == torch.device("cuda", 1)
    assert World(3, 4, local_rank=1).place(torch.device("cpu")) == torch.device("cpu")
    assert World().place(torch.device("cuda", 2)) == torch.device("cuda", 2)
    with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
        World(0, 2).place(torch.device("cuda", 0))


def test_a_batch_that_does_not_split_is_refused_before_the_first_step(photo_dirs, tmp_path):
    data = DataConfig(train_dir=str(photo_dirs / "train"), val_dir=str(photo_dirs / "val"))
    batches = Batches.for_run(data, seed=0, compute=Compute(ComputeConfig(), World(0, 2)))
    steps = []
    loop = Loop("test", 4, lambda clean, noisy: steps.append(1) or {}, [], lr=lambda _: 0.0,
                shape=lambda step: (16, 4) if step < 2 else (16, 3), log=JsonLog(tmp_path / "log.jsonl"))
    with pytest.raises(ValueError, match="batch size"):
        run_loop(loop, batches)
    assert steps == []


def test_the_single_process_stages_refuse_to_run_under_torchrun(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert train_main(["gate", "--set", f"out_dir={tmp_path / 'gate'}"]) == 2
    assert "runs in one process" in capsys.readouterr().err
    assert not (tmp_path / "gate").exists()


def test_the_process_group_closes_once_its_collectives_end(tmp_path):
    # A group of one process stands in for a run's group: end_collectives waits at the barrier, destroys the
    # group, and does nothing the second time (process_group's exit after a stage that already closed it).
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        end_collectives(World(0, 2))
        assert not torch.distributed.is_initialized()
        end_collectives(World(0, 2))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(str(tmp_path / "again"), 1),
                                         rank=0, world_size=1)
    end_collectives(World())  # one process's run has no group of its own to close
    assert torch.distributed.is_initialized()
    torch.distributed.destroy_process_group()
