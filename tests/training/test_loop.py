"""The one training loop: its schedules, the EMA, when it logs, validates, saves and stops, and its batches."""

from __future__ import annotations

import json

import pytest
import torch

from training.common import JsonLog
from training.compute import Compute, ComputeConfig
from training.config import DataConfig
from training.loop import Batches, Ema, Loop, cosine_lr, crop_for_step, run_loop


def test_cosine_lr_warms_up_linearly_then_falls_to_the_floor():
    peak, floor, warmup, total = 1e-3, 1e-5, 4, 20
    rates = [cosine_lr(step, total, peak, floor, warmup) for step in range(total + 1)]
    assert rates[:warmup] == pytest.approx([peak * (i + 1) / warmup for i in range(warmup)])
    assert rates[warmup] == pytest.approx(peak)
    assert all(a >= b for a, b in zip(rates[warmup:], rates[warmup + 1:]))
    assert rates[total] == pytest.approx(floor)
    assert cosine_lr(10, 20, 1.0) == pytest.approx(0.5)  # no warm-up, floor 0: half way is half the peak


def test_crop_schedule_switches_at_its_fractions():
    schedule = [[0.0, 96, 12], [0.5, 128, 8], [0.9, 160, 4]]
    assert [crop_for_step(schedule, step, 10) for step in (0, 4, 5, 8, 9)] == [
        (96, 12), (96, 12), (128, 8), (128, 8), (160, 4)]


def test_ema_moves_its_copy_towards_the_weights_by_one_minus_decay():
    net, copy = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    ema = Ema(net, copy, decay=0.9)
    assert torch.equal(copy.weight, net.weight) and not copy.weight.requires_grad
    before = copy.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update()
    assert torch.allclose(copy.weight, 0.9 * before + 0.1 * net.weight)


class Recorder:
    """A loop's hooks that record what happened, around a one-parameter model."""

    def __init__(self) -> None:
        self.param = torch.nn.Parameter(torch.zeros(1))
        self.optimizer = torch.optim.SGD([self.param], lr=0.1)
        self.shapes, self.validated, self.saved = [], [], []

    def train_step(self, clean: torch.Tensor, noisy: torch.Tensor) -> dict:
        self.shapes.append(tuple(clean.shape))
        assert clean.shape == noisy.shape
        self.optimizer.zero_grad()
        loss = (self.param - 1).square().sum()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}


@pytest.fixture
def batches(photo_dirs) -> Batches:
    data = DataConfig(train_dir=str(photo_dirs / "train"), val_dir=str(photo_dirs / "val"))
    return Batches.for_run(data, seed=3, compute=Compute(ComputeConfig()))


def make_loop(recorder: Recorder, tmp_path, **extra) -> Loop:
    settings = {"log_every": 3, "validate": lambda: recorder.validated.append(1) or {"val": 1.0}, "val_every": 4,
                "save": lambda step, seconds: recorder.saved.append(step), "save_every": 5, **extra}
    return Loop("test", 10, recorder.train_step, [recorder.optimizer], lr=lambda step: 0.01 * (step + 1),
                shape=lambda step: (16, 2) if step < 5 else (24, 1), log=JsonLog(tmp_path / "log.jsonl"), **settings)


def test_the_loop_logs_validates_and_saves_on_its_intervals_and_at_the_end(batches, tmp_path):
    recorder = Recorder()
    assert run_loop(make_loop(recorder, tmp_path), batches) == 10
    assert recorder.shapes == [(2, 3, 16, 16)] * 5 + [(1, 3, 24, 24)] * 5
    assert recorder.saved == [5, 10]
    assert len(recorder.validated) == 3  # steps 4, 8 and the last
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [3, 6, 9, 10]
    assert [r["lr"] for r in train] == pytest.approx([0.03, 0.06, 0.09, 0.10])  # the rate of the step logged
    assert [(r["crop"], r["batch"]) for r in train] == [(16, 2), (24, 1), (24, 1), (24, 1)]
    assert [r["step"] for r in records if "val" in r] == [4, 8, 10]
    assert recorder.optimizer.param_groups[0]["lr"] == pytest.approx(0.10)


def test_the_loop_stops_and_saves_at_stop_at_and_a_resumed_loop_ends_where_one_run_would(photo_dirs, tmp_path):
    def run(start: int, **extra) -> tuple[Recorder, int]:
        data = DataConfig(train_dir=str(photo_dirs / "train"), val_dir=str(photo_dirs / "val"))
        recorder = Recorder()
        batches = Batches.for_run(data, seed=3, compute=Compute(ComputeConfig()))
        return recorder, run_loop(make_loop(recorder, tmp_path / str(start), **extra), batches, start)

    stopped, reached = run(0, stop_at=7)
    assert reached == 7 and stopped.saved == [5, 7] and len(stopped.shapes) == 7
    rest, reached = run(7)
    assert reached == 10 and len(rest.shapes) == 3 and rest.saved == [10]


def test_reseeded_batches_repeat_their_crops_and_noise(batches):
    first = batches.stream(0, 2, lambda _: (16, 2))
    clean, noisy = first(0)
    batches.reseed()
    again_clean, again_noisy = batches.stream(0, 2, lambda _: (16, 2))(0)
    assert torch.equal(clean, again_clean) and torch.equal(noisy, again_noisy)
    assert not torch.equal(clean, noisy)
