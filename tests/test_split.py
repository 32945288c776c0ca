"""agegender.stages.split: identity-disjoint, stratified train/val/test."""

import numpy as np
import pandas as pd
import pytest

from agegender.stages.split import SPLITS, assign_splits, identity_strata, split_metrics

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


@pytest.fixture(scope="module")
def records():
    """600 images of 400 identities: 300 with one image, 50 with two, 50 with four."""
    rng = np.random.default_rng(1)
    images_per_identity = [1] * 300 + [2] * 50 + [4] * 50
    rows = []
    for number, count in enumerate(images_per_identity):
        gender = int(rng.random() < 0.75)
        age = int(rng.integers(18, 80))
        for image in range(count):
            rows.append(
                {
                    "full_path": f"{number % 100:02d}/{number}_{image}.jpg",
                    "identity": f"name:person {number}",
                    "gender": gender,
                    "age": min(100, age + image),
                }
            )
    table = pd.DataFrame(rows)
    return table.sample(frac=1, random_state=0).reset_index(drop=True)  # order must not matter


def test_sizes(records):
    assert len(records) == 600 and records["identity"].nunique() == 400


def test_every_image_gets_a_split(records):
    split_of = assign_splits(records, FRACTIONS, 10, seed=42)
    assert split_of.notna().all()
    assert set(split_of) == set(SPLITS)
    assert list(split_of.index) == list(records.index)


def test_no_identity_in_two_splits(records):
    split_of = assign_splits(records, FRACTIONS, 10, seed=42)
    assert (records.assign(split=split_of).groupby("identity")["split"].nunique() == 1).all()


def test_split_sizes_follow_the_fractions(records):
    shares = assign_splits(records, FRACTIONS, 10, seed=42).value_counts(normalize=True)
    for name, fraction in FRACTIONS.items():
        assert shares[name] == pytest.approx(fraction, abs=0.04)


def test_other_fractions(records):
    fractions = {"train": 0.5, "val": 0.25, "test": 0.25}
    shares = assign_splits(records, fractions, 10, seed=3).value_counts(normalize=True)
    for name, fraction in fractions.items():
        assert shares[name] == pytest.approx(fraction, abs=0.05)


def test_gender_share_is_kept_in_each_split(records):
    split_of = assign_splits(records, FRACTIONS, 10, seed=42)
    overall = records["gender"].mean()
    for name in SPLITS:
        assert records.loc[split_of == name, "gender"].mean() == pytest.approx(overall, abs=0.07)


def test_same_seed_same_assignment_other_seed_another(records):
    first = assign_splits(records, FRACTIONS, 10, seed=42)
    assert first.equals(assign_splits(records, FRACTIONS, 10, seed=42))
    assert first.equals(
        assign_splits(records.iloc[::-1], FRACTIONS, 10, seed=42).loc[records.index]
    )
    other = assign_splits(records, FRACTIONS, 10, seed=7)
    assert not first.equals(other)
    assert (first != other).sum() > 50


def test_identity_strata_from_first_image_by_path():
    table = pd.DataFrame(
        {
            "full_path": ["b.jpg", "a.jpg", "c.jpg"],
            "identity": ["x", "x", "y"],
            "gender": [1, 0, 1],
            "age": [35, 19, 61],
        }
    )
    strata = identity_strata(table, 10)
    assert strata.to_dict() == {"x": "0_1", "y": "1_6"}


def test_split_metrics_counts():
    parts = {
        "train": pd.DataFrame(
            {"identity": ["a", "a", "b", "c"], "gender": [1, 1, 0, 1], "age": [20, 22, 30, 40]}
        ),
        "val": pd.DataFrame({"identity": ["d"], "gender": [0], "age": [50]}),
        "test": pd.DataFrame({"identity": [], "gender": [], "age": []}),
    }
    metrics = split_metrics(parts)
    assert metrics["train"] == {"images": 4, "identities": 3, "male_share": 0.75, "age_mean": 28.0}
    assert metrics["val"] == {"images": 1, "identities": 1, "male_share": 0.0, "age_mean": 50.0}
    assert metrics["test"] == {"images": 0, "identities": 0, "male_share": 0.0, "age_mean": 0.0}
