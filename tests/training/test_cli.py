"""The ``ddsnet-train`` command: its subcommands, resuming a stage, ``eval``, and errors as exit code 2."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

from tests.training.conftest import TINY_MODEL, tiny_data
from training.cli import main
from training.config import SupernetStage, load_config, save_config


def subcommands(help_text: str) -> list[str]:
    """The ``{a,b,c}`` choices of an argparse usage line."""
    return re.search(r"\{([\w,-]+)\}", help_text).group(1).split(",")


def test_help_lists_the_stages_the_pipeline_and_eval(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert subcommands(capsys.readouterr().out) == ["supernet", "tailor", "profile", "gate", "pipeline", "eval"]


def test_console_script_is_installed():
    executable = shutil.which("ddsnet-train") or str(Path(sys.executable).with_name("ddsnet-train"))
    result = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert subcommands(result.stdout) == ["supernet", "tailor", "profile", "gate", "pipeline", "eval"]


def test_resume_keeps_the_runs_own_config_unless_one_is_given(photo_dirs, tmp_path):
    run = tmp_path / "run"
    raw = {"out_dir": str(run), "model": TINY_MODEL, "data": tiny_data(photo_dirs), "steps": 4, "lr": 0.002,
           "crop_schedule": [[0, 16, 2], [0.5, 24, 2]], "warmup_steps": 1, "log_every": 1, "val_every": 2,
           "save_every": 100, "stop_at": 2}
    sets = [arg for key, value in raw.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    assert main(["supernet", *sets]) == 0
    # Only out_dir: the committed config (3,000 steps of a bigger model) must not replace the run's own.
    assert main(["supernet", "--resume", "--set", f"out_dir={run}", "--set", "steps=5"]) == 0
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if "loss_widest" in x]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["crop"] for r in records] == [16, 16, 16, 24, 24]  # the run's crop schedule, stretched to 5 steps
    assert max(r["lr"] for r in records) <= 0.002
    saved = load_config(SupernetStage, run / "config.yaml")
    assert saved.steps == 5 and saved.model == TINY_MODEL and saved.lr == 0.002
    # An explicit --config wins over the run's own file.
    edited = tmp_path / "edited.yaml"
    save_config(dataclasses.replace(saved, steps=6, lr=0.001), edited)
    assert main(["supernet", "--resume", "--config", str(edited)]) == 0
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if "loss_widest" in x]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and records[-1]["lr"] <= 0.001
    assert load_config(SupernetStage, run / "config.yaml").lr == 0.001


def test_errors_are_one_line_and_exit_code_2(capsys, tmp_path):
    assert main(["supernet", "--set", "stepz=3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: unknown config key(s) stepz"]
    assert main(["tailor", "--resume", "--set", f"out_dir={tmp_path / 'fresh'}"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: --resume: no ") and "fresh" in errors[0]


@pytest.fixture(scope="module")
def eval_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eval_images")
    Image.fromarray(data.astronaut()[:48, :64]).save(folder / "astronaut.png")
    Image.fromarray(data.coffee()[:40, :56]).save(folder / "coffee.png")
    return folder


def test_eval_writes_a_report_of_every_quality_and_sub_network(eval_images, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "report" / "eval.json"
    argv = ["eval", "--images", str(eval_images), "--sigma", "25", "--degradations", "jpeg80-awgn15",
            "--checkpoint", tiny_checkpoint, "--json", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()  # the plot, next to the JSON
    assert report["image_names"] == ["astronaut", "coffee"] and report["sigmas"] == [25.0]
    assert len(report["subnets"]) == 3 and {"widths", "mflops_per_pixel"} <= set(report["subnets"][0])
    results = report["results"]
    assert list(results) == ["25", "jpeg80-awgn15"]
    assert report["degradations"] == {"jpeg80-awgn15": ["jpeg", {"sigma": 15.0, "quality": 80}]}
    # The inputs: AWGN's RMS is its sigma, less what clipping to [0, 255] cuts off in the saturated parts of
    # these photos; JPEG removes part of the noise it compresses.
    assert 18 < results["25"]["noisy"]["noise_rms"] <= 25.5
    assert 5 < results["jpeg80-awgn15"]["noisy"]["noise_rms"] < 15
    assert set(results["jpeg80-awgn15"]) == set(results["25"])
    methods = {method: row for method, row in results["25"].items() if method != "noisy"}
    assert set(methods) == {"auto", "fast", "best", "subnet_0", "subnet_1", "subnet_2"}
    for method, row in methods.items():
        assert math.isfinite(row["psnr"]) and row["psnr"] > 0, method
        assert row["mflops_per_pixel"] > 0 and row["images_per_second"] > 0, method
    # best and fast are the widest and the slimmest of the table, run on the same noisy images.
    assert methods["best"]["psnr"] == methods["subnet_0"]["psnr"]
    assert methods["fast"]["psnr"] == methods["subnet_2"]["psnr"]
    assert methods["best"]["mflops_per_pixel"] > methods["subnet_1"]["mflops_per_pixel"] > \
        methods["fast"]["mflops_per_pixel"]
    # auto: the gate's picks, one per image, and their FLOPs plus the gate's own.
    histogram = methods["auto"]["subnet_histogram"]
    assert len(histogram) == 3 and sum(histogram) == 2
    picked = [k for k, count in enumerate(histogram) for _ in range(count)]
    assert methods["auto"]["mflops_per_pixel"] > min(methods[f"subnet_{k}"]["mflops_per_pixel"] for k in picked)


def test_eval_of_a_missing_image_folder_is_one_error_line_and_exit_code_2(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["eval", "--images", str(tmp_path / "nowhere"), "--sigma", "25", "--checkpoint", tiny_checkpoint,
                 "--json", str(out)])
    assert code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and "nowhere" in errors[0]
    assert not out.exists()
