"""``ddsnet-train pipeline``: the smoke profile runs every stage and the static baselines on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from model import load_checkpoint
from training.pipeline import overrides, read_profile


def test_profiles_name_only_known_sections_and_turn_into_leaf_overrides():
    gpu = read_profile("gpu")
    assert gpu["name"] == "gpu" and gpu["supernet"]["compute"] == {
        "device": "cuda", "amp": "bf16", "channels_last": True, "workers": 14}
    assert overrides({"compute": {"device": "cuda", "workers": 3}, "targets": [0.5, 0.25]}) == [
        "compute.device=cuda", "compute.workers=3", "targets=[0.5, 0.25]"]


def test_a_profile_with_an_unknown_section_is_refused(tmp_path):
    profile = tmp_path / "bad.yaml"
    profile.write_text("supernet: {steps: 1}\ntrainer: {}\n")
    with pytest.raises(ValueError, match="unknown section"):
        read_profile(str(profile))


def ddsnet_train(*arguments: str) -> subprocess.CompletedProcess:
    """``ddsnet-train`` in a process of its own: its DataLoader forks workers, which must not inherit the
    thread pools that other tests' inference runtimes (OpenVINO, ONNX Runtime) leave in this one."""
    return subprocess.run([sys.executable, "-m", "training", *arguments], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=600)


def test_the_smoke_profile_runs_every_stage_then_the_static_baselines(photo_dirs, tmp_path):
    out = tmp_path / "run"
    run = ddsnet_train("pipeline", "--profile", "smoke", "--photos", str(photo_dirs), "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    gated = out / "gate" / "ddsnet.safetensors"
    assert run.stdout.strip().endswith(f"wrote {gated}")
    checkpoint = load_checkpoint(gated)
    # The widest and the profile's 2 targets, in each of the white and the compressed profile.
    assert checkpoint.gate_trained and checkpoint.profiles == ["white", "compressed"]
    assert [s.profile for s in checkpoint.subnets] == ["white"] * 3 + ["compressed"] * 3
    assert [s.widths for s in checkpoint.subnets[:3]] == [s.widths for s in checkpoint.subnets[3:]]
    assert checkpoint.gate.config.noise_stats and checkpoint.gate.config.num_subnets == 6
    assert checkpoint.provenance["recipe"] == "smoke"
    stages = checkpoint.provenance["stages"]
    assert stages["supernet"]["config"]["compute"]["workers"] == 2
    # The fine-tune was stopped at step 3 of 4 and closed there: its table and checkpoint are written.
    assert stages["tailor"]["steps"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["seconds"]) == {"supernet", "tailor", "profile", "gate"}
    assert stages["profile"]["profile"] == "compressed" and stages["gate"]["profiles"] == ["white", "compressed"]
    assert {"25", "jpeg80-awgn15"} == set(summary["table"][0]["val_psnr"])

    run = ddsnet_train("pipeline", "--profile", "smoke", "--photos", str(photo_dirs), "--out", str(out), "--static")
    assert run.returncode == 0, run.stderr[-2000:]
    table = json.loads((out / "static" / "table.json").read_text())
    assert [row["widths"] for row in table] == [list(s.widths) for s in checkpoint.subnets[:3]]
    for index, row in enumerate(table):
        assert row["static_psnr"].keys() == row["shared_psnr"].keys() == {"25"}
        static = load_checkpoint(out / "static" / f"static-{index}.safetensors")
        assert [s.widths for s in static.subnets] == [checkpoint.subnets[index].widths]
