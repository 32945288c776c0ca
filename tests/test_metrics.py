"""agegender.evaluation.metrics: DEX expected-value age, CS@n, exact and binned
accuracy, gender baselines."""

import numpy as np
import pytest

from agegender.contracts.labels import age_bin, bin_labels, bin_probabilities
from agegender.evaluation.metrics import (
    AGES,
    age_metrics,
    gender_metrics,
    mean_age_baseline,
    per_age_bin,
)

EDGES = [0, 10, 20, 30, 40, 50, 60]


def one_hot(ages):
    probs = np.zeros((len(ages), 101))
    probs[np.arange(len(ages)), ages] = 1
    return probs


def mix(weights):
    """One probability row from {age: weight}."""
    row = np.zeros(101)
    for age, weight in weights.items():
        row[age] = weight
    return row


def test_one_hot_at_the_true_age_is_perfect():
    ages = [0, 9, 10, 35, 59, 60, 100]
    metrics = age_metrics(ages, one_hot(ages), EDGES, 5)
    assert metrics == {
        "mae": 0.0,
        "cs5": 1.0,
        "exact_accuracy": 1.0,
        "bin_accuracy": 1.0,
        "bin_within_one": 1.0,
    }


def test_expected_value_not_argmax():
    probs = np.stack([mix({20: 0.5, 40: 0.5})])
    metrics = age_metrics([30], probs, EDGES, 5)
    assert probs @ AGES == pytest.approx([30])
    assert metrics["mae"] == pytest.approx(0)
    assert metrics["cs5"] == 1.0
    assert metrics["exact_accuracy"] == 0.0
    assert metrics["bin_accuracy"] == 0.0  # bins 20-29 and 40-49 tie at 0.5; the true bin is 30-39
    assert metrics["bin_within_one"] == 1.0


def test_mae_and_cs_years():
    ages = [30, 30, 30, 30]
    predicted = [30, 33, 36, 60]  # errors 0, 3, 6, 30
    metrics = age_metrics(ages, one_hot(predicted), EDGES, cs_years=5)
    assert metrics["mae"] == pytest.approx(39 / 4)
    assert metrics["cs5"] == pytest.approx(0.5)
    assert metrics["exact_accuracy"] == pytest.approx(0.25)
    assert age_metrics(ages, one_hot(predicted), EDGES, cs_years=6)["cs6"] == pytest.approx(0.75)
    assert "cs5" not in age_metrics(ages, one_hot(predicted), EDGES, cs_years=6)


def test_bin_labels():
    assert bin_labels(EDGES) == ["0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60+"]
    assert bin_labels([0, 18, 65]) == ["0-17", "18-64", "65+"]


def test_age_bin_edges():
    assert age_bin([0, 9, 10, 59, 60, 100], EDGES).tolist() == [0, 0, 1, 5, 6, 6]


def test_bin_probabilities_sum_over_each_bin():
    probs = np.stack([mix({5: 0.2, 9: 0.1, 10: 0.3, 61: 0.25, 100: 0.15}), np.full(101, 1 / 101)])
    bins = bin_probabilities(probs, EDGES)
    assert bins.shape == (2, 7)
    assert bins[0] == pytest.approx([0.3, 0.3, 0, 0, 0, 0, 0.4])
    assert bins.sum(axis=1) == pytest.approx([1, 1])
    assert bins[1] == pytest.approx(np.array([10, 10, 10, 10, 10, 10, 41]) / 101)


def test_bin_accuracy_and_within_one():
    ages = [25, 25, 25, 25]
    predicted = [21, 34, 45, 15]  # bins: same, +1, +2, -1
    metrics = age_metrics(ages, one_hot(predicted), EDGES, 5)
    assert metrics["bin_accuracy"] == pytest.approx(0.25)
    assert metrics["bin_within_one"] == pytest.approx(0.75)


def test_binned_prediction_sums_probabilities_rather_than_taking_argmax_age():
    row = mix({22: 0.3, 41: 0.2, 42: 0.2, 43: 0.3})  # argmax age 43, but bin 40-49 holds 0.7
    metrics = age_metrics([44], row[np.newaxis], EDGES, 5)
    assert metrics["bin_accuracy"] == 1.0
    assert metrics["exact_accuracy"] == 0.0


def test_gender_accuracy_and_majority_baseline():
    truth = [1, 1, 1, 0]
    probs = np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9], [0.7, 0.3]])
    metrics = gender_metrics(truth, probs, train_male_share=0.75)
    assert metrics == {"accuracy": 0.75, "majority_baseline": 0.75}
    assert gender_metrics(truth, probs, train_male_share=0.3)["majority_baseline"] == 0.25


def test_mean_age_baseline():
    assert mean_age_baseline([20, 40, 33], 30) == pytest.approx((10 + 10 + 3) / 3)
    assert mean_age_baseline(np.array([30.0]), 30) == 0.0


def test_per_age_bin_draws_the_mean_age_baseline_per_bin():
    """Always answering 30 errs 25 and 15 years in 0-9 and 10-19, 0 in 30-39; an empty bin
    has no baseline either."""
    ages = np.array([5, 5, 15, 30])
    probs = np.zeros((4, 101))
    probs[np.arange(4), ages] = 1.0
    table = per_age_bin(ages, probs, [0, 10, 20, 30], baseline_age=30.0)
    assert list(table.columns) == ["bin", "count", "mae", "bin_accuracy", "baseline_mae"]
    assert table["baseline_mae"].tolist()[:2] == [25.0, 15.0]
    assert np.isnan(table["baseline_mae"][2]) and table["baseline_mae"][3] == 0.0
    assert table["mae"].fillna(-1).tolist() == [0.0, 0.0, -1, 0.0]
    assert "baseline_mae" not in per_age_bin(ages, probs, [0, 10, 20, 30]).columns
