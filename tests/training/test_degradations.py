import math
import random

import pytest
import torch

from model.metrics import add_noise
from training.degradations import (
    EVAL_DEGRADATIONS,
    KINDS,
    DegradationConfig,
    apply,
    blind_noisy,
    degrade,
    draw,
    eval_degradation,
    noise_rms,
)

GREY = torch.full((3, 96, 96), 0.5)


def residual(kind: str, params: dict, clean: torch.Tensor = GREY, seed: int = 0) -> torch.Tensor:
    return (apply(kind, clean, params, torch.Generator().manual_seed(seed)) - clean) * 255


def neighbour_correlation(noise: torch.Tensor) -> float:
    """Correlation of horizontally adjacent noise values: about 0 for white noise."""
    left, right = noise[..., :-1].flatten(), noise[..., 1:].flatten()
    return float(torch.corrcoef(torch.stack([left, right]))[0, 1])


def test_awgn_alone_draws_exactly_the_blind_awgn_noise_and_leaves_the_kind_rng_untouched():
    clean = torch.rand(4, 3, 32, 32)
    rng = random.Random(5)
    before = rng.getstate()
    ours = degrade(clean, DegradationConfig(), (0.0, 55.0), True, torch.Generator().manual_seed(3), rng)
    # Blind AWGN written out: one sigma per image from the generator, then the noise from the same generator.
    generator = torch.Generator().manual_seed(3)
    sigmas = torch.empty(4, 1, 1, 1).uniform_(0.0, 55.0, generator=generator)
    assert torch.equal(ours, add_noise(clean, sigmas, generator, quantize=True))
    assert torch.equal(ours, blind_noisy(clean, 0.0, 55.0, True, torch.Generator().manual_seed(3))[0])
    assert rng.getstate() == before


def test_awgn_has_the_requested_sigma_and_is_white():
    noise = residual("awgn", {"sigma": 25.0})
    assert noise.std().item() == pytest.approx(25.0, rel=0.03)
    assert abs(neighbour_correlation(noise)) < 0.05


def test_poisson_gaussian_noise_variance_follows_brightness():
    photons, read = 40.0, 2.0
    dark = residual("poisson_gaussian", {"photons": photons, "read_sigma": read}, torch.full((3, 96, 96), 0.2))
    bright = residual("poisson_gaussian", {"photons": photons, "read_sigma": read}, torch.full((3, 96, 96), 0.5))
    for level, noise in ((0.2, dark), (0.5, bright)):
        expected = math.sqrt(level / photons * 255**2 + read**2)
        assert noise.std().item() == pytest.approx(expected, rel=0.06)
    assert bright.std() > 1.4 * dark.std()


def test_variant_sigma_ramps_across_the_image_between_its_two_values():
    noise = residual("variant", {"low": 5.0, "high": 40.0, "angle": 0.0}, torch.full((3, 128, 256), 0.5))
    left, right = noise[..., :16].std().item(), noise[..., -16:].std().item()
    assert left == pytest.approx(6.1, rel=0.2)  # the first 16 of 256 columns span sigma 5 to 7.2
    assert right == pytest.approx(38.9, rel=0.1)


def test_jpeg_noise_is_correlated_and_weaker_than_the_noise_before_compression():
    clean = torch.full((3, 128, 128), 0.5)
    noise = residual("jpeg", {"sigma": 15.0, "quality": 80}, clean)
    assert 3.0 < noise.std().item() < 15.0
    assert neighbour_correlation(noise) > 0.05  # white noise: about 0 (the awgn test bounds it by 0.05)
    noisy = clean + noise / 255
    assert torch.equal(noisy, (noisy * 255).round() / 255)  # an 8-bit image, as decoded from the file


def test_downscaled_noise_is_the_area_average_of_finer_noise():
    noise = residual("downscale", {"sigma": 30.0, "factor": 0.5})
    assert noise.std().item() == pytest.approx(15.0, rel=0.05)  # the mean of 2x2 independent values
    # Halving averages disjoint blocks, so the noise stays white; the evaluation's factor does not.
    assert abs(neighbour_correlation(noise)) < 0.05
    kind, params = EVAL_DEGRADATIONS["down0.7-awgn30"]
    assert neighbour_correlation(residual(kind, params)) > 0.2


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_reproducible_from_its_seeds_and_changes_with_them(kind):
    config = DegradationConfig(mix={kind: 1.0})
    clean = torch.rand(2, 3, 48, 48)

    def run(seed: int) -> torch.Tensor:
        return degrade(clean, config, (0.0, 55.0), True, torch.Generator().manual_seed(seed), random.Random(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    assert run(1).shape == clean.shape and 0 <= run(1).min() and run(1).max() <= 1


def test_draw_follows_the_mix_and_stays_in_the_ranges():
    config = DegradationConfig(mix={"awgn": 1.0, "jpeg": 3.0, "poisson_gaussian": 0.0}, jpeg_quality=[70, 75])
    rng = random.Random(0)
    draws = [draw(config, (0.0, 55.0), rng) for _ in range(2000)]
    kinds = [kind for kind, _ in draws]
    assert set(kinds) == {"awgn", "jpeg"}
    assert kinds.count("jpeg") / len(kinds) == pytest.approx(0.75, abs=0.04)
    assert all(70 <= params["quality"] <= 75 for kind, params in draws if kind == "jpeg")
    assert all(0 <= params["sigma"] <= 55 for kind, params in draws if kind == "awgn")


def test_a_step_draw_spreads_the_quantiser_step_log_uniformly_over_the_quality_range():
    step = DegradationConfig(mix={"jpeg": 1.0}, jpeg_quality=[30, 98], jpeg_quality_draw="step")
    uniform = DegradationConfig(mix={"jpeg": 1.0}, jpeg_quality=[30, 98])
    qualities = {name: [draw(config, (0.0, 55.0), random.Random(seed))[1]["quality"] for seed in range(3000)]
                 for name, config in (("step", step), ("uniform", uniform))}
    assert all(30 <= q <= 98 for q in qualities["step"])
    # libjpeg's scale is 167% at q30, 100% at q50, 20% at q90 and 4% at q98: log-uniform in it, q >= 90 draws
    # ln(20/4) / ln(167/4) = 43% of the time, where a uniform quality draws 9 of 69 qualities, 13%.
    share = {name: sum(q >= 90 for q in drawn) / len(drawn) for name, drawn in qualities.items()}
    assert share["step"] == pytest.approx(math.log(5) / math.log(5000 / 30 / 4), abs=0.04)
    assert share["uniform"] == pytest.approx(9 / 69, abs=0.03)
    assert min(qualities["step"]) == 30 and max(qualities["step"]) == 98


@pytest.mark.parametrize("bad", [
    {"mix": {"salt": 1.0}},
    {"mix": {"awgn": 0.0}},
    {"mix": {"awgn": -1.0}},
    {"variant_sigma": [30.0, 10.0]},
    {"jpeg_quality": [60, 120]},
    {"downscale_factor": [0.0, 0.5]},
    {"photons": [0.0, 10.0]},
    {"read_sigma": [1.0]},
    {"jpeg_quality_draw": "gaussian"},
])
def test_bad_settings_are_refused_with_a_message(bad):
    with pytest.raises(ValueError):
        DegradationConfig(**bad)


def test_kinds_other_than_awgn_need_8_bit_quantisation():
    with pytest.raises(ValueError, match="quantize"):
        degrade(torch.rand(1, 3, 8, 8), DegradationConfig(mix={"jpeg": 1.0}), (0.0, 55.0), False,
                torch.Generator(), random.Random(0))


def test_evaluation_degradations_are_named_and_a_number_means_awgn():
    assert eval_degradation("25") == ("awgn", {"sigma": 25.0})
    assert {kind for kind, _ in EVAL_DEGRADATIONS.values()} == set(KINDS)
    with pytest.raises(ValueError, match="unknown degradation"):
        eval_degradation("gaussian-ish")


def test_noise_rms_is_on_the_0_255_scale():
    clean = torch.zeros(1, 3, 8, 8)
    assert noise_rms(clean + 10 / 255, clean) == pytest.approx(10.0)


def test_sensor_noise_then_jpeg_grows_with_brightness_and_is_correlated():
    dark, bright = torch.full((3, 96, 96), 0.1), torch.full((3, 96, 96), 0.9)
    params = {"photons": 60.0, "read_sigma": 1.0, "quality": 60}
    assert residual("poisson_jpeg", params, bright).std() > residual("poisson_jpeg", params, dark).std()
    assert neighbour_correlation(residual("poisson_jpeg", params, bright)) > 0.05


def test_a_double_jpeg_compresses_again_on_a_shifted_grid():
    clean = torch.rand(3, 64, 64)
    generator = torch.Generator().manual_seed(0)
    once = apply("jpeg", clean, {"sigma": 10.0, "quality": 90}, generator)
    twice = apply("jpeg", clean, {"sigma": 10.0, "quality": 90, "requality": 60, "shift": [3, 5]},
                  torch.Generator().manual_seed(0))
    assert torch.equal(twice[:, :3, :], once[:, :3, :]) and torch.equal(twice[:, :, :5], once[:, :, :5])
    assert not torch.equal(twice[:, 3:, 5:], once[:, 3:, 5:])


def test_double_jpeg_draws_follow_their_share_and_a_zero_share_draws_as_before():
    config = DegradationConfig(mix={"jpeg": 1.0, "poisson_jpeg": 1.0}, jpeg_double=0.25, jpeg_quality=[30, 95])
    rng = random.Random(0)
    draws = [draw(config, (0.0, 55.0), rng) for _ in range(2000)]
    doubled = [params for _, params in draws if "requality" in params]
    assert len(doubled) / len(draws) == pytest.approx(0.25, abs=0.03)
    assert all(1 <= dy < 8 and 1 <= dx < 8 and 30 <= p["requality"] <= 95 for p in doubled for dy, dx in [p["shift"]])
    # Without double JPEG a draw takes from the rng what it always took: the kind, sigma, quality.
    rng, expected = random.Random(4), random.Random(4)
    expected.choices(["jpeg"], weights=[1.0])
    assert draw(DegradationConfig(mix={"jpeg": 1.0}), (0.0, 55.0), rng) == (
        "jpeg", {"sigma": expected.uniform(3.0, 30.0), "quality": expected.randint(60, 95)})
    assert rng.random() == expected.random()
    with pytest.raises(ValueError, match="jpeg_double"):
        DegradationConfig(jpeg_double=1.5)
