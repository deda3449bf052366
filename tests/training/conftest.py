"""Shared pieces of the training tests: a tiny model, a few small photos, and tiny runs of the stages."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

from training.config import GateStage, SupernetStage, TailorStage, load_config
from training.gate import train_gate
from training.supernet import train_supernet
from training.tailor import tailor

TINY_MODEL = {"channels": [8, 16, 32], "enc_blocks": [1, 1], "body_blocks": 1, "dec_blocks": [1, 1],
              "steps_per_width": 4, "min_steps": 1}
RECIPE = "tiny-recipe"


@pytest.fixture(scope="session")
def photo_dirs(tmp_path_factory) -> Path:
    """``train/`` with two small photos and ``val/`` with one."""
    root = tmp_path_factory.mktemp("photos")
    (root / "train").mkdir()
    (root / "val").mkdir()
    Image.fromarray(data.astronaut()[::4, ::4]).save(root / "train" / "astronaut.png")
    Image.fromarray(data.coffee()[::4, ::4]).save(root / "train" / "coffee.png")
    Image.fromarray(data.chelsea()[::4, ::4]).save(root / "val" / "chelsea.png")
    return root


def tiny_data(photo_dirs: Path) -> dict:
    return {"train_dir": str(photo_dirs / "train"), "val_dir": str(photo_dirs / "val"), "val_crop": 32}


def supernet_config(photo_dirs: Path, out_dir: Path, **extra) -> SupernetStage:
    """A 4-step stage-1 run of :data:`TINY_MODEL` on :func:`photo_dirs`; ``extra`` overrides any key."""
    raw = {"out_dir": str(out_dir), "model": TINY_MODEL, "data": tiny_data(photo_dirs), "steps": 4,
           "crop_schedule": [[0, 16, 2], [0.5, 24, 2]], "warmup_steps": 1, "log_every": 1, "val_every": 2,
           "save_every": 100, **extra}
    return load_config(SupernetStage, None, [f"{k}={json.dumps(v)}" for k, v in raw.items()])


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def strings_in(node) -> list[str]:
    """Every string in a JSON-like document, keys included."""
    if isinstance(node, dict):
        return [*node, *(text for value in node.values() for text in strings_in(value))]
    if isinstance(node, list):
        return [text for value in node for text in strings_in(value)]
    return [node] if isinstance(node, str) else []


@pytest.fixture(scope="session")
def supernet(photo_dirs, tmp_path_factory) -> Path:
    """A tiny stage-1 checkpoint, shared read-only by the tests that start from one."""
    return train_supernet(supernet_config(photo_dirs, tmp_path_factory.mktemp("supernet")))


@dataclass(frozen=True)
class ThreeStageRun:
    root: Path
    supernet: Path
    tailored: Path
    gated: Path


@pytest.fixture(scope="session")
def three_stage_run(photo_dirs, tmp_path_factory) -> ThreeStageRun:
    """Supernet, tailor (K = 4) and gate on the tiny photos, each stage in its own out_dir under ``root``.

    Only the supernet stage names the recipe (:data:`RECIPE`); the later stages carry it over.
    """
    root = tmp_path_factory.mktemp("three_stages")
    supernet_path = train_supernet(supernet_config(photo_dirs, root / "supernet", recipe=RECIPE))
    tailored = tailor(load_config(TailorStage, None, [
        f"supernet={supernet_path}", f"out_dir={root / 'tailor'}", "search_crop=32", "targets=[0.7, 0.45, 0.25]",
        "finetune_steps=0", f"data={json.dumps(tiny_data(photo_dirs))}"]))
    gate_data = {**tiny_data(photo_dirs), "val_scales": [1.0, 0.5]}
    gated = train_gate(load_config(GateStage, None, [
        f"tailored={tailored}", f"out_dir={root / 'gate'}", "steps=2", "batch_size=2", "crop=16", "log_every=1",
        f"data={json.dumps(gate_data)}"]))
    return ThreeStageRun(root, supernet_path, tailored, gated)
