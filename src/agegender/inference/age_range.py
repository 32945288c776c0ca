"""An age range on every answer: split conformal prediction, calibrated on the validation split.

A point age is wrong by 5-10 years on average, and by more where the model is unsure. The range
says so: on faces drawn like the calibration faces, the true age lies inside it with probability
at least `level` (the guarantee of split conformal prediction; it holds on average over faces,
not for each age group, and not on other datasets). It is conformalized quantile regression
(Romano et al., 2019) on the model's own age distribution: the distribution's central `level`
interval, widened (or narrowed) by the same number of years for every face until it holds that
share of the calibration faces. So a face the model is sure of gets a narrow range, a hard one a
wide range, and a range near 0 or 100 years may be lopsided. On the validation halves of the
default model it was narrower than a fixed +/- error and than an error scaled by the spread,
at as even a coverage across age bins (bench/RESULTS.md).

    calibration = fit_age_range(val_ages, val_age_probs, level=0.9)   # the calibrate stage
    ranges = age_ranges(test_age_probs, calibration)                  # (N, 2): low, high
"""

import json
import math
from pathlib import Path

import numpy as np

from agegender.contracts.errors import PipelineError
from agegender.contracts.labels import AGES

METHOD = "conformalized quantile regression on the age distribution"
RANGE_DECIMALS = 1


def distribution_interval(age_probs, level):
    """(low, high) ages: the central `level` interval of each face's age distribution; NaN rows
    stay NaN."""
    age_probs = np.asarray(age_probs, dtype=np.float64)
    cdf = np.cumsum(age_probs, axis=1)
    tail = (1 - level) / 2
    low = (cdf < tail).sum(axis=1).astype(np.float64)
    high = np.minimum((cdf < 1 - tail).sum(axis=1), AGES[-1]).astype(np.float64)
    missing = np.isnan(age_probs).any(axis=1)
    low[missing], high[missing] = np.nan, np.nan
    return low, high


def fit_age_range(age_true, age_probs, level):
    """The calibration: how many years to widen the interval by, the conformal quantile of the
    scores max(low - age, age - high) of labelled faces not trained on. With n faces it is the
    ceil((n + 1) * level)-th smallest score; past n, unbounded."""
    if not 0 < level < 1:
        raise PipelineError(f"the age range level must lie between 0 and 1, got {level}")
    low, high = distribution_interval(age_probs, level)
    age_true = np.asarray(age_true, dtype=np.float64)
    scores = np.sort(np.maximum(low - age_true, age_true - high))
    rank = math.ceil((len(scores) + 1) * level)
    widen = float(scores[rank - 1]) if rank <= len(scores) else math.inf
    return {"level": level, "widen_years": widen, "faces": len(scores), "method": METHOD}


def age_ranges(age_probs, calibration):
    """(N, 2) low and high ages, within the ages the model answers (0-100); NaN rows stay NaN."""
    low, high = distribution_interval(age_probs, calibration["level"])
    widen = calibration["widen_years"]
    with np.errstate(invalid="ignore"):
        middle = (low + high) / 2  # a negative widening shrinks a range at most to its middle
        low = np.clip(np.minimum(low - widen, middle), AGES[0], AGES[-1])
        high = np.clip(np.maximum(high + widen, middle), AGES[0], AGES[-1])
    return np.stack([low, high], axis=1).round(RANGE_DECIMALS)


def read_age_range(path, hint="run `dvc repro calibrate`"):
    """The calibration stored beside a model, or one paragraph saying how to make it."""
    path = Path(path)
    try:
        calibration = json.loads(path.read_text(encoding="utf8"))
        widen, level = float(calibration["widen_years"]), float(calibration["level"])
    except FileNotFoundError:
        raise PipelineError(
            f"{path} not found: every answer carries an age range, calibrated on the validation "
            f"split for this model and kept beside it; {hint}."
        ) from None
    except (ValueError, KeyError, TypeError) as error:
        raise PipelineError(
            f"{path} is not an age range calibration ({type(error).__name__}: {error}); "
            f"make it again: {hint}."
        ) from None
    return {**calibration, "widen_years": widen, "level": level}
