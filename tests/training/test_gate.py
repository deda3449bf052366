"""Stage 3: the online label rule, which gate of the sweep ships, and settings refused before training."""

from __future__ import annotations

import pytest
import torch

from training.config import GateStage, load_config
from training.gate import choose_shipped, smallest_within, train_gate


def test_label_rule_on_hand_made_psnrs():
    mflops = torch.tensor([0.4, 0.28, 0.18, 0.1])  # widest first
    psnrs = torch.tensor([
        [30.00, 29.99, 29.95, 29.00],  # delta 0.1: index 2 (29.95 >= 29.9)
        [30.00, 29.50, 29.40, 29.95],  # the slimmest is within delta: 3
        [30.00, 29.80, 29.70, 29.00],  # nothing but the widest: 0
        [30.00, 30.20, 29.00, 28.00],  # a slimmer one beats the widest: 1
    ])
    assert smallest_within(psnrs, mflops, 0.1).tolist() == [2, 3, 0, 1]
    assert smallest_within(psnrs, mflops, 0.0).tolist() == [0, 0, 0, 1]
    assert smallest_within(psnrs, mflops, 5.0).tolist() == [3, 3, 3, 3]


def test_auto_delta_ships_the_cheapest_gate_within_the_drop_on_validation():
    def row(delta, auto_psnr, auto_mflops):
        return {"delta_db": delta, "auto_psnr": auto_psnr, "auto_mflops_per_pixel": auto_mflops, "best_psnr": 30.0}

    sweep = [row(0.0, 30.00, 0.40), row(0.1, 29.97, 0.30), row(0.2, 29.96, 0.25), row(0.5, 29.80, 0.12)]
    assert choose_shipped(sweep, "auto", 0.05)["delta_db"] == 0.2
    assert choose_shipped(sweep, "auto", 0.5)["delta_db"] == 0.5
    assert choose_shipped(sweep, 0.1, 0.05)["delta_db"] == 0.1
    # Nothing within the drop: the highest PSNR ships.
    assert choose_shipped([row(0.1, 29.5, 0.3), row(0.2, 29.7, 0.2)], "auto", 0.05)["delta_db"] == 0.2


def test_auto_delta_keeps_to_the_flops_budget():
    def row(delta, auto_psnr, auto_mflops):
        return {"delta_db": delta, "auto_psnr": auto_psnr, "auto_mflops_per_pixel": auto_mflops,
                "best_psnr": 30.0, "best_mflops_per_pixel": 0.40}

    # A sweep where only the gates that pick the widest stay within 0.05 dB of it.
    sweep = [row(0.0, 30.00, 0.401), row(0.1, 29.946, 0.275), row(0.15, 29.946, 0.233), row(0.2, 29.937, 0.226),
             row(0.5, 29.85, 0.165)]
    assert choose_shipped(sweep, "auto", 0.05)["delta_db"] == 0.0  # no budget: auto falls back to best
    assert choose_shipped(sweep, "auto", 0.05, 0.6)["delta_db"] == 0.15  # the budget's highest PSNR, then FLOPs
    assert choose_shipped(sweep, "auto", 0.1, 0.6)["delta_db"] == 0.2  # within both: the cheapest
    assert choose_shipped(sweep, "auto", 0.05, 0.45)["delta_db"] == 0.5
    # A budget nothing meets: the rule without one (here δ = 0, the only gate within the drop).
    assert choose_shipped(sweep, "auto", 0.05, 0.1)["delta_db"] == 0.0


@pytest.mark.parametrize(("overrides", "message"), [
    (["delta_db=sometimes"], "delta_db"),
    (["delta_db=auto", "delta_sweep=[]"], "delta_sweep"),
    (["auto_max_flops_fraction=60"], "auto_max_flops_fraction"),
])
def test_gate_settings_out_of_range_are_refused_before_anything_is_written(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train_gate(load_config(GateStage, None, [*overrides, f"out_dir={tmp_path / 'gate'}"]))
    assert not (tmp_path / "gate").exists()
