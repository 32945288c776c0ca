"""The calibrate stage end to end: a tiny saved model (VGG16 at 32 px, untrained) on real sample
faces of a validation split writes the age range calibration beside the model, and the ranges
it gives hold the promised share of those faces; the test split is never read."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import install_model

from agegender.contracts.layout import AGE_RANGE, MODEL, WEIGHTS
from agegender.contracts.params import load_params
from agegender.inference.predictor import Predictor
from agegender.stages import calibrate

VAL_IMAGES = 40


@pytest.fixture
def val_inputs(project, tiny_image_model, sample_dir, monkeypatch):
    """A scratch project holding a model without a calibration and a validation split of real
    faces; no test split at all."""
    project(evaluate={"batch_size": 8, "age_range_level": 0.8})
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"calibrate-test-{id(monkeypatch)}")
    paths = sorted(p.relative_to(sample_dir).as_posix() for p in (sample_dir / "91").glob("*.jpg"))
    paths = paths[:VAL_IMAGES]
    ages = [int(p[-8:-4]) - int(p.split("_")[1][:4]) for p in paths]
    Path("data/split").mkdir(parents=True)
    genders = [index % 2 for index in range(len(paths))]
    table = pd.DataFrame({"full_path": paths, "gender": genders, "age": ages})
    table.to_csv("data/split/val.csv", index=False)
    Path("data/crops").mkdir(parents=True)
    Path("data/crops/images").symlink_to(sample_dir)
    install_model(tiny_image_model / "model.keras")
    AGE_RANGE.unlink()
    return ages


def test_calibrate_writes_ranges_that_hold_the_level_on_the_validation_faces(val_inputs):
    calibrate.main()
    calibration = json.loads(AGE_RANGE.read_text())
    metrics = json.loads(Path("metrics/calibrate.json").read_text())
    assert calibration["level"] == metrics["level"] == 0.8
    assert calibration["faces"] == metrics["val_faces"] == VAL_IMAGES
    assert metrics["widen_years"] == pytest.approx(calibration["widen_years"], abs=1e-6)
    # split conformal: at least ceil((n + 1) * level) of the n calibration faces are covered
    assert metrics["val_coverage"] >= np.ceil((VAL_IMAGES + 1) * 0.8) / VAL_IMAGES
    assert metrics["val_mean_width"] > 0

    predictor = Predictor.load(MODEL, load_params(), WEIGHTS)
    assert predictor.age_range == calibration
    paths = pd.read_csv("data/split/val.csv")["full_path"]
    answers = predictor.crops([Path("data/crops/images") / path for path in paths])
    ranges = [answer["age_range"] for answer in answers]
    inside = [low <= age <= high for (low, high), age in zip(ranges, val_inputs)]
    # the stage reads the crops through tf.data and the Python API through Pillow: their pixels,
    # so an untrained model's answers, differ by a hair, enough to move one face over an edge
    assert abs(np.mean(inside) - metrics["val_coverage"]) <= 1 / VAL_IMAGES
    assert np.mean(inside) >= 0.8


def test_a_model_without_calibration_is_refused_by_the_tools(val_inputs):
    from agegender.contracts.errors import PipelineError

    with pytest.raises(PipelineError, match="age_range.json not found.*dvc repro calibrate"):
        Predictor.load(MODEL, load_params(), WEIGHTS)
