"""Training stages on tiny configs: end to end, tailoring choice, label rule, resume (stages 1 and 2)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from model import load_checkpoint
from model.flops import supernet_mflops_per_pixel
from model.supernet import SlimUNet, SupernetConfig, WidthGroup
from service.cli import main
from training.config import GateStage, SupernetStage, TailorStage, apply_overrides, load_config, save_config
from training.data import PatchSampler, fixed_noisy_set
from training.gate import choose_shipped, smallest_within, train_gate
from training.supernet import reconstruction_loss, sandwich_backward, train_supernet
from training.tailor import greedy_refill, greedy_tailor, tailor

TINY_MODEL = {"channels": [8, 16, 32], "enc_blocks": [1, 1], "body_blocks": 1, "dec_blocks": [1, 1],
              "steps_per_width": 4, "min_steps": 1}


@pytest.fixture(scope="module")
def photo_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    (root / "train").mkdir()
    (root / "val").mkdir()
    Image.fromarray(data.astronaut()[::4, ::4]).save(root / "train" / "astronaut.png")
    Image.fromarray(data.coffee()[::4, ::4]).save(root / "train" / "coffee.png")
    Image.fromarray(data.chelsea()[::4, ::4]).save(root / "val" / "chelsea.png")
    return root


def tiny_data(photo_dirs) -> dict:
    return {"train_dir": str(photo_dirs / "train"), "val_dir": str(photo_dirs / "val"), "val_crop": 32}


def supernet_config(photo_dirs, out_dir, **extra) -> SupernetStage:
    raw = {"out_dir": str(out_dir), "model": TINY_MODEL, "data": tiny_data(photo_dirs), "steps": 4,
           "crop_schedule": [[0, 16, 2], [0.5, 24, 2]], "warmup_steps": 1, "log_every": 1, "val_every": 2,
           "save_every": 100, **extra}
    return load_config(SupernetStage, None, [f"{k}={json.dumps(v)}" for k, v in raw.items()])


def test_three_stages_end_to_end_give_a_checkpoint_the_cli_serves(photo_dirs, tmp_path, capsys):
    supernet = train_supernet(supernet_config(photo_dirs, tmp_path / "s1"))
    assert (tmp_path / "s1" / "config.yaml").is_file()
    records = [json.loads(line) for line in (tmp_path / "s1" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss_widest" in r] == [1, 2, 3, 4]
    assert any("val_psnr_widest" in r for r in records)

    tailor_config = TailorStage(supernet=str(supernet), out_dir=str(tmp_path / "s2"), search_crop=32,
                                targets=[0.7, 0.45, 0.25])
    tailor_config.data.val_dir = str(photo_dirs / "val")
    tailored = tailor(tailor_config)
    table = json.loads((tmp_path / "s2" / "table.json").read_text())
    assert len(table) == 4
    flops = [row["mflops_per_pixel"] for row in table]
    assert flops == sorted(flops, reverse=True)
    assert flops[1] <= 0.7 * flops[0] and flops[3] <= 0.25 * flops[0]
    assert set(table[0]["val_psnr"]) == {"15", "25", "50"}

    gate_config = load_config(GateStage, None, [f"tailored={tailored}", f"out={tmp_path / 'final.safetensors'}",
                                                "steps=2", "batch_size=2", "crop=16", "log_every=1"])
    gate_data = {**tiny_data(photo_dirs), "val_scales": [1.0, 0.5]}
    gate_config.data = load_config(SupernetStage, None, [f"data={json.dumps(gate_data)}"]).data
    final = train_gate(gate_config)
    checkpoint = load_checkpoint(final)
    assert checkpoint.gate_trained and len(checkpoint.subnets) == 4
    assert {"supernet", "tailor", "gate"} <= {checkpoint.provenance.get("stage"), *checkpoint.provenance}
    report = json.loads((tmp_path / "gate_report.json").read_text())
    assert {"accuracy", "confusion_matrix_label_by_pick", "auto_psnr", "best_psnr"} <= set(report["shipped"])
    assert len(report["delta_sweep"]) >= 2
    assert set(report["shipped"]["by_scale"]) == {"1", "0.5"}
    assert set(report["shipped"]["by_sigma"]) == {"15", "25", "50"}

    assert main(["info", "--checkpoint", str(final), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["subnets"]) == 4
    source = photo_dirs / "val" / "chelsea.png"
    assert main(["denoise", str(source), "-o", str(tmp_path / "out.png"), "--checkpoint", str(final)]) == 0
    with Image.open(tmp_path / "out.png") as result, Image.open(source) as original:
        assert result.size == original.size


def test_tailor_finetune_trains_only_the_found_configurations_and_records_before_and_after(photo_dirs, tmp_path):
    supernet = train_supernet(supernet_config(photo_dirs, tmp_path / "s1"))
    common = ["search_crop=32", f"data={json.dumps(tiny_data(photo_dirs))}", "finetune_crop=16",
              "finetune_batch=2", "log_every=1"]
    plain = tailor(load_config(TailorStage, None, [f"supernet={supernet}", f"out_dir={tmp_path / 'plain'}", *common]))
    tuned = tailor(load_config(TailorStage, None, [f"supernet={supernet}", f"out_dir={tmp_path / 'tuned'}",
                                                   "finetune_steps=3", "finetune_lr=0.01", *common]))
    assert not (tmp_path / "plain" / "table_before_finetune.json").exists()
    before = json.loads((tmp_path / "tuned" / "table_before_finetune.json").read_text())
    after = json.loads((tmp_path / "tuned" / "table.json").read_text())
    # The search ran on the same weights, so the fine-tune starts from the plain run's table...
    assert before == json.loads((tmp_path / "plain" / "table.json").read_text())
    assert [row["channels"] for row in after] == [row["channels"] for row in before]
    # ...and moves the weights, so the validation PSNRs change.
    assert [row["val_psnr"] for row in after] != [row["val_psnr"] for row in before]
    a, b = load_checkpoint(plain), load_checkpoint(tuned)
    assert any(not torch.equal(t, b.net.state_dict()[k]) for k, t in a.net.state_dict().items())
    steps = [json.loads(x)["finetune_step"] for x in (tmp_path / "tuned" / "log.jsonl").read_text().splitlines()
             if "finetune_step" in x]
    assert steps == [1, 2, 3]
    assert b.provenance["tailor"]["finetune_steps"] == 3

    # search=false continues the fine-tune on the tuned checkpoint's own configurations, without a search.
    again = tailor(load_config(TailorStage, None, [f"supernet={tuned}", f"out_dir={tmp_path / 'again'}",
                                                   "search=false", "finetune_steps=2", "finetune_lr=0.01", *common]))
    records = [json.loads(x) for x in (tmp_path / "again" / "log.jsonl").read_text().splitlines()]
    assert not any("fraction" in r for r in records)  # no cut was tried
    assert [row["channels"] for row in json.loads((tmp_path / "again" / "table.json").read_text())] == \
        [row["channels"] for row in after]
    c = load_checkpoint(again)
    assert any(not torch.equal(t, c.net.state_dict()[k]) for k, t in b.net.state_dict().items())
    assert c.provenance["tailor"]["search"] is False
    assert c.provenance["tailor"]["previous"]["finetune_steps"] == 3
    assert "targets" not in c.provenance["tailor"]  # kept, not found by this run's targets
    # A stage-1 supernet has no tailored table to keep.
    with pytest.raises(ValueError, match="search=false needs a tailored checkpoint"):
        tailor(load_config(TailorStage, None, [f"supernet={supernet}", f"out_dir={tmp_path / 'bad'}",
                                               "search=false", *common]))
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_tailor_configs_gives_the_sub_networks_and_bad_lists_are_refused_before_writing(photo_dirs, tmp_path):
    supernet = train_supernet(supernet_config(photo_dirs, tmp_path / "s1"))
    net = load_checkpoint(supernet).net
    widest, slimmest = list(net.widest()), list(net.slimmest())
    middle = [g.choices[len(g.choices) // 2] for g in net.groups]
    common = ["search_crop=32", f"data={json.dumps(tiny_data(photo_dirs))}", "finetune_crop=16",
              "finetune_batch=2", "log_every=1"]

    def run(name: str, *overrides: str):
        return tailor(load_config(TailorStage, None, [f"supernet={supernet}", f"out_dir={tmp_path / name}",
                                                      *common, *overrides]))

    # A stage-1 supernet has no table, but with configs it needs none: these three are fine-tuned and tabled.
    given = run("given", "search=false", f"configs={json.dumps([widest, middle, slimmest])}",
                "finetune_steps=2", "finetune_lr=0.01")
    records = [json.loads(x) for x in (tmp_path / "given" / "log.jsonl").read_text().splitlines()]
    assert not any("fraction" in r for r in records)  # no cut was tried
    assert [row["channels"] for row in json.loads((tmp_path / "given" / "table.json").read_text())] == \
        [widest, middle, slimmest]
    checkpoint = load_checkpoint(given)
    assert [list(s.channels) for s in checkpoint.subnets] == [widest, middle, slimmest]
    assert checkpoint.provenance["tailor"]["configs_given"] is True
    assert "targets" not in checkpoint.provenance["tailor"]

    # refill widens each sub-network after the widest towards its target, never past the one before it.
    def mflops(widths):
        return supernet_mflops_per_pixel(net, tuple(widths))

    full, was = mflops(widest), [mflops(middle), mflops(slimmest)]
    targets = [(was[0] + full) / 2 / full, (was[1] + was[0]) / 2 / full]
    refilled = run("refilled", "search=false", "refill=true", f"targets={json.dumps(targets)}",
                   f"configs={json.dumps([widest, middle, slimmest])}")
    rows = [list(s.channels) for s in load_checkpoint(refilled).subnets]
    assert rows[0] == widest
    for i in (1, 2):
        assert was[i - 1] < mflops(rows[i]) <= targets[i - 1] * full  # seeded: this run widens both
        assert all(given <= w <= before for given, w, before in zip([middle, slimmest][i - 1], rows[i], rows[i - 1]))
    assert load_checkpoint(refilled).provenance["tailor"]["refill"] is True
    records = [json.loads(x) for x in (tmp_path / "refilled" / "log.jsonl").read_text().splitlines()]
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


def test_resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run(photo_dirs, tmp_path):
    straight = tmp_path / "straight"
    train_supernet(supernet_config(photo_dirs, straight))
    split = tmp_path / "split"
    train_supernet(supernet_config(photo_dirs, split, stop_at=2))
    first = [json.loads(x)["step"] for x in (split / "log.jsonl").read_text().splitlines() if "loss_widest" in x]
    assert first == [1, 2]
    train_supernet(supernet_config(photo_dirs, split), resume=True)
    steps = [json.loads(x)["step"] for x in (split / "log.jsonl").read_text().splitlines() if "loss_widest" in x]
    assert steps == [1, 2, 3, 4]
    a, b = load_checkpoint(straight / "supernet.safetensors"), load_checkpoint(split / "supernet.safetensors")
    for name, tensor in a.net.state_dict().items():
        assert torch.allclose(tensor, b.net.state_dict()[name], atol=1e-6), name


def test_tailor_finetune_resumes_from_its_state_and_matches_an_uninterrupted_run(photo_dirs, tmp_path):
    from training.cli import main as train_main

    supernet = train_supernet(supernet_config(photo_dirs, tmp_path / "s1"))
    common = [f"supernet={supernet}", "search_crop=32", f"data={json.dumps(tiny_data(photo_dirs))}",
              "finetune_crop=16", "finetune_batch=2", "finetune_steps=4", "finetune_lr=0.01", "log_every=1"]
    straight = tailor(load_config(TailorStage, None, [f"out_dir={tmp_path / 'straight'}", *common]))
    split = tmp_path / "split"
    stopped = tailor(load_config(TailorStage, None, [f"out_dir={split}", "stop_at=2", *common]), command="first")
    assert stopped == split / "finetune_state.safetensors" and not (split / "tailored.safetensors").exists()
    # Only out_dir: the run's own config.yaml (a tiny 4-step run), not the committed tailor.yaml.
    assert train_main(["train", "tailor", "--resume", "--set", f"out_dir={split}"]) == 0

    def records(run):
        return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]

    assert [r["finetune_step"] for r in records(split) if "finetune_step" in r] == [1, 2, 3, 4]
    assert [r["resumed_at_step"] for r in records(split) if "resumed_at_step" in r] == [2]
    # The search ran once, before the stop, and made as many cuts as the uninterrupted run's.
    assert sum("fraction" in r for r in records(split)) == sum("fraction" in r for r in records(tmp_path / "straight"))
    for name in ("table_before_finetune.json", "table.json"):
        assert (split / name).read_text() == (tmp_path / "straight" / name).read_text(), name
    a, b = load_checkpoint(straight), load_checkpoint(split / "tailored.safetensors")
    for name, tensor in a.net.state_dict().items():
        assert torch.allclose(tensor, b.net.state_dict()[name], atol=1e-6), name
    assert b.provenance["tailor"]["command"] == "first"
    assert [r["step"] for r in b.provenance["tailor"]["resumes"]] == [2]
    assert b.provenance["tailor"]["targets"] == [0.7, 0.598, 0.45, 0.25]  # a search ran
    with pytest.raises(FileNotFoundError, match="resume"):
        tailor(load_config(TailorStage, None, [f"out_dir={tmp_path / 'none'}", *common]), resume=True)


def test_init_from_a_checkpoint_starts_from_its_weights(photo_dirs, tmp_path):
    source = train_supernet(supernet_config(photo_dirs, tmp_path / "first"))
    # lr = 0: one step changes nothing, so the export must equal the source's weights.
    again = train_supernet(supernet_config(photo_dirs, tmp_path / "second", init_from=str(source), steps=1,
                                           lr=0.0, lr_min=0.0))
    a, b = load_checkpoint(source), load_checkpoint(again)
    for name, tensor in a.net.state_dict().items():
        assert torch.equal(tensor, b.net.state_dict()[name]), name
    other = {**TINY_MODEL, "channels": [16, 16, 32]}
    with pytest.raises(ValueError, match="init_from"):
        train_supernet(supernet_config(photo_dirs, tmp_path / "third", init_from=str(source), model=other))


def test_cli_resume_keeps_the_runs_own_config(photo_dirs, tmp_path):
    from training.cli import main as train_main

    run = tmp_path / "run"
    raw = {"out_dir": str(run), "model": TINY_MODEL, "data": tiny_data(photo_dirs), "steps": 4, "lr": 0.002,
           "crop_schedule": [[0, 16, 2], [0.5, 24, 2]], "warmup_steps": 1, "log_every": 1, "val_every": 2,
           "save_every": 100, "stop_at": 2}
    sets = [arg for key, value in raw.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    assert train_main(["train", "supernet", *sets]) == 0
    # Only out_dir: the committed config (3,000 steps of a bigger model) must not replace the run's own.
    assert train_main(["train", "supernet", "--resume", "--set", f"out_dir={run}", "--set", "steps=5"]) == 0
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if "loss_widest" in x]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["crop"] for r in records] == [16, 16, 16, 24, 24]  # the run's crop schedule, stretched to 5 steps
    assert max(r["lr"] for r in records) <= 0.002
    saved = load_config(SupernetStage, run / "config.yaml")
    assert saved.steps == 5 and saved.model == TINY_MODEL and saved.lr == 0.002
    # An explicit --config wins over the run's own file (how session 11 repaired a run's config by hand).
    repaired = tmp_path / "repaired.yaml"
    save_config(dataclasses.replace(saved, steps=6, lr=0.001), repaired)
    assert train_main(["train", "supernet", "--resume", "--config", str(repaired)]) == 0
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if "loss_widest" in x]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and records[-1]["lr"] <= 0.001
    assert load_config(SupernetStage, run / "config.yaml").lr == 0.001


def test_resume_without_a_state_is_a_clear_error(photo_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="resume"):
        train_supernet(supernet_config(photo_dirs, tmp_path / "fresh"), resume=True)


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


def test_label_rule_on_hand_made_psnrs():
    mflops = torch.tensor([0.4, 0.28, 0.18, 0.1])  # widest first
    psnrs = torch.tensor([
        [30.00, 29.99, 29.95, 29.00],  # delta 0.1: index 2 (29.95 >= 29.9)
        [30.00, 29.50, 29.40, 29.95],  # the slimmest is within delta: 3
        [30.00, 29.80, 29.70, 29.00],  # nothing but the widest: 0
        [30.00, 30.20, 29.00, 28.00],  # a slimmer one beats the widest: 1
    ])
    assert smallest_within(psnrs, mflops, 0.1).tolist() == [2, 3, 0, 1]
    assert smallest_within(psnrs, mflops, 0.0).tolist() == [0, 0, 0, 1]
    assert smallest_within(psnrs, mflops, 5.0).tolist() == [3, 3, 3, 3]


def test_auto_delta_ships_the_cheapest_gate_within_the_drop_on_validation():
    def row(delta, auto_psnr, auto_mflops):
        return {"delta_db": delta, "auto_psnr": auto_psnr, "auto_mflops_per_pixel": auto_mflops, "best_psnr": 30.0}

    sweep = [row(0.0, 30.00, 0.40), row(0.1, 29.97, 0.30), row(0.2, 29.96, 0.25), row(0.5, 29.80, 0.12)]
    assert choose_shipped(sweep, "auto", 0.05)["delta_db"] == 0.2
    assert choose_shipped(sweep, "auto", 0.5)["delta_db"] == 0.5
    assert choose_shipped(sweep, 0.1, 0.05)["delta_db"] == 0.1
    # Nothing within the drop: the highest PSNR ships.
    assert choose_shipped([row(0.1, 29.5, 0.3), row(0.2, 29.7, 0.2)], "auto", 0.05)["delta_db"] == 0.2


def test_auto_delta_keeps_to_the_flops_budget():
    def row(delta, auto_psnr, auto_mflops):
        return {"delta_db": delta, "auto_psnr": auto_psnr, "auto_mflops_per_pixel": auto_mflops,
                "best_psnr": 30.0, "best_mflops_per_pixel": 0.40}

    # Session 11's sweep, in shape: nothing is within 0.05 dB except the gates that pick the widest.
    sweep = [row(0.0, 30.00, 0.401), row(0.1, 29.946, 0.275), row(0.15, 29.946, 0.233), row(0.2, 29.937, 0.226),
             row(0.5, 29.85, 0.165)]
    assert choose_shipped(sweep, "auto", 0.05)["delta_db"] == 0.0  # no budget: auto falls back to best
    assert choose_shipped(sweep, "auto", 0.05, 0.6)["delta_db"] == 0.15  # the budget's highest PSNR, then FLOPs
    assert choose_shipped(sweep, "auto", 0.1, 0.6)["delta_db"] == 0.2  # within both: the cheapest
    assert choose_shipped(sweep, "auto", 0.05, 0.45)["delta_db"] == 0.5
    # A budget nothing meets: the rule without one (here δ = 0, the only gate within the drop).
    assert choose_shipped(sweep, "auto", 0.05, 0.1)["delta_db"] == 0.0


def test_gate_delta_must_be_a_number_or_auto(tmp_path):
    with pytest.raises(ValueError, match="delta_db"):
        train_gate(load_config(GateStage, None, ["delta_db=sometimes", f"out={tmp_path / 'g.safetensors'}"]))
    with pytest.raises(ValueError, match="delta_sweep"):
        train_gate(load_config(GateStage, None, ["delta_db=auto", "delta_sweep=[]",
                                                 f"out={tmp_path / 'g.safetensors'}"]))
    with pytest.raises(ValueError, match="auto_max_flops_fraction"):
        train_gate(load_config(GateStage, None, ["auto_max_flops_fraction=60", f"out={tmp_path / 'g.safetensors'}"]))


def test_overrides_walk_dicts_and_parse_values():
    raw = apply_overrides({"data": {"sigma_max": 55}}, ["data.sigma_max=30", "steps=7", "model.channels=[8, 16]"])
    assert raw == {"data": {"sigma_max": 30}, "steps": 7, "model": {"channels": [8, 16]}}
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["nonsense"])
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(SupernetStage, None, ["stepz=3"])


def test_shipped_configs_load():
    from training.cli import CONFIG_DIR

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


def test_log_mse_loss_counts_every_image_alike_whatever_its_error():
    clean = torch.zeros(2, 3, 8, 8)
    output = clean.clone()
    output[0] += 0.01  # a low-noise image, small error
    output[1] += 0.1  # a high-noise image, large error
    loss = reconstruction_loss("log_mse", output, clean, eps=0.0)
    assert torch.isclose(loss, (torch.log(torch.tensor(1e-4)) + torch.log(torch.tensor(1e-2))) / 2)
    # Halving either image's error lowers the loss by the same amount (log 4 / 2): equal weight per image.
    for index in (0, 1):
        better = output.clone()
        better[index] /= 2
        drop = loss - reconstruction_loss("log_mse", better, clean, eps=0.0)
        assert torch.isclose(drop, torch.log(torch.tensor(4.0)) / 2, atol=1e-5)
    # The batch-mean L1 instead is dominated by the high-noise image.
    l1 = reconstruction_loss("l1", output, clean)
    assert torch.isclose(l1, torch.tensor(0.055))
    teacher = torch.full_like(clean, 0.01)
    with_teacher = reconstruction_loss("log_mse", output, clean, teacher, distill_weight=0.5, eps=0.0)
    expected = (torch.log(torch.tensor(1e-4 + 0.0)) + torch.log(torch.tensor(1e-2 + 0.5 * 0.09 ** 2))) / 2
    assert torch.isclose(with_teacher, expected, atol=1e-5)
    with pytest.raises(ValueError, match="unknown loss"):
        reconstruction_loss("l2", output, clean)


def test_widest_weight_scales_only_the_widest_loss_in_the_gradient():
    net = SlimUNet(SupernetConfig.from_dict(TINY_MODEL))
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 3, 16, 16, generator=generator)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=generator)
    members = [net.slimmest()]

    def gradient(widest_weight: float, with_members: bool) -> tuple[torch.Tensor, float, list[float]]:
        config = TailorStage(widest_weight=widest_weight, grad_clip=1e9)
        net.zero_grad(set_to_none=True)
        widest, member_losses = sandwich_backward(net, noisy, clean, members if with_members else [], config)
        return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]), widest, member_losses

    alone, loss_1, _ = gradient(1.0, with_members=False)
    tripled, loss_3, _ = gradient(3.0, with_members=False)
    assert loss_3 == pytest.approx(loss_1)  # the loss reported is unweighted
    assert torch.allclose(tripled, 3 * alone, rtol=1e-4, atol=1e-7)
    # With a member, the weight adds (w - 1) times the widest's gradient to the sum, nothing else.
    both_1, _, members_1 = gradient(1.0, with_members=True)
    both_3, _, members_3 = gradient(3.0, with_members=True)
    assert members_3 == pytest.approx(members_1)
    assert torch.allclose(both_3 - both_1, 2 * alone, rtol=1e-3, atol=1e-6)
    assert not torch.allclose(both_1, alone)


def test_unknown_loss_in_config_is_refused_before_training(photo_dirs, tmp_path):
    with pytest.raises(ValueError, match="unknown loss"):
        train_supernet(supernet_config(photo_dirs, tmp_path / "bad", loss="huber"))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="save_every"):
        train_supernet(supernet_config(photo_dirs, tmp_path / "bad", save_every=0))
    with pytest.raises(ValueError, match="save_every"):
        tailor(load_config(TailorStage, None, [f"out_dir={tmp_path / 'bad'}", "save_every=0"]))
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def half_textured_dir(tmp_path_factory):
    """One 64x256 image: a flat left half and a one-pixel checkerboard right half."""
    folder = tmp_path_factory.mktemp("half")
    pixels = np.full((64, 256, 3), 128, np.uint8)
    checker = (np.indices((64, 128)).sum(0) % 2 * 255).astype(np.uint8)
    pixels[:, 128:] = checker[..., None]
    Image.fromarray(pixels).save(folder / "half.png")
    return folder


def test_texture_candidates_shift_crops_towards_texture(half_textured_dir):
    def textured_fraction(candidates: int) -> float:
        sampler = PatchSampler(half_textured_dir, seed=3, texture_candidates=candidates)
        patches = sampler.sample(200, 16)
        return sum(PatchSampler.texture(p) > 0.1 for p in patches) / len(patches)

    uniform, biased = textured_fraction(1), textured_fraction(4)
    assert 0.3 < uniform < 0.7
    assert biased > 0.9


def test_scale_range_area_downsamples_larger_regions(half_textured_dir):
    full = PatchSampler(half_textured_dir, seed=0, scale_range=(1.0, 1.0))
    half = PatchSampler(half_textured_dir, seed=0, scale_range=(0.5, 0.5))
    # Crops of the checkerboard alone: at scale 1 it stays a checkerboard, at scale 0.5 it averages to grey.
    full.images = half.images = [image[:, :, 128:] for image in full.images]
    assert all(PatchSampler.texture(p) > 1.5 for p in full.sample(8, 16))
    downsampled = half.sample(8, 16)
    assert downsampled.shape == (8, 3, 16, 16)
    assert all(PatchSampler.texture(p) < 0.05 for p in downsampled)
    assert torch.allclose(downsampled.mean(), torch.tensor(0.5), atol=0.01)
    for bad in ({"scale_range": (0.0, 1.0)}, {"scale_range": (0.8, 0.5)}, {"texture_candidates": 0}):
        with pytest.raises(ValueError):
            PatchSampler(half_textured_dir, **bad)


def test_validation_views_at_several_scales_keep_scale_one_unchanged(half_textured_dir):
    plain = fixed_noisy_set(half_textured_dir, [25], seed=7)
    views = fixed_noisy_set(half_textured_dir, [15, 25], seed=7, scales=[1.0, 0.5])
    assert [(name, sigma, tuple(clean.shape[-2:])) for name, sigma, clean, _ in views] == [
        ("half.png", 15.0, (64, 256)), ("half.png", 25.0, (64, 256)),
        ("half.png@0.5", 15.0, (32, 128)), ("half.png@0.5", 25.0, (32, 128))]
    # Scale 1 is the photo itself, with the same noise as before scales existed.
    assert torch.equal(views[1][2], plain[0][2]) and torch.equal(views[1][3], plain[0][3])
    # Downscaled by area, the one-pixel checkerboard averages to grey; the flat half stays flat.
    half_clean = views[2][2]
    assert PatchSampler.texture(half_clean[0, :, :, 68:]) < 0.05
    assert torch.allclose(half_clean[0, :, :, 68:].mean(), torch.tensor(0.5), atol=0.01)
    assert torch.allclose(half_clean[0, :, :, :60], torch.tensor(128 / 255))
    with pytest.raises(ValueError, match="scales"):
        fixed_noisy_set(half_textured_dir, [25], seed=7, scales=[0.0])
