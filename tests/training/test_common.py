"""The resumable training state, its metadata, and the PSNR table of a width on fixed pairs."""

from __future__ import annotations

import pytest
import torch

from model.checkpoint import load_checkpoint
from training.common import JsonLog, load_train_state, psnr_by_sigma, read_state_meta, save_train_state
from training.data import PatchSampler, fixed_noisy_set


def test_train_state_round_trips_weights_adam_moments_and_both_rngs(photo_dirs, tmp_path):
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(5)
    sampler = PatchSampler(photo_dirs / "train", seed=2)
    sampler.sample(1, 8)
    save_train_state(tmp_path / "state.safetensors", {"net": net}, optimizer, generator, sampler, {"step": 7})
    expected_noise = torch.randn(3, generator=generator)
    expected_crop = sampler.sample(1, 8)

    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.1)
    fresh_generator, fresh_sampler = torch.Generator(), PatchSampler(photo_dirs / "train", seed=99)
    meta = load_train_state(tmp_path / "state.safetensors", {"net": fresh}, fresh_optimizer, fresh_generator,
                            fresh_sampler)
    assert meta["step"] == 7 and read_state_meta(tmp_path / "state.safetensors")["step"] == 7
    assert torch.equal(fresh.weight, net.weight) and torch.equal(fresh.bias, net.bias)
    for param, fresh_param in zip(net.parameters(), fresh.parameters()):
        assert torch.equal(optimizer.state[param]["exp_avg_sq"], fresh_optimizer.state[fresh_param]["exp_avg_sq"])
        assert float(fresh_optimizer.state[fresh_param]["step"]) == 1
    assert torch.equal(torch.randn(3, generator=fresh_generator), expected_noise)
    assert torch.equal(fresh_sampler.sample(1, 8), expected_crop)


def test_a_missing_state_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume: no"):
        read_state_meta(tmp_path / "absent.safetensors")


def test_psnr_by_sigma_labels_each_noise_and_averages_over_photos(three_stage_run, photo_dirs):
    net = load_checkpoint(three_stage_run.tailored).net
    pairs = fixed_noisy_set(photo_dirs / "train", [15, 50], seed=1, crop=32, degradations=["jpeg80-awgn15"])
    table = psnr_by_sigma(net, net.widest(), pairs)
    assert list(table) == ["15", "50", "jpeg80-awgn15"]
    assert table["15"] > table["50"]  # less noise, a cleaner output


def test_json_log_appends_one_timed_record_per_line(tmp_path):
    log = JsonLog(tmp_path / "run" / "log.jsonl")
    log.write(step=1)
    log.write(step=2, loss=0.5)
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"step": 2' in lines[1] and '"time"' in lines[0]
