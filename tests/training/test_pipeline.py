"""The three training stages in a row give a gated checkpoint that the ``ddsnet`` CLI serves."""

from __future__ import annotations

import json

from PIL import Image

from model import load_checkpoint
from service.cli import main
from tests.training.conftest import read_log


def test_supernet_stage_logs_every_step_and_validates(three_stage_run):
    run = three_stage_run.supernet.parent
    assert three_stage_run.supernet == run / "supernet.safetensors"
    assert (run / "config.yaml").is_file()
    records = read_log(run)
    assert [r["step"] for r in records if "loss_widest" in r] == [1, 2, 3, 4]
    assert any("val_psnr_widest" in r for r in records)


def test_tailor_stage_tables_k_sub_networks_under_their_flops_targets(three_stage_run):
    table = json.loads((three_stage_run.tailored.parent / "table.json").read_text())
    assert len(table) == 4
    flops = [row["mflops_per_pixel"] for row in table]
    assert flops == sorted(flops, reverse=True)
    assert flops[1] <= 0.7 * flops[0] and flops[3] <= 0.25 * flops[0]
    assert set(table[0]["val_psnr"]) == {"15", "25", "50"}
    assert [list(s.widths) for s in load_checkpoint(three_stage_run.tailored).subnets] == \
        [row["widths"] for row in table]


def test_gate_stage_writes_the_gated_checkpoint_and_its_report_in_its_out_dir(three_stage_run):
    out_dir = three_stage_run.root / "gate"
    assert three_stage_run.gated == out_dir / "ddsnet.safetensors"
    assert {"ddsnet.safetensors", "config.yaml", "log.jsonl", "report.json"} <= {p.name for p in out_dir.iterdir()}
    checkpoint = load_checkpoint(three_stage_run.gated)
    assert checkpoint.gate_trained and len(checkpoint.subnets) == 4
    assert set(checkpoint.provenance["stages"]) == {"supernet", "tailor", "gate"}
    report = json.loads((out_dir / "report.json").read_text())
    assert {"accuracy", "confusion_matrix_label_by_pick", "auto_psnr", "best_psnr"} <= set(report["shipped"])
    assert len(report["delta_sweep"]) >= 2
    assert set(report["shipped"]["by_scale"]) == {"1", "0.5"}
    assert set(report["shipped"]["by_sigma"]) == {"15", "25", "50"}
    assert checkpoint.provenance["stages"]["gate"]["delta_db"] == report["shipped"]["delta_db"]


def test_the_ddsnet_cli_serves_the_gated_checkpoint(three_stage_run, photo_dirs, tmp_path, capsys):
    final = str(three_stage_run.gated)
    assert main(["info", "--checkpoint", final, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["subnets"]) == 4
    source = photo_dirs / "val" / "chelsea.png"
    assert main(["denoise", str(source), "-o", str(tmp_path / "out.png"), "--checkpoint", final]) == 0
    with Image.open(tmp_path / "out.png") as result, Image.open(source) as original:
        assert result.size == original.size
