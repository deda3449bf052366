"""Stage 3: the online label rule, which gate of the sweep ships, settings refused before training, and a gate
over two profiles and its loss."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from model.checkpoint import Subnet, load_checkpoint
from model.supernet import SlimUNet, SupernetConfig
from training.config import GateStage, ProfileStage, load_config
from training.gate import Choices, choose_shipped, gate_loss, smallest_within, train_gate
from training.tailor import tailor


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


def test_the_label_rule_takes_the_best_profile_as_its_reference():
    # Two profiles of two widths each, costs [4, 1, 4, 1]: on the first sample the second profile is far better.
    psnrs = torch.tensor([[25.0, 24.9, 30.0, 29.95], [30.0, 29.9, 27.0, 26.0]])
    mflops = torch.tensor([4.0, 1.0, 4.0, 1.0])
    assert smallest_within(psnrs, mflops, 0.1, widest=[0, 2]).tolist() == [3, 1]
    assert smallest_within(psnrs, mflops, 0.01, widest=[0, 2]).tolist() == [2, 0]


@dataclass
class TwoProfileRun:
    data: str  # the stages' ``data`` override, JSON
    profile: Path  # the compressed profile stage's checkpoint
    gated: Path  # the gate over white and compressed
    out: Path


def _gate_two_profiles(tailored, profile, out_dir, data: str, name: str = "compressed") -> Path:
    return train_gate(load_config(GateStage, None, [
        f"tailored={tailored}", f"profiles.{name}={profile}", f"out_dir={out_dir}",
        "steps=3", "batch_size=2", "crop=16", "regret_weight=0.5", "replay=2", "gate.noise_stats=true",
        "save_dtype=float16", "val_crop=24", f"data={data}", "data.degradations.mix={awgn: 1.0, jpeg: 1.0}"]))


@pytest.fixture(scope="module")
def two_profile_run(three_stage_run, photo_dirs, tmp_path_factory) -> TwoProfileRun:
    """A compressed profile fine-tuned from the tiny tailored checkpoint, and a gate over both profiles."""
    out = tmp_path_factory.mktemp("two_profiles")
    data = json.dumps({"train_dir": str(photo_dirs / "train"), "val_dir": str(photo_dirs / "val"), "val_crop": 32,
                       "val_sigmas": [25], "val_degradations": ["jpeg30-awgn10"], "val_scales": [1.0]})
    profile = tailor(load_config(ProfileStage, None, [
        f"supernet={three_stage_run.tailored}", f"out_dir={out / 'compressed'}", "finetune_steps=2",
        "finetune_crop=16", "finetune_batch=2", f"data={data}", "data.degradations.mix={jpeg: 1.0}"]))
    gated = _gate_two_profiles(three_stage_run.tailored, profile, out / "gate", data)
    return TwoProfileRun(data, profile, gated, out)


def test_the_gate_stage_gates_between_two_profiles_and_reports_the_profile_choice(two_profile_run):
    profile_checkpoint = load_checkpoint(two_profile_run.profile)
    assert [s.profile for s in profile_checkpoint.subnets] == ["compressed"] * 4
    assert profile_checkpoint.provenance["stages"]["profile"]["profile"] == "compressed"
    checkpoint = load_checkpoint(two_profile_run.gated)
    assert checkpoint.profiles == ["white", "compressed"] and checkpoint.gate.config.num_subnets == 8
    assert torch.equal(checkpoint.nets["compressed"].head.weight,
                       profile_checkpoint.net.head.weight.half().float())  # stored in float16
    report = json.loads((two_profile_run.gated.parent / "report.json").read_text())
    shipped = report["shipped"]
    assert report["rounding_loss_db"] >= 0 and shipped["profiles"] == ["white", "compressed"]
    assert sum(map(sum, shipped["profile_confusion_right_by_pick"])) == 2  # one photo, two noises
    assert set(shipped["by_sigma"]) == {"25", "jpeg30-awgn10"}
    assert all("profile_accuracy" in row for row in shipped["by_sigma"].values())


def test_a_gated_checkpoints_profile_is_continued_and_replaced_in_a_new_gate(two_profile_run):
    run = two_profile_run
    gated = load_checkpoint(run.gated)
    # A profile stage on the gated checkpoint starts from the profile it names and keeps only that one's rows.
    again = tailor(load_config(ProfileStage, None, [
        f"supernet={run.gated}", "source_profile=compressed", f"out_dir={run.out / 'compressed2'}",
        "finetune_steps=0", f"data={run.data}"]))
    continued = load_checkpoint(again)
    assert [s.profile for s in continued.subnets] == ["compressed"] * 4
    assert [s.widths for s in continued.subnets] == [s.widths for s in gated.subnets if s.profile == "compressed"]
    assert torch.equal(continued.net.head.weight, gated.nets["compressed"].head.weight)
    assert not torch.equal(continued.net.head.weight, gated.nets["white"].head.weight)
    # Without source_profile it starts from the first profile, and still keeps one profile's rows.
    white = load_checkpoint(tailor(load_config(ProfileStage, None, [
        f"supernet={run.gated}", f"out_dir={run.out / 'from-white'}", "finetune_steps=0", f"data={run.data}"])))
    assert len(white.subnets) == 4 and torch.equal(white.net.head.weight, gated.nets["white"].head.weight)
    with pytest.raises(ValueError, match="source_profile"):
        tailor(load_config(ProfileStage, None, [
            f"supernet={run.gated}", "source_profile=sharp", f"out_dir={run.out / 'none'}", "finetune_steps=0",
            f"data={run.data}"]))
    # The gate over the gated checkpoint replaces its compressed profile with the one given.
    regated = load_checkpoint(_gate_two_profiles(run.gated, again, run.out / "gate2", run.data))
    assert regated.profiles == ["white", "compressed"] and len(regated.subnets) == 8
    assert [s.profile for s in regated.subnets] == ["white"] * 4 + ["compressed"] * 4
    assert torch.equal(regated.nets["white"].head.weight, gated.nets["white"].head.weight)
    assert torch.equal(regated.nets["compressed"].head.weight, continued.net.head.weight.half().float())
    stages = regated.provenance["stages"]
    assert list(stages) == ["supernet", "tailor", "profile", "gate"]
    assert stages["profile"] == continued.provenance["stages"]["profile"]  # how the new compressed weights came
    assert stages["gate"]["source_tensors_sha256"] == gated.tensors_sha256
    assert stages["gate"]["profile_sources_tensors_sha256"] == {"compressed": continued.tensors_sha256}
    # The first profile is re-made the same way (a tailor stage) and replaced in place: it keeps its place in
    # the table, and the provenance keeps the compressed profile's record beside the new white one's.
    rewhite_profile = load_checkpoint(tailor(load_config(ProfileStage, None, [
        f"supernet={run.gated}", "source_profile=white", "profile=white", f"out_dir={run.out / 'white2'}",
        "finetune_steps=0", f"data={run.data}"])))
    rewhite = load_checkpoint(_gate_two_profiles(run.gated, run.out / "white2" / "tailored.safetensors",
                                                 run.out / "gate3", run.data, name="white"))
    assert rewhite.profiles == ["white", "compressed"]
    assert [s.profile for s in rewhite.subnets] == ["white"] * 4 + ["compressed"] * 4
    assert torch.equal(rewhite.nets["white"].head.weight, rewhite_profile.net.head.weight.half().float())
    assert torch.equal(rewhite.nets["compressed"].head.weight, gated.nets["compressed"].head.weight)
    stages = rewhite.provenance["stages"]
    assert list(stages) == ["supernet", "tailor", "profile", "gate"]
    assert stages["tailor"] == rewhite_profile.provenance["stages"]["tailor"]
    assert stages["profile"] == gated.provenance["stages"]["profile"]


def _two_profile_choices() -> Choices:
    """Two profiles of two widths each (costs 4 and 1), their supernets tiny; only the table matters here."""
    net = SlimUNet(SupernetConfig(channels=(8, 16), enc_blocks=(1,), dec_blocks=(1,)))
    subnets = [Subnet(net.widest(), mflops, {}, profile)
               for profile in ("white", "compressed") for mflops in (4.0, 1.0)]
    return Choices({"white": net, "compressed": net}, subnets)


def test_with_two_profiles_the_loss_trains_the_profile_by_its_stakes_and_the_width_within_it():
    choices = _two_profile_choices()
    # Sample 0: the compressed profile is 5 dB better and its slim width is within 0.1 dB of its widest.
    # Sample 1: white is better by 0.2 dB, and its slim width loses 1 dB.
    psnrs = torch.tensor([[25.0, 24.9, 30.0, 29.95], [30.0, 29.0, 29.8, 29.7]])
    config = GateStage()
    _, labels = gate_loss(torch.zeros(2, 4, requires_grad=True), psnrs, choices, 0.1, config)
    assert labels.tolist() == [3, 0]  # each label within the profile whose widest does best
    # A gate sure of the wrong profile on the sample with 5 dB at stake loses more than one sure of the
    # wrong profile on the sample with 0.2 dB at stake.
    wrong_on_first = torch.tensor([[9.0, 0, 0, 0], [9.0, 0, 0, 0]])
    wrong_on_second = torch.tensor([[0, 0, 0, 9.0], [0, 0, 0, 9.0]])
    assert gate_loss(wrong_on_first, psnrs, choices, 0.1, config)[0] > gate_loss(wrong_on_second, psnrs, choices,
                                                                                 0.1, config)[0]
