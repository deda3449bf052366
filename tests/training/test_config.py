"""Stage configs: overrides, unknown keys, and the committed configs."""

from __future__ import annotations

import numpy as np
import pytest

from training.config import (
    CONFIG_DIR,
    GateStage,
    ProfileStage,
    StaticStage,
    SupernetStage,
    TailorStage,
    apply_overrides,
    config_yaml,
    load_config,
)


def test_overrides_walk_dicts_and_parse_values():
    raw = apply_overrides({"data": {"sigma_max": 55}}, ["data.sigma_max=30", "steps=7", "model.channels=[8, 16]"])
    assert raw == {"data": {"sigma_max": 30}, "steps": 7, "model": {"channels": [8, 16]}}
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["nonsense"])
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(SupernetStage, None, ["stepz=3"])


def test_shipped_configs_load():
    supernet = load_config(SupernetStage, CONFIG_DIR / "supernet.yaml")
    assert supernet.steps > 0 and supernet.loss == "log_mse" and supernet.data.texture_candidates >= 1
    tailor_stage = load_config(TailorStage, CONFIG_DIR / "tailor.yaml")
    targets = tailor_stage.targets  # K >= 4 sub-networks: the widest, then one per target, descending
    assert len(targets) >= 3 and targets == sorted(targets, reverse=True) and 0 < targets[-1] < targets[0] < 1
    gate = load_config(GateStage, CONFIG_DIR / "gate.yaml")
    assert gate.delta_db == "auto" and 0 < gate.auto_max_drop_db <= 0.5 and len(gate.delta_sweep) >= 2
    assert 0 < gate.auto_max_flops_fraction <= 0.6  # the target: auto at <= 60% of best's FLOPs
    assert np.isfinite(gate.lr)
    assert tailor_stage.finetune_steps > 0 and tailor_stage.data.train_dir
    # Each stage reads the one before from the default out_dir of that stage.
    assert tailor_stage.supernet == f"{supernet.out_dir}/supernet.safetensors"
    assert gate.tailored == f"{tailor_stage.out_dir}/tailored.safetensors"


STAGE_FILES = {SupernetStage: "supernet", TailorStage: "tailor", ProfileStage: "profile", GateStage: "gate",
               StaticStage: "static"}


@pytest.mark.parametrize("stage", list(STAGE_FILES), ids=lambda stage: stage.__name__)
def test_each_stage_file_adds_nothing_to_the_dataclass_defaults(stage):
    """Every default is written once, in training/config.py: the stage's file loads to the same config."""
    assert load_config(stage, CONFIG_DIR / f"{STAGE_FILES[stage]}.yaml") == load_config(stage, None)


@pytest.mark.parametrize("stage", list(STAGE_FILES), ids=lambda stage: stage.__name__)
def test_printed_config_reads_back_to_the_same_config(stage, tmp_path):
    config = load_config(stage, None, ["data.sigma_max=40"])
    (tmp_path / "printed.yaml").write_text(config_yaml(config))
    assert load_config(stage, tmp_path / "printed.yaml") == config


def test_a_nested_section_changes_only_the_keys_it_names():
    gate = load_config(GateStage, None, ["data.val_crop=64"])
    assert gate.data.val_crop == 64 and gate.data.val_scales == [1.0, 0.5]  # the gate's own default stays
    profile = load_config(ProfileStage, None, ["data.degradations.jpeg_double=0"])
    assert profile.data.degradations.jpeg_double == 0 and profile.data.degradations.mix["jpeg"] > 0
    assert profile.data.val_scales == [1.0, 0.5]  # the profile's table covers the photos at served size
    assert load_config(SupernetStage, None).data.val_scales == [1.0]


def test_the_ship_rule_is_the_benchmarks_auto_target():
    from benchmarks import targets

    gate = load_config(GateStage, None)
    assert (gate.auto_max_drop_db, gate.auto_max_flops_fraction) == (targets.AUTO_MAX_DROP_DB,
                                                                     targets.AUTO_MAX_FLOPS_FRACTION)
