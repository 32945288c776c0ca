"""Age and gender figures as the peers report them (DEX expected value, CS@5, bins)."""

import math

import numpy as np

from agegender.contracts.labels import (
    AGES,
    GENDERS,
    age_bin,
    bin_labels,
    bin_probabilities,
    expected_age,
)


def age_metrics(age_true, age_probs, edges, cs_years, ranges=None):
    """The age figures; with `ranges` ((N, 2) low, high) also how often the range held the true
    age and how wide it was."""
    age_true = np.asarray(age_true)
    expected = expected_age(age_probs)
    error = np.abs(expected - age_true)
    true_bin = age_bin(age_true, edges)
    predicted_bin = bin_probabilities(age_probs, edges).argmax(axis=1)
    return {
        "mae": float(error.mean()),
        f"cs{cs_years}": float((error <= cs_years).mean()),
        "exact_accuracy": float((age_probs.argmax(axis=1) == age_true).mean()),
        "bin_accuracy": float((predicted_bin == true_bin).mean()),
        "bin_within_one": float((np.abs(predicted_bin - true_bin) <= 1).mean()),
        **(range_metrics(age_true, ranges) if ranges is not None else {}),
    }


def range_hits(age_true, ranges):
    """True where the age range (low, high) holds the true age."""
    age_true = np.asarray(age_true)
    return (ranges[:, 0] <= age_true) & (age_true <= ranges[:, 1])


def range_metrics(age_true, ranges):
    """Empirical coverage of the age ranges and their mean width in years."""
    return {
        "range_coverage": float(range_hits(age_true, ranges).mean()),
        "range_mean_width": float((ranges[:, 1] - ranges[:, 0]).mean()),
    }


def gender_metrics(gender_true, gender_probs, train_male_share):
    gender_true = np.asarray(gender_true)
    majority = 1 if train_male_share >= 0.5 else 0
    return {
        "accuracy": float((gender_probs.argmax(axis=1) == gender_true).mean()),
        "majority_baseline": float((gender_true == majority).mean()),
    }


def mean_age_baseline(age_true, train_mean_age):
    return float(np.abs(np.asarray(age_true) - train_mean_age).mean())


def constant_age_baselines(age_true, train_ages, edges, cs_years):
    """What a model that ignores the image scores: the training mean age (CS@n), the most common
    training age (exact accuracy) and the most common training age bin (bin accuracy)."""
    age_true, train_ages = np.asarray(age_true), np.asarray(train_ages)
    mode_age = np.bincount(
        np.clip(train_ages.astype(int), 0, AGES[-1]), minlength=len(AGES)
    ).argmax()
    mode_bin = np.bincount(age_bin(train_ages, edges), minlength=len(edges)).argmax()
    return {
        f"mean_baseline_cs{cs_years}": float(
            (np.abs(age_true - train_ages.mean()) <= cs_years).mean()
        ),
        "mode_baseline_exact": float((age_true == mode_age).mean()),
        "majority_bin_baseline": float((age_bin(age_true, edges) == mode_bin).mean()),
    }


def per_age_bin(age_true, age_probs, edges, baseline_age=None, ranges=None):
    """One row per age bin of the true age: images, MAE of the expected age, bin accuracy; with
    `baseline_age` (the training mean age) the MAE of always answering it; with `ranges` the age
    ranges' coverage and mean width."""
    import pandas as pd

    age_true = np.asarray(age_true)
    error = np.abs(expected_age(age_probs) - age_true)
    true_bin = age_bin(age_true, edges)
    hit = bin_probabilities(age_probs, edges).argmax(axis=1) == true_bin
    columns = ["bin", "count", "mae", "bin_accuracy"]
    columns += ["baseline_mae"] * (baseline_age is not None)
    columns += ["range_coverage", "range_mean_width"] * (ranges is not None)
    rows = []
    for index, label in enumerate(bin_labels(edges)):
        members = true_bin == index
        count = int(members.sum())
        row = {
            "bin": label,
            "count": count,
            "mae": float(error[members].mean()) if count else float("nan"),
            "bin_accuracy": float(hit[members].mean()) if count else float("nan"),
        }
        if baseline_age is not None:
            baseline = np.abs(age_true[members] - baseline_age)
            row["baseline_mae"] = float(baseline.mean()) if count else float("nan")
        if ranges is not None:
            figures = range_metrics(age_true[members], ranges[members]) if count else {}
            row["range_coverage"] = figures.get("range_coverage", float("nan"))
            row["range_mean_width"] = figures.get("range_mean_width", float("nan"))
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def per_gender(gender_true, gender_probs, names=GENDERS):
    """One row per true gender: images and accuracy."""
    import pandas as pd

    gender_true = np.asarray(gender_true)
    hit = gender_probs.argmax(axis=1) == gender_true
    rows = []
    for index, name in enumerate(names):
        members = gender_true == index
        count = int(members.sum())
        rows.append(
            {
                "gender": name,
                "count": count,
                "accuracy": float(hit[members].mean()) if count else float("nan"),
            }
        )
    return pd.DataFrame(rows, columns=["gender", "count", "accuracy"])


def rounded(value, digits=6):
    """JSON-ready: floats rounded, NaN as null."""
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else round(float(value), digits)
    if isinstance(value, np.integer):
        return int(value)
    return value
