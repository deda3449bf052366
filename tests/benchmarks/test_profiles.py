"""benchmarks.profiles' summaries of the profile choice, on synthetic photo rows (no model runs)."""

from __future__ import annotations

import pytest

from benchmarks import profiles, tables, targets


def photo(white: float, compressed: float, chosen: str, nominal: str = "compressed") -> dict:
    """One photo's row as ``measure_pair`` makes it, with the widest of each profile and the gate's choice."""
    widest = {"white": white, "compressed": compressed}
    return {"best by profile": widest, "right profile": max(widest, key=widest.get), "nominal profile": nominal,
            "auto profile": chosen, "auto": widest[chosen] - 0.01, "best": widest[chosen],
            "regret": max(widest.values()) - widest[chosen], "shipped auto": 30.0, "shipped best": 30.0,
            "FFDNet": 30.0, "noisy": 20.0}


def test_a_choice_within_the_tolerance_counts_as_right_and_the_strict_share_does_not():
    close = targets.PROFILE_TOLERANCE_DB / 2
    rows = [photo(31.0, 31.0 - close, "compressed"),  # white better by less than the tolerance
            photo(31.0, 30.0, "compressed"),          # white better by 1 dB: wrong
            photo(30.0, 31.0, "compressed"),          # compressed better: right
            photo(30.0, 31.0, "white")]               # wrong, the other way
    summary = profiles.summarize(rows)
    assert summary["profile right"] == 0.5
    assert summary["profile strict"] == 0.25
    assert summary["profile nominal"] == 0.75
    assert summary["regret mean (dB)"] == pytest.approx((close + 1.0 + 0.0 + 1.0) / 4, abs=1e-4)
    assert summary["regret max (dB)"] == pytest.approx(1.0)
    assert summary["auto profiles"] == {"white": 1, "compressed": 3}
    assert summary["better profiles"] == {"white": 2, "compressed": 2}
    assert "auto subnets" not in summary  # rows without the sub-network auto ran


def test_the_sub_networks_auto_ran_are_counted_by_row_of_the_table():
    rows = [{**photo(30.0, 31.0, "compressed"), "auto subnet": index} for index in (7, 7, 9, 5, 7)]
    assert profiles.summarize(rows)["auto subnets"] == {"5": 1, "7": 3, "9": 1}


def test_the_confusion_matrix_counts_each_nominal_and_chosen_pair_with_its_cost():
    rows = [photo(31.0, 30.0, "white", nominal="white"), photo(31.0, 30.5, "compressed", nominal="white"),
            photo(30.0, 31.0, "compressed"), photo(30.0, 32.0, "white"), photo(30.0, 30.5, "white")]
    matrix = profiles.confusion(rows)
    assert matrix["white"]["white"] == {"photos": 1, "regret sum (dB)": 0.0, "regret max (dB)": 0.0}
    assert matrix["white"]["compressed"] == {"photos": 1, "regret sum (dB)": 0.5, "regret max (dB)": 0.5}
    assert matrix["compressed"]["compressed"]["photos"] == 1
    assert matrix["compressed"]["white"] == {"photos": 2, "regret sum (dB)": 2.5, "regret max (dB)": 2.0}


@pytest.mark.parametrize(("key", "profile"), [(25.0, "white"), (15, "white"), ("poisson40", "white"),
                                              ("ramp5-40", "white"), ("jpeg95-awgn10", "compressed"),
                                              ("poisson40-jpeg80", "compressed"), ("down0.7-awgn30", "compressed")])
def test_each_noise_has_the_profile_it_is_made_for(key, profile):
    assert profiles.nominal_profile(key) == profile


def test_the_profile_target_reads_the_tolerant_share():
    row = profiles.summarize([photo(31.0, 30.99, "compressed", nominal="white")] * 3)
    checks = profiles.check("15", row)
    assert checks["15 profile right"] == {"value": 1.0, "bar": targets.PROFILE_MIN_ACCURACY, "met": True}
    row = profiles.summarize([photo(31.0, 30.0, "compressed", nominal="white")] * 3)
    assert not profiles.check("15", row)["15 profile right"]["met"]


def test_the_profiles_table_has_a_row_per_noise_with_the_choice_and_its_cost():
    jpeg = profiles.summarize([{**photo(30.0, 31.0, "compressed"), "auto as .jpg": 30.9,
                                "auto as .jpg profile": "compressed", "auto as .jpg regret": 0.0}])
    white = profiles.summarize([photo(31.0, 30.0, "compressed", nominal="white")])
    report = {"profiles": ["white", "compressed"], "results": {"15": white, "jpeg95-awgn10": jpeg}}
    header, _, awgn, compressed = tables.profiles_table(report).splitlines()
    assert "chosen (white / compressed)" in header
    assert awgn.startswith("| AWGN σ=15 |") and "| 0 / 1 | 0.00 | 1.000 / 1.000 |" in awgn
    assert "| 30.90 |" in compressed and "| 0 / 1 | 1.00 |" in compressed
