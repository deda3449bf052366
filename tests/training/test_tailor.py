"""Stage 2: the greedy search and refill, the fine-tune, given configurations, and resuming the fine-tune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model import load_checkpoint
from model.checkpoint import read_metadata
from model.flops import supernet_mflops_per_pixel
from model.supernet import WidthGroup
from tests.training.conftest import read_log, strings_in, tiny_data
from training.cli import main as train_main
from training.common import psnr_by_sigma
from training.config import TailorStage, load_config
from training.data import validation_pairs
from training.tailor import greedy_refill, greedy_tailor, tailor


def test_tailoring_cuts_the_group_whose_cut_costs_least():
    groups = tuple(WidthGroup(name, 8, 2, 2) for name in ("a", "b", "c"))
    # Cutting "b" costs 0.01 dB per step, "a" 0.5 dB and "c" 1 dB; every step of any group is equal in FLOPs.
    penalty = {0: 0.5, 1: 0.01, 2: 1.0}

    def score(widths):
        return 40.0 - sum(penalty[i] * (8 - w) / 2 for i, w in enumerate(widths))

    cuts = []
    configs = greedy_tailor(groups, (8, 8, 8), score, lambda w: float(sum(w)), [0.95],
                            on_cut=lambda record: cuts.append(record))
    assert cuts[0]["widths"] == [8, 6, 8]
    assert configs == [(8, 8, 8), (8, 6, 8)]
    configs = greedy_tailor(groups, (8, 8, 8), score, lambda w: float(sum(w)), [0.75, 0.5])
    # "b" goes to its minimum (2) first, then "a" (the next cheapest); "c" is never cut
    assert configs == [(8, 8, 8), (8, 2, 8), (2, 2, 8)]


def test_refill_widens_the_group_that_gains_most_within_the_flops_and_the_configuration_before():
    groups = tuple(WidthGroup(name, 8, 2, 2) for name in ("a", "b", "c"))
    # Widening "c" gains 1 dB per step, "a" 0.5 and "b" 0.01; every step costs the same FLOPs.
    gain = {0: 0.5, 1: 0.01, 2: 1.0}

    def score(widths):
        return 30.0 + sum(gain[i] * w / 2 for i, w in enumerate(widths))

    def cost(widths):
        return float(sum(widths))

    steps = []
    # Room for two steps (12 -> 16): "c" first, up to the ceiling's 6, then "a".
    assert greedy_refill(groups, (4, 4, 4), (8, 8, 6), score, cost, 16.0, steps.append) == (6, 4, 6)
    assert [s["refill_group"] for s in steps] == ["c", "a"]
    assert steps[-1]["cost"] == 16.0
    # No room: unchanged.
    assert greedy_refill(groups, (4, 4, 4), (8, 8, 8), score, cost, 13.0) == (4, 4, 4)
    # A widening that lowers the score is not kept, however much room is left.
    assert greedy_refill(groups[:1], (2,), (8,), lambda w: -abs(w[0] - 4), lambda w: float(w[0]), 99.0) == (4,)


def test_tailoring_per_flop_criterion_prefers_the_cut_that_saves_more():
    groups = (WidthGroup("big", 8, 2, 2), WidthGroup("small", 8, 2, 2))
    # Cutting "big" saves 10x the FLOPs for 2x the PSNR loss.
    def cost(widths):
        return 10.0 * widths[0] + widths[1]

    def score(widths):
        return 40.0 - 0.2 * (8 - widths[0]) - 0.1 * (8 - widths[1])

    assert greedy_tailor(groups, (8, 8), score, cost, [0.99])[1] == (8, 6)
    assert greedy_tailor(groups, (8, 8), score, cost, [0.99], criterion="psnr_per_flop")[1] == (6, 8)


def test_save_every_zero_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="save_every"):
        tailor(load_config(TailorStage, None, [f"out_dir={tmp_path / 'bad'}", "save_every=0"]))
    assert not (tmp_path / "bad").exists()


def common_overrides(photo_dirs: Path) -> list[str]:
    return ["search_crop=32", f"data={json.dumps(tiny_data(photo_dirs))}", "finetune_crop=16", "finetune_batch=2",
            "log_every=1"]


def test_tailor_finetune_trains_only_the_found_configurations_and_records_before_and_after(photo_dirs, supernet,
                                                                                          tmp_path):
    common = common_overrides(photo_dirs)
    plain = tailor(load_config(TailorStage, None, [f"supernet={supernet}", f"out_dir={tmp_path / 'plain'}", *common,
                                                   "finetune_steps=0"]))
    tuned = tailor(load_config(TailorStage, None, [f"supernet={supernet}", f"out_dir={tmp_path / 'tuned'}",
                                                   "finetune_steps=3", "finetune_lr=0.01", *common]))
    assert not (tmp_path / "plain" / "table_before_finetune.json").exists()
    before = json.loads((tmp_path / "tuned" / "table_before_finetune.json").read_text())
    after = json.loads((tmp_path / "tuned" / "table.json").read_text())
    # The search ran on the same weights, so the fine-tune starts from the plain run's table...
    assert before == json.loads((tmp_path / "plain" / "table.json").read_text())
    assert [row["widths"] for row in after] == [row["widths"] for row in before]
    # ...and moves the weights, so the validation PSNRs change.
    assert [row["val_psnr"] for row in after] != [row["val_psnr"] for row in before]
    a, b = load_checkpoint(plain), load_checkpoint(tuned)
    assert any(not torch.equal(t, b.net.state_dict()[k]) for k, t in a.net.state_dict().items())
    assert [r["finetune_step"] for r in read_log(tmp_path / "tuned") if "finetune_step" in r] == [1, 2, 3]
    tuned_record = b.provenance["stages"]["tailor"]
    assert tuned_record["steps"] == 3 and tuned_record["config"]["finetune_steps"] == 3
    assert tuned_record["configurations"] == "search"
    assert tuned_record["source_tensors_sha256"] == read_metadata(supernet)["tensors_sha256"]

    # search=false continues the fine-tune on the tuned checkpoint's own configurations, without a search.
    again = tailor(load_config(TailorStage, None, [f"supernet={tuned}", f"out_dir={tmp_path / 'again'}",
                                                   "search=false", "finetune_steps=2", "finetune_lr=0.01", *common]))
    assert not any("fraction" in r for r in read_log(tmp_path / "again"))  # no cut was tried
    assert [row["widths"] for row in json.loads((tmp_path / "again" / "table.json").read_text())] == \
        [row["widths"] for row in after]
    c = load_checkpoint(again)
    assert any(not torch.equal(t, c.net.state_dict()[k]) for k, t in b.net.state_dict().items())
    # The new run's record replaces the tuned run's, which it names by tensor digest instead of nesting it.
    record = c.provenance["stages"]["tailor"]
    assert record["configurations"] == "kept" and record["config"]["search"] is False
    assert record["steps"] == 2
    assert record["source_tensors_sha256"] == read_metadata(tuned)["tensors_sha256"]
    assert "previous" not in record
    assert c.provenance["stages"]["supernet"] == b.provenance["stages"]["supernet"]
    # A stage-1 supernet has no tailored table to keep.
    with pytest.raises(ValueError, match="search=false needs a tailored checkpoint"):
        tailor(load_config(TailorStage, None, [f"supernet={supernet}", f"out_dir={tmp_path / 'bad'}",
                                               "search=false", *common]))
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_tailor_configs_gives_the_sub_networks_and_bad_lists_are_refused_before_writing(photo_dirs, supernet,
                                                                                        tmp_path):
    net = load_checkpoint(supernet).net
    widest, slimmest = list(net.widest()), list(net.slimmest())
    middle = [g.choices[len(g.choices) // 2] for g in net.groups]
    common = common_overrides(photo_dirs)

    def run(name: str, *overrides: str):
        return tailor(load_config(TailorStage, None, [f"supernet={supernet}", f"out_dir={tmp_path / name}",
                                                      *common, *overrides]))

    # A stage-1 supernet has no table, but with configs it needs none: these three are fine-tuned and tabled.
    given = run("given", "search=false", f"configs={json.dumps([widest, middle, slimmest])}",
                "finetune_steps=2", "finetune_lr=0.01")
    assert not any("fraction" in r for r in read_log(tmp_path / "given"))  # no cut was tried
    assert [row["widths"] for row in json.loads((tmp_path / "given" / "table.json").read_text())] == \
        [widest, middle, slimmest]
    checkpoint = load_checkpoint(given)
    assert [list(s.widths) for s in checkpoint.subnets] == [widest, middle, slimmest]
    assert checkpoint.provenance["stages"]["tailor"]["configurations"] == "given"
    assert checkpoint.provenance["stages"]["tailor"]["config"]["configs"] == [widest, middle, slimmest]

    # refill widens each sub-network after the widest towards its target, never past the one before it.
    def mflops(widths):
        return supernet_mflops_per_pixel(net, tuple(widths))

    full, was = mflops(widest), [mflops(middle), mflops(slimmest)]
    targets = [(was[0] + full) / 2 / full, (was[1] + was[0]) / 2 / full]
    refilled = run("refilled", "search=false", "refill=true", f"targets={json.dumps(targets)}",
                   f"configs={json.dumps([widest, middle, slimmest])}", "finetune_steps=0")
    rows = [list(s.widths) for s in load_checkpoint(refilled).subnets]
    assert rows[0] == widest
    for i in (1, 2):
        assert was[i - 1] < mflops(rows[i]) <= targets[i - 1] * full  # seeded: this run widens both
        assert all(given <= w <= before for given, w, before in zip([middle, slimmest][i - 1], rows[i], rows[i - 1]))
    refill_config = load_checkpoint(refilled).provenance["stages"]["tailor"]["config"]
    assert refill_config["refill"] is True and refill_config["targets"] == targets
    records = read_log(tmp_path / "refilled")
    assert [(r["refilled"], r["widths"]) for r in records if "refilled" in r] == [(1, rows[1]), (2, rows[2])]

    bad_width = [*middle[:-1], middle[-1] + 1]
    cases = {
        "with_search": (["search=true", f"configs={json.dumps([widest, slimmest])}"], "set search=false too"),
        "one": (["search=false", f"configs={json.dumps([widest])}"], "at least 2"),
        "not_widest": (["search=false", f"configs={json.dumps([middle, slimmest])}"], "must be the widest"),
        "rising": (["search=false", f"configs={json.dumps([widest, slimmest, middle])}"],
                   r"configs\[2\].*must cost less than configs\[1\]"),
        "bad_width": (["search=false", f"configs={json.dumps([widest, bad_width])}"],
                      rf"configs\[1\]: group {net.groups[-1].name}: width"),
        "short": (["search=false", f"configs={json.dumps([widest, middle[:-1]])}"], r"configs\[1\]: .*entries"),
        "refill_targets": (["search=false", "refill=true", "targets=[0.5]",
                            f"configs={json.dumps([widest, middle, slimmest])}"], "one for each"),
    }
    for name, (overrides, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            run(name, *overrides)
        assert not (tmp_path / name).exists()  # refused before anything was written


def test_tailor_finetune_resumes_from_its_state_and_matches_an_uninterrupted_run(photo_dirs, supernet, tmp_path,
                                                                                 tmp_path_factory):
    common = [f"supernet={supernet}", *common_overrides(photo_dirs), "finetune_steps=4", "finetune_lr=0.01"]
    straight = tailor(load_config(TailorStage, None, [f"out_dir={tmp_path / 'straight'}", *common]))
    split = tmp_path / "split"
    stopped = tailor(load_config(TailorStage, None, [f"out_dir={split}", "stop_at=2", *common]))
    assert stopped == split / "finetune_state.safetensors" and not (split / "tailored.safetensors").exists()
    # Only out_dir: the run's own config.yaml (a tiny 4-step run), not the committed tailor.yaml.
    assert train_main(["tailor", "--resume", "--set", f"out_dir={split}"]) == 0

    assert [r["finetune_step"] for r in read_log(split) if "finetune_step" in r] == [1, 2, 3, 4]
    assert [r["resumed_at_step"] for r in read_log(split) if "resumed_at_step" in r] == [2]
    # The search ran once, before the stop, and made as many cuts as the uninterrupted run's.
    cuts = sum("fraction" in r for r in read_log(split))
    assert cuts == sum("fraction" in r for r in read_log(tmp_path / "straight"))
    for name in ("table_before_finetune.json", "table.json"):
        assert (split / name).read_text() == (tmp_path / "straight" / name).read_text(), name
    a, b = load_checkpoint(straight), load_checkpoint(split / "tailored.safetensors")
    for name, tensor in a.net.state_dict().items():
        assert torch.allclose(tensor, b.net.state_dict()[name], atol=1e-6), name
    record = b.provenance["stages"]["tailor"]
    assert record["resumes"] == 1 and a.provenance["stages"]["tailor"]["resumes"] == 0
    assert record["steps"] == 4
    assert record["configurations"] == "search" and record["config"]["targets"] == [0.7, 0.598, 0.45, 0.25]
    basetemp = str(tmp_path_factory.getbasetemp())  # holds this run, the supernet and the photos
    assert not [text for text in strings_in(record) if basetemp in text]
    with pytest.raises(FileNotFoundError, match="resume"):
        tailor(load_config(TailorStage, None, [f"out_dir={tmp_path / 'none'}", *common]), resume=True)


def test_tailor_val_crop_measures_the_table_on_centre_crops_of_each_view(photo_dirs, supernet, tmp_path):
    net = load_checkpoint(supernet).net
    configs = [list(net.widest()), list(net.slimmest())]
    common = [*common_overrides(photo_dirs), "search=false", f"configs={json.dumps(configs)}", "finetune_steps=0"]
    whole = tailor(load_config(TailorStage, None, [f"supernet={supernet}", f"out_dir={tmp_path / 'whole'}", *common]))
    cropped = tailor(load_config(TailorStage, None, [f"supernet={supernet}", f"out_dir={tmp_path / 'crop'}",
                                                     *common, "val_crop=24"]))
    data = load_config(TailorStage, None, common).data
    expected = [psnr_by_sigma(net.eval(), tuple(widths), validation_pairs(data, 24)) for widths in configs]
    for row, psnrs in zip(load_checkpoint(cropped).subnets, expected):
        assert row.val_psnr == pytest.approx(psnrs, abs=1e-3)
    assert [s.val_psnr for s in load_checkpoint(whole).subnets] != expected
