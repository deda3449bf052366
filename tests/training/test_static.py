"""The static baselines: one network per tailored shape, trained alone, tabled beside the shared weights."""

from __future__ import annotations

import json

import torch

from model.checkpoint import load_checkpoint
from training.common import psnr_by_sigma
from training.config import StaticStage, load_config
from training.data import validation_pairs
from training.static import train_static

from .conftest import read_log, tiny_data


def test_static_baselines_train_each_shape_alone_and_table_it_beside_the_shared_weights(three_stage_run, photo_dirs,
                                                                                        tmp_path):
    config = load_config(StaticStage, None, [
        f"tailored={three_stage_run.tailored}", f"out_dir={tmp_path}", "steps=2", "crop_schedule=[[0, 16, 2]]",
        "warmup_steps=1", "log_every=1", f"data={json.dumps(tiny_data(photo_dirs))}"])
    table = json.loads(train_static(config).read_text())
    source = load_checkpoint(three_stage_run.tailored)
    assert [row["widths"] for row in table] == [list(s.widths) for s in source.subnets]
    pairs = validation_pairs(config.data)
    for index, row in enumerate(table):
        static = load_checkpoint(tmp_path / f"static-{index}.safetensors")
        assert [list(s.widths) for s in static.subnets] == [row["widths"]]
        assert row["static_psnr"] == psnr_by_sigma(static.net, static.subnets[0].widths, pairs)
        assert row["shared_psnr"] == psnr_by_sigma(source.net, source.subnets[index].widths, pairs)
        # Trained from scratch: nothing of the shared weights is in it.
        assert not torch.equal(static.net.head.weight, source.net.head.weight)
    steps = [(r["static"], r["step"]) for r in read_log(tmp_path) if "static" in r and "loss" in r]
    assert steps == [(k, s) for k in range(len(table)) for s in (1, 2)]
