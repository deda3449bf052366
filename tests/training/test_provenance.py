"""A checkpoint's provenance: data digests, records without paths, one record per stage, and resaving it."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from model import load_checkpoint
from model.checkpoint import read_metadata
from tests.training.conftest import RECIPE, strings_in
from training.config import GateStage, SupernetStage, TailorStage
from training.provenance import (
    PATH_KEYS,
    STAGES,
    config_without_paths,
    data_digest,
    provenance,
    resave_with_provenance,
    stage_record,
)


def all_keys(node) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {key for value in node.values() for key in all_keys(value)}
    if isinstance(node, list):
        return {key for value in node for key in all_keys(value)}
    return set()


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(data.astronaut()[:32, :32]).save(folder / "a.png")
    Image.fromarray(data.coffee()[:32, :32]).save(folder / "b.png")
    return folder


def test_data_digest_follows_names_and_bytes_not_where_the_folder_is(photos, tmp_path):
    digest = data_digest(photos)
    assert len(digest) == 64
    assert data_digest(shutil.copytree(photos, tmp_path / "elsewhere" / "copy")) == digest
    moved = photos.rename(tmp_path / "moved")
    assert data_digest(moved) == digest
    (moved / "notes.txt").write_text("not an image")  # only images are read, so only images count
    assert data_digest(moved) == digest

    pixels = data.coffee()[:32, :32].copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(moved / "b.png")
    changed = data_digest(moved)
    assert changed != digest
    (moved / "b.png").rename(moved / "c.png")
    assert data_digest(moved) not in (digest, changed)


def test_config_without_paths_drops_every_path_key_at_any_depth():
    raw = {"out_dir": "/runs/x", "steps": 3,
           "data": {"train_dir": "/photos/train", "val_dir": "/photos/val", "sigma_max": 55},
           "history": [{"init_from": "/old.safetensors", "lr": 0.1}, [{"supernet": "/s"}]],
           "deep": {"deeper": {"tailored": "/t", "keep": "yes"}}}
    before = copy.deepcopy(raw)
    assert config_without_paths(raw) == {"steps": 3, "data": {"sigma_max": 55}, "history": [{"lr": 0.1}, [{}]],
                                         "deep": {"deeper": {"keep": "yes"}}}
    assert raw == before  # the config itself is left alone


@pytest.mark.parametrize("stage_config", [SupernetStage, TailorStage, GateStage])
def test_stage_configs_lose_their_paths_and_keep_everything_else(stage_config):
    config = stage_config()
    kept = config_without_paths(config)
    assert not all_keys(kept) & PATH_KEYS
    full = dataclasses.asdict(config)
    assert set(kept) == set(full) - PATH_KEYS
    assert set(kept["data"]) == set(full["data"]) - PATH_KEYS
    # Every default that names a file or folder is one of the dropped keys.
    assert not [text for text in strings_in(kept) if "/" in text]


def test_stage_record_holds_the_config_without_paths_the_run_and_its_data():
    config = TailorStage(out_dir="/runs/tailor", supernet="/runs/s.safetensors")
    digests = {"train_sha256": "1" * 64, "val_sha256": "2" * 64}
    record = stage_record(config, steps=7, seconds=12.345, data=digests, configurations="search", resumes=0)
    assert record == {"config": config_without_paths(config), "steps": 7, "seconds": 12.3, **digests,
                      "configurations": "search", "resumes": 0}
    with_source = stage_record(config, steps=7, seconds=1, data=digests, source_sha256="3" * 64)
    assert with_source["source_tensors_sha256"] == "3" * 64


def test_provenance_keeps_earlier_stages_and_drops_later_ones():
    records = {stage: {"steps": index} for index, stage in enumerate(STAGES)}
    first = provenance(None, "supernet", records["supernet"], "colour")
    assert first["recipe"] == "colour" and first["stages"] == {"supernet": records["supernet"]}
    assert set(first["versions"]) == {"ddsnet", "torch", "python"}
    tailored = provenance(first, "tailor", records["tailor"])
    assert tailored["recipe"] == "colour"  # carried over from the stage it started from
    gated = provenance(tailored, "gate", records["gate"])
    assert list(gated["stages"]) == ["supernet", "tailor", "gate"] and gated["recipe"] == "colour"
    snapshot = copy.deepcopy(gated)

    retailored = provenance(gated, "tailor", {"steps": 9})
    assert retailored["stages"] == {"supernet": records["supernet"], "tailor": {"steps": 9}}
    regated = provenance(gated, "gate", {"steps": 5}, "grey")
    assert regated["stages"]["gate"] == {"steps": 5} and regated["recipe"] == "grey"
    # A supernet trained again invalidates everything after it, the recipe included unless it names one.
    retrained = provenance(gated, "supernet", {"steps": 1})
    assert retrained["stages"] == {"supernet": {"steps": 1}} and retrained["recipe"] == ""
    assert gated == snapshot  # the provenance started from is left alone

    nested = {"stage": "supernet", "tailor": {"command": "ddsnet train tailor", "previous": {}}}
    assert provenance(nested, "gate", records["gate"])["stages"] == {"gate": records["gate"]}
    with pytest.raises(ValueError, match="unknown stage"):
        provenance(None, "finetune", {})


def test_gated_checkpoint_has_one_record_per_stage_the_recipe_and_no_local_path(three_stage_run, photo_dirs,
                                                                                tmp_path_factory):
    document = read_metadata(three_stage_run.gated)
    recorded = document["provenance"]
    assert set(recorded) == {"recipe", "versions", "stages"}
    assert recorded["recipe"] == RECIPE
    stages = recorded["stages"]
    assert list(stages) == ["supernet", "tailor", "gate"]
    common = {"config", "steps", "seconds", "train_sha256", "val_sha256"}
    assert set(stages["supernet"]) == common
    # This tailor run has no fine-tune, so it reads no training photos and records no digest of them.
    assert stages["tailor"]["config"]["finetune_steps"] == 0
    assert set(stages["tailor"]) == common - {"train_sha256"} | {"source_tensors_sha256", "configurations", "resumes"}
    assert set(stages["gate"]) == common | {"source_tensors_sha256", "delta_db", "val_accuracy", "profiles"}
    assert stages["gate"]["profiles"] == ["white"]
    # Each stage names the weights it started from by their digest, and the photos by theirs.
    assert stages["tailor"]["source_tensors_sha256"] == read_metadata(three_stage_run.supernet)["tensors_sha256"]
    assert stages["gate"]["source_tensors_sha256"] == read_metadata(three_stage_run.tailored)["tensors_sha256"]
    for record in stages.values():
        assert record.get("train_sha256", data_digest(photo_dirs / "train")) == data_digest(photo_dirs / "train")
        assert record["val_sha256"] == data_digest(photo_dirs / "val")
    assert stages["supernet"]["steps"] == 4 and stages["gate"]["steps"] == 2
    assert stages["tailor"]["configurations"] == "search" and stages["tailor"]["resumes"] == 0
    # The earlier stages' records are carried over unchanged.
    assert stages["supernet"] == read_metadata(three_stage_run.supernet)["provenance"]["stages"]["supernet"]
    assert stages["tailor"] == read_metadata(three_stage_run.tailored)["provenance"]["stages"]["tailor"]
    basetemp = str(tmp_path_factory.getbasetemp())  # holds the photos and every run's out_dir
    assert not [text for text in strings_in(document) if basetemp in text]


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (without ``__metadata__``) and its data buffer, as stored."""
    raw = path.read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_size])
    header.pop("__metadata__", None)
    return header, raw[8 + header_size :]


@pytest.mark.parametrize("in_place", [False, True])
def test_resave_with_provenance_rewrites_only_the_provenance(tiny_checkpoint, tmp_path, in_place):
    source = Path(shutil.copy(tiny_checkpoint, tmp_path / "source.safetensors"))
    original_header, original_data = safetensors_parts(source)
    original = read_metadata(source)
    target = source if in_place else tmp_path / "target.safetensors"
    new = {"recipe": "tiny", "versions": {"ddsnet": "0"}, "stages": {"supernet": {"steps": 1}}}

    resave_with_provenance(source, target, new)
    header, tensor_bytes = safetensors_parts(target)
    assert header == original_header and tensor_bytes == original_data  # same tensors, same bytes
    document = read_metadata(target)
    assert document["tensors_sha256"] == original["tensors_sha256"]
    assert {**document, "provenance": None} == {**original, "provenance": None}
    checkpoint = load_checkpoint(target)  # checks the tensors against the recorded digest
    assert checkpoint.provenance == new
    reference = load_checkpoint(tiny_checkpoint)
    for name, tensor in reference.net.state_dict().items():
        assert np.array_equal(tensor.numpy(), checkpoint.net.state_dict()[name].numpy()), name
    assert not list(tmp_path.glob("*.partial"))
