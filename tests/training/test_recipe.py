"""The shipped checkpoint's recipe: every step chains to an earlier one, and every override is a real key."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import GateStage, ProfileStage, SupernetStage, TailorStage, load_config

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "training" / "recipes" / "ddsnet-color.sh"
STAGES = {"supernet": SupernetStage, "tailor": TailorStage, "profile": ProfileStage, "gate": GateStage}
OUTPUTS = {"supernet": "supernet.safetensors", "tailor": "tailored.safetensors", "profile": "tailored.safetensors",
           "gate": "ddsnet.safetensors"}

# Stands in for ddsnet-train: records its arguments and writes the file the stage would write.
RECORDER = f"""#!{sys.executable}
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["CALLS"], "a") as calls:
    calls.write(json.dumps(args) + "\\n")
sets = dict(value.split("=", 1) for flag, value in zip(args, args[1:]) if flag == "--set")
out = Path(sets["out_dir"])
out.mkdir(parents=True, exist_ok=True)
(out / {OUTPUTS!r}[args[0]]).write_text("weights")
"""


def run_recipe(tmp_path: Path, photos: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DDSNET_TRAIN": str(tmp_path / "recorder"), "CALLS": str(tmp_path / "calls")}
    return subprocess.run(["bash", str(RECIPE), str(tmp_path / "run"), str(photos), str(photos), str(photos)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def recorder(tmp_path):
    path = tmp_path / "recorder"
    path.write_text(RECORDER)
    path.chmod(0o755)
    return path


def test_every_step_reads_an_earlier_steps_output_and_every_override_is_a_config_key(tmp_path, recorder):
    photos = tmp_path / "photos"
    photos.mkdir()
    result = run_recipe(tmp_path, photos)
    assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in (tmp_path / "calls").read_text().splitlines()]
    written: set[str] = set()
    for args in calls:
        stage, overrides = args[0], [value for flag, value in zip(args, args[1:]) if flag == "--set"]
        # The committed config with the step's overrides builds: no unknown key, no malformed value.
        load_config(STAGES[stage], ROOT / "training" / "configs" / f"{stage}.yaml", overrides)
        sets = dict(value.split("=", 1) for value in overrides)
        source = sets.get("init_from") or sets.get("supernet") or sets.get("tailored")
        for name, path in sets.items():
            if name.startswith("profiles."):
                assert path in written, f"{stage} gates the profile {path}, which no earlier step wrote"
        if "--resume" in args:
            assert sets["out_dir"] in {str(Path(path).parent) for path in written}
        elif source:
            assert source in written, f"{stage} reads {source}, which no earlier step wrote"
        if "--resume" not in args:
            assert sets["recipe"] == "ddsnet-color" and sets["data.train_dir"] == str(photos)
        written.add(str(Path(sets["out_dir"]) / OUTPUTS[stage]))
    assert [args[0] for args in calls].count("supernet") == 10  # 9 runs, one of them resumed once
    assert [args[0] for args in calls].count("tailor") == 20  # 19 runs, one of them resumed once
    assert [args[0] for args in calls].count("gate") == 6
    assert [args[0] for args in calls].count("profile") == 4
    final = f"{tmp_path / 'run'}/profile3-gate/ddsnet.safetensors"
    assert calls[-1][0] == "gate" and result.stdout.strip().endswith(final)

    # Run again: every step is done, nothing is trained twice.
    (tmp_path / "calls").unlink()
    again = run_recipe(tmp_path, photos)
    assert again.returncode == 0 and not (tmp_path / "calls").exists()


def test_a_missing_photo_folder_is_refused_before_any_step(tmp_path, recorder):
    result = run_recipe(tmp_path, tmp_path / "nowhere")
    assert result.returncode == 2 and "photo folder not found" in result.stderr
    assert not (tmp_path / "calls").exists()
