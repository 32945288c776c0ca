"""agegender.inference.age_range: conformal age ranges hold the true age as often as promised on
faces like the calibration faces, adapt to how sure each answer is, and stay within 0-100."""

import json

import numpy as np
import pytest

from agegender.contracts.errors import PipelineError
from agegender.contracts.labels import AGES
from agegender.inference.age_range import (
    age_ranges,
    distribution_interval,
    fit_age_range,
    read_age_range,
)


def answers_and_ages(count, seed):
    """Age distributions of a model that is right about its own spread, and true ages drawn
    from them: a wide distribution for half the faces, a narrow one for the others."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform(15, 75, count)
    spread = np.where(rng.random(count) < 0.5, 3.0, 12.0)
    probs = np.exp(-0.5 * ((AGES[None, :] - centre[:, None]) / spread[:, None]) ** 2)
    probs /= probs.sum(axis=1, keepdims=True)
    ages = np.array([rng.choice(AGES, p=row) for row in probs])
    return probs, ages, spread


def covered(ranges, ages):
    return (ranges[:, 0] <= ages) & (ages <= ranges[:, 1])


def test_the_range_holds_the_promised_share_of_new_faces():
    calibration_probs, calibration_ages, _ = answers_and_ages(2000, seed=0)
    probs, ages, spread = answers_and_ages(4000, seed=1)
    for level in (0.8, 0.9):
        calibration = fit_age_range(calibration_ages, calibration_probs, level)
        assert calibration["faces"] == 2000 and calibration["level"] == level
        ranges = age_ranges(probs, calibration)
        assert level - 0.02 <= covered(ranges, ages).mean() <= level + 0.03
    width = ranges[:, 1] - ranges[:, 0]
    assert width[spread == 3.0].mean() * 2 < width[spread == 12.0].mean()


def test_an_overconfident_model_gets_wider_ranges_than_its_own_interval():
    probs, ages, _ = answers_and_ages(1000, seed=2)
    sharp = probs**4 / (probs**4).sum(axis=1, keepdims=True)  # claims half the spread
    calibration = fit_age_range(ages, sharp, 0.9)
    assert calibration["widen_years"] > 1
    low, high = distribution_interval(sharp, 0.9)
    ranges = age_ranges(sharp, calibration)
    assert (ranges[:, 0] <= low).all() and (ranges[:, 1] >= high).all()
    assert covered(ranges, ages).mean() >= 0.89


def test_ranges_stay_within_the_ages_answered_and_nan_rows_stay_nan():
    probs = np.zeros((3, len(AGES)))
    probs[0, 0], probs[1, 100] = 1, 1
    probs[2] = np.nan
    ranges = age_ranges(probs, {"level": 0.9, "widen_years": 5.0})
    assert ranges[0].tolist() == [0, 5] and ranges[1].tolist() == [95, 100]
    assert np.isnan(ranges[2]).all()
    # a negative widening narrows a range at most to its middle
    wide = np.full((1, len(AGES)), 1 / len(AGES))
    low, high = age_ranges(wide, {"level": 0.9, "widen_years": -80.0})[0]
    assert low == high == 50


def test_too_few_calibration_faces_give_an_unbounded_range():
    probs, ages, _ = answers_and_ages(5, seed=3)
    calibration = fit_age_range(ages, probs, 0.9)  # ceil(6 * 0.9) = 6 > 5 faces
    assert calibration["widen_years"] == np.inf
    assert age_ranges(probs, calibration).tolist() == [[0, 100]] * 5


def test_a_level_outside_zero_and_one_is_refused():
    probs, ages, _ = answers_and_ages(10, seed=4)
    with pytest.raises(PipelineError, match="between 0 and 1"):
        fit_age_range(ages, probs, 90)


def test_a_missing_or_broken_calibration_file_is_one_paragraph(tmp_path):
    with pytest.raises(PipelineError, match="age_range.json not found.*dvc repro calibrate"):
        read_age_range(tmp_path / "age_range.json")
    (tmp_path / "age_range.json").write_text(json.dumps({"level": 0.9}))
    with pytest.raises(PipelineError, match="not an age range calibration.*KeyError"):
        read_age_range(tmp_path / "age_range.json")
    (tmp_path / "age_range.json").write_text(json.dumps({"level": 0.9, "widen_years": 1.5}))
    assert read_age_range(tmp_path / "age_range.json")["widen_years"] == 1.5
