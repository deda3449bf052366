"""Stage configs: overrides, unknown keys, and the committed configs."""

from __future__ import annotations

import numpy as np
import pytest

from training.cli import CONFIG_DIR
from training.config import GateStage, SupernetStage, TailorStage, apply_overrides, load_config


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
