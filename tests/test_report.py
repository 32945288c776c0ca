"""agegender.evaluation.report: the headline against the reference and
baselines, per-bin and per-gender tables, worst cases in the right order, links to the figures,
the same text for the same input."""

import re

import numpy as np
import pandas as pd

from agegender.evaluation.metrics import constant_age_baselines, per_age_bin, per_gender
from agegender.evaluation.report import build_report, worst_age, worst_gender

EDGES = [0, 10, 20, 30, 40, 50, 60]
METRICS = {
    "test_images": 12,
    "gender": {"accuracy": 0.75, "majority_baseline": 0.583333},
    "age": {
        "mae": 12.3456,
        "cs5": 0.25,
        "exact_accuracy": 0.083333,
        "bin_accuracy": 0.416667,
        "bin_within_one": 0.666667,
        "mean_baseline_mae": 14.5,
        "mean_baseline_cs5": 0.166667,
        "mode_baseline_exact": 0.0,
        "majority_bin_baseline": 0.333333,
    },
}
FIGURES = {
    "Gender confusion": "figures/gender_confusion.png",
    "Training curves": "figures/training_curves.png",
}


def one_hot(ages):
    probs = np.zeros((len(ages), 101))
    probs[np.arange(len(ages)), ages] = 1
    return probs


def predictions():
    """12 images: age errors 0..11 in a shuffled order, two ties; 3 gender errors."""
    errors = [3, 11, 0, 7, 5, 9, 1, 11, 2, 8, 4, 6]
    true = np.array([20, 30, 40, 50, 60, 25, 35, 45, 55, 65, 15, 5])
    return pd.DataFrame(
        {
            "full_path": [f"{i:02d}/img{i}.jpg" for i in range(12)],
            "gender_true": ["male"] * 7 + ["female"] * 5,
            "gender_pred": ["male"] * 6 + ["female"] + ["male", "male"] + ["female"] * 3,
            "gender_confidence": [0.9, 0.8, 0.7, 0.6, 0.99, 0.55, 0.97, 0.61, 0.95, 0.9, 0.8, 0.7],
            "age_true": true,
            "age_pred": true + np.array(errors) * np.where(np.arange(12) % 2, 1, -1),
        }
    )


def report(table=None, metrics=METRICS):
    table = predictions() if table is None else table
    probs = one_hot(np.clip(table["age_pred"], 0, 100).round().astype(int))
    genders = (table["gender_true"] == "male").astype(int)
    gender_probs = np.stack([1 - genders, genders], axis=1).astype(float)
    return build_report(
        metrics,
        table,
        per_age_bin(table["age_true"], probs, EDGES),
        per_gender(genders, gender_probs),
        FIGURES,
    )


def section(text, title):
    return text.split(f"## {title}")[1].split("\n## ")[0]


def table_rows(text):
    return [
        line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")
    ][1:]


def test_headline_compares_with_the_reference_and_baselines():
    headline = table_rows(section(report(), "Headline"))
    rows = {row.split(" | ")[0].strip("| "): row for row in headline}
    assert (
        rows["Gender accuracy"]
        == "| Gender accuracy | 75.00% | 58.33% (always the majority gender of training) | 91.43% |"
    )
    assert (
        "| 8.33% | 0.00% (always the most common training age) | more than 9% |"
        in rows["Exact age accuracy (101 classes)"]
    )
    assert (
        "| 12.35 | 14.50 (always the training mean age) |"
        in rows["Age MAE, expected value (years)"]
    )
    assert "| 25.00% | 16.67%" in rows["Age CS@5 (share within 5 years)"]
    assert "| 41.67% | 33.33% (always the most common training bin) |" in rows["Age-bin accuracy"]
    assert "12 images" in report()


def test_worst_age_errors_largest_first_ties_by_path():
    rows = table_rows(section(report(), "Largest age errors"))
    assert len(rows) == 10
    errors = [float(row.split(" | ")[-1].strip(" |")) for row in rows]
    assert errors == [11, 11, 9, 8, 7, 6, 5, 4, 3, 2]
    assert rows[0].startswith("| `01/img1.jpg` | 30 | 41.00 |") and rows[1].startswith(
        "| `07/img7.jpg` | 45 | 56.00 |"
    )
    assert list(worst_age(predictions(), 3)["full_path"]) == [
        "01/img1.jpg",
        "07/img7.jpg",
        "05/img5.jpg",
    ]


def test_gender_errors_most_confident_first():
    rows = table_rows(section(report(), "Most confident gender errors"))
    assert [row.split(" | ")[0].strip("| `") for row in rows] == [
        "06/img6.jpg",
        "08/img8.jpg",
        "07/img7.jpg",
    ]
    assert rows[0] == "| `06/img6.jpg` | male | female | 97.00% |"
    assert list(worst_gender(predictions())["gender_confidence"]) == [0.97, 0.95, 0.61]
    no_errors = predictions().assign(gender_pred=lambda t: t["gender_true"])
    assert "No gender errors." in report(no_errors)


def test_per_bin_and_per_gender_tables():
    text = report()
    bins = table_rows(section(text, "Per age bin"))
    assert [row.split(" | ")[0].strip("| ") for row in bins] == [
        "0-9",
        "10-19",
        "20-29",
        "30-39",
        "40-49",
        "50-59",
        "60+",
    ]
    assert bins[0] == "| 0-9 | 1 | 6.00 | 0.00% |"  # age 5 predicted 11: error 6, wrong bin
    assert sum(int(row.split(" | ")[1]) for row in bins) == 12
    genders = table_rows(section(text, "Per gender"))
    assert genders == ["| female | 5 | 100.00% |", "| male | 7 | 100.00% |"]


def test_links_to_every_figure_and_is_deterministic():
    text = report()
    for title, path in FIGURES.items():
        assert f"- [{title}]({path})" in text and f"![{title}]({path})" in text
    assert text == report()
    assert not re.search(r"\d{4}-\d{2}-\d{2}|\d{2}:\d{2}", text)  # no date or time


def test_constant_baselines():
    train = [20, 20, 30, 35, 38, 70]  # mean 35.5, most common age 20, most common bin 30-39
    baselines = constant_age_baselines([20, 36, 41, 33, 0], train, EDGES, 5)
    assert baselines == {
        "mean_baseline_cs5": 0.4,
        "mode_baseline_exact": 0.2,
        "majority_bin_baseline": 0.4,
    }


def test_the_pretrained_networks_alone_sit_beside_the_trained_model():
    alone = {"gender_accuracy": 0.9, "age_mae": 8.3, "age_cs5": 0.43}
    text = report(metrics={**METRICS, "pretrained_alone": alone})
    assert "| this model | 75.00% | 12.35 | 25.00% |" in text
    assert "| pretrained networks alone, zero training | 90.00% | 8.30 | 43.00% |" in text
    assert "pretrained networks alone" not in report()
