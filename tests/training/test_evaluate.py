"""``ddsnet-train eval``'s pieces: the clean photos, their fixed noisy versions, and the per-method table."""

from __future__ import annotations

import torch

from model.checkpoint import load_checkpoint
from model.inference import Denoiser
from training.evaluate import load_clean_images, measure_denoiser, noisy_pairs


def test_a_folder_loads_as_named_images_in_the_unit_range(photo_dirs):
    images = load_clean_images(str(photo_dirs / "train"))
    assert [name for name, _ in images] == ["astronaut", "coffee"]
    assert all(image.shape[:2] == (1, 3) and 0 <= image.min() and image.max() <= 1 for _, image in images)


def test_noisy_pairs_are_fixed_by_the_seed_and_keyed_by_sigma_or_name(photo_dirs):
    folder = str(photo_dirs / "val")
    pairs = noisy_pairs(folder, [25.0], seed=3, degradations=["jpeg80-awgn15"])
    assert [key for _, key, _, _ in pairs] == [25.0, "jpeg80-awgn15"]
    again = noisy_pairs(folder, [25.0], seed=3, degradations=["jpeg80-awgn15"])
    assert all(torch.equal(a[3], b[3]) for a, b in zip(pairs, again))
    assert not torch.equal(pairs[0][3], noisy_pairs(folder, [25.0], seed=4)[0][3])


def test_measure_denoiser_tables_every_method_and_auto_is_one_of_the_runs(three_stage_run, photo_dirs):
    denoiser = Denoiser(load_checkpoint(three_stage_run.gated))
    pairs = noisy_pairs(str(photo_dirs / "val"), [25.0], seed=0)
    table = measure_denoiser(denoiser, pairs)["25"]
    subnets = [f"subnet_{k}" for k in range(len(denoiser.subnets))]
    assert set(table) == {"auto", "best", "fast", "noisy", *subnets}
    assert table["best"]["psnr"] == table[f"subnet_{denoiser.best_index}"]["psnr"]
    assert table["auto"]["psnr"] in [table[name]["psnr"] for name in subnets]
    assert sum(table["auto"]["subnet_histogram"]) == len(pairs)
    assert table["best"]["mflops_per_pixel"] > table["fast"]["mflops_per_pixel"]
