"""The denoiser (model/inference.py): which sub-network runs, tiled results, costs, and handed-in runtimes."""

from __future__ import annotations

import pytest
import torch

from model import Denoiser, Noise, Quality, Selection, denoise_whole, gate_macs, load_checkpoint
from model.flops import STATS_MACS_PER_PIXEL
from model.gate import NUM_STATS, GateConfig, choose


@pytest.fixture
def denoiser(tiny_checkpoint) -> Denoiser:
    return Denoiser(load_checkpoint(tiny_checkpoint), tile=16)


def noisy_image(height: int = 75, width: int = 101, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_best_is_the_widest_fast_the_slimmest_and_neither_runs_the_gate(denoiser):
    costs = [subnet.mflops_per_pixel for subnet in denoiser.subnets]
    assert denoiser.select(noisy_image(), Quality.best) == Selection(costs.index(max(costs)), 0, "white", "gate")
    assert denoiser.select(noisy_image(), Quality.fast) == Selection(costs.index(min(costs)), 0, "white", "gate")


def test_auto_is_the_gates_pick_and_costs_the_gate(denoiser):
    noisy = noisy_image()
    with torch.no_grad():
        expected = int(denoiser.gate(noisy).argmax(dim=1).item())
    assert denoiser.select(noisy, Quality.auto) == Selection(expected, gate_macs(denoiser.gate.config, 75, 101),
                                                             "white", "gate")


@pytest.mark.parametrize("index", [0, 2])
def test_tiled_run_equals_the_whole_image_and_counts_every_window(denoiser, index):
    noisy = noisy_image()
    denoised, macs = denoiser.run(noisy, index)
    tiles = denoiser.split(noisy).tiles
    assert len(tiles) > 1  # at tile=16 the image is really tiled
    whole = denoise_whole(denoiser.net, noisy, denoiser.subnets[index].widths).clamp(0, 1)
    assert denoised.shape == noisy.shape and (denoised - whole).abs().max().item() < 1e-4
    assert macs == sum(denoiser.window_macs(index, *tile.shape) for tile in tiles)


def test_denoise_selects_then_runs_and_counts_network_and_gate(denoiser):
    noisy = noisy_image(40, 50)
    result = denoiser.denoise(noisy, Quality.auto)
    chosen = denoiser.select(noisy, Quality.auto)
    index, gate_cost = chosen.index, chosen.gate_macs
    denoised, macs = denoiser.run(noisy, index)
    assert result.subnet == index and torch.equal(result.denoised, denoised)
    assert result.flops == 2 * (gate_cost + macs)


def test_a_handed_in_runtime_runs_instead_of_the_supernet_and_the_denoiser_keeps_nothing(denoiser):
    seen: list[tuple[int, ...]] = []

    def runtime(windows: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(windows.shape))
        return torch.full_like(windows, 0.5)

    before = dict(vars(denoiser))
    noisy = noisy_image(40, 50)
    result = denoiser.denoise(noisy, Quality.fast, {denoiser.fast_index: runtime})
    assert torch.all(result.denoised == 0.5) and len(seen) == len(denoiser.split(noisy).tiles)
    assert vars(denoiser) == before
    plain = denoiser.denoise(noisy, Quality.fast)  # without runtimes: the supernet again
    assert not torch.all(plain.denoised == 0.5) and len(seen) == len(denoiser.split(noisy).tiles)


def test_the_summary_is_the_table_the_cli_and_the_service_show(denoiser):
    summary = denoiser.summary()
    assert set(summary) == {"subnets", "profiles", "best", "fast", "gate_mflops_per_pixel", "gate_trained", "tile",
                            "margin", "provenance"}
    assert [row["widths"] for row in summary["subnets"]] == [list(s.widths) for s in denoiser.subnets]
    assert summary["best"] == denoiser.best_index and summary["fast"] == denoiser.fast_index
    assert summary["tile"] == 16 and summary["margin"] == denoiser.margin and summary["gate_mflops_per_pixel"] > 0
    assert summary["provenance"] == {"made_by": "tests"} and summary["gate_trained"] is False


def test_a_tile_that_the_network_cannot_use_is_refused_at_start(tiny_checkpoint):
    with pytest.raises(ValueError, match="multiple of 4"):
        Denoiser(load_checkpoint(tiny_checkpoint), tile=66)
    with pytest.raises(ValueError, match="positive multiple"):
        Denoiser(load_checkpoint(tiny_checkpoint), tile=0)


@pytest.fixture
def profiled(two_profile_checkpoint) -> Denoiser:
    return Denoiser(load_checkpoint(two_profile_checkpoint), tile=16)


def test_each_profile_runs_its_own_weights_and_best_and_fast_stay_within_it(profiled):
    assert profiled.profiles == ["white", "compressed"] and profiled.rows == {"white": [0, 1, 2],
                                                                              "compressed": [3, 4, 5]}
    noisy = noisy_image(32, 40)
    assert not torch.equal(profiled.run(noisy, 0)[0], profiled.run(noisy, 3)[0])
    whole = denoise_whole(profiled.nets["compressed"], noisy, profiled.subnets[3].widths).clamp(0, 1)
    assert (profiled.run(noisy, 3)[0] - whole).abs().max() < 1e-4
    for quality, expected in ((Quality.best, 3), (Quality.fast, 5)):
        chosen = profiled.select(noisy, quality, Noise.compressed)
        assert chosen == Selection(expected, 0, "compressed", "requested")  # no gate: nothing to decide


def test_the_gate_picks_the_profile_and_auto_takes_its_best_scored_width_within_it(profiled):
    noisy = noisy_image(48, 48)
    with torch.no_grad():
        logits = profiled.gate(noisy)[0]
    profile = profiled.subnets[int(logits.argmax())].profile
    rows = profiled.rows[profile]
    chosen = profiled.select(noisy, Quality.auto)
    assert chosen.profile == profile and chosen.profile_reason == "gate"
    assert chosen.index == rows[int(logits[rows].argmax())] and chosen.gate_macs > 0
    requested = profiled.select(noisy, Quality.auto, Noise.white)
    assert requested.index == [0, 1, 2][int(logits[:3].argmax())] and requested.profile_reason == "requested"
    best = profiled.select(noisy, Quality.best)  # the gate decides the profile, then the widest of it
    assert best.index == profiled.best_of(profile) and best.profile_reason == "gate"
    # ... from its profile head alone, which costs less than the whole gate
    assert best.gate_macs == gate_macs(profiled.gate.config, 48, 48, widths=False) < chosen.gate_macs


def test_the_profile_head_runs_no_convolution_and_its_linear_layers_are_counted(profiled):
    from torch.utils.flop_counter import FlopCounterMode

    config = profiled.gate.config
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        profiled.gate.profile_log_probs(noisy_image(48, 48))
    counted = counter.get_flop_counts()["Global"]
    assert torch.ops.aten.convolution not in counted  # the width layers are skipped
    linear = counter.get_total_flops() // 2  # MACs of the two linear layers, the only matrix products
    assert linear == NUM_STATS * config.hidden + config.hidden * config.num_profiles
    assert gate_macs(config, 48, 48, widths=False) == linear + STATS_MACS_PER_PIXEL * 48 * 48
    with pytest.raises(ValueError, match="no profile head"):
        gate_macs(GateConfig(num_subnets=2), 48, 48, widths=False)


def test_fast_and_best_decide_the_profile_from_the_profile_head_as_the_whole_gate_does(profiled):
    groups = [profiled.rows[name] for name in profiled.profiles]
    bias = profiled.gate.profile_fc2.bias
    seen = set()
    for shift in (-4.0, -1.0, 0.0, 1.0, 4.0):  # moves the head's choice from one profile to the other
        with torch.no_grad():
            bias[0] += shift
        for seed in range(4):
            noisy = noisy_image(40, 56, seed)
            with torch.no_grad():
                whole = profiled.subnets[int(choose(profiled.gate(noisy), groups)[0])].profile
            for quality, pick in ((Quality.fast, profiled.fast_of), (Quality.best, profiled.best_of)):
                chosen = profiled.select(noisy, quality)
                assert (chosen.profile, chosen.index) == (whole, pick(whole))
            seen.add(whole)
        with torch.no_grad():
            bias[0] -= shift
    assert seen == {"white", "compressed"}  # both came up, so the comparison covers each


def test_a_jpeg_header_sends_the_upload_to_the_compressed_profile(profiled):
    noisy = noisy_image(48, 48)
    chosen = profiled.select(noisy, Quality.fast, jpeg_quality=80)
    assert chosen == Selection(5, 0, "compressed", "jpeg_header")
    assert profiled.select(noisy, Quality.fast, jpeg_quality=100).profile_reason == "gate"
    assert profiled.select(noisy, Quality.fast, Noise.white, jpeg_quality=80).profile == "white"  # asked


def test_a_profile_the_checkpoint_lacks_is_refused_by_name(denoiser):
    with pytest.raises(ValueError, match="no compressed profile; its profiles are white"):
        denoiser.select(noisy_image(), Quality.auto, Noise.compressed)
