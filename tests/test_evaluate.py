"""The evaluate stage end to end: a tiny saved model (VGG16 at 32 px, untrained) on real sample
faces writes the metrics, predictions, report and figures, the same again on a re-run, and logs
the figures and report to MLflow."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import install_model, with_age_range

from agegender.contracts.labels import bin_labels
from agegender.contracts.params import load_params
from agegender.stages import evaluate

TEST_IMAGES = 12
FIGURES = {
    "gender_confusion.png": (640, 480),
    "age_bin_confusion.png": (640, 480),
    "age_scatter.png": (640, 480),
    "age_bin_mae.png": (640, 480),
    "training_curves.png": (960, 640),
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from agegender.nets.model import build_networks

    path = tmp_path_factory.mktemp("evaluate") / "model.keras"
    build_networks(32, head_units=(8,), trainable_layers=0).image_model.save(path)
    return with_age_range(path)


def split_table(paths):
    """Rows as the split stage writes them; ages from the file names
    (<id>_<born>_<photo year>.jpg)."""
    ages = [
        int(re.search(r"_(\d{4})\.jpg$", p).group(1)) - int(re.search(r"_(\d{4})-", p).group(1))
        for p in paths
    ]
    return pd.DataFrame(
        {"full_path": paths, "gender": [i % 2 for i in range(len(paths))], "age": ages}
    )


@pytest.fixture
def stage_inputs(project, tiny_model, sample_dir, monkeypatch):
    """The inputs of the evaluate stage in a scratch project; returns the project root."""
    project(evaluate={"batch_size": 8})
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"evaluate-test-{id(monkeypatch)}")
    paths = sorted(p.relative_to(sample_dir).as_posix() for p in (sample_dir / "90").glob("*.jpg"))
    Path("data/split").mkdir(parents=True)
    split_table(paths[TEST_IMAGES : TEST_IMAGES + 40]).to_csv("data/split/train.csv", index=False)
    split_table(paths[:TEST_IMAGES]).to_csv("data/split/test.csv", index=False)
    Path("data/crops").mkdir(parents=True)
    Path("data/crops/images").symlink_to(sample_dir)
    Path("models").mkdir()
    install_model(tiny_model)
    Path("metrics").mkdir()
    pd.DataFrame(
        {
            "epoch": [0, 1],
            "loss": [5.0, 4.5],
            "val_loss": [5.1, 4.9],
            "gender_accuracy": [0.6, 0.7],
            "val_gender_accuracy": [0.55, 0.6],
        }
    ).to_csv("metrics/train_history.csv", index=False)
    return Path.cwd()


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_evaluate_writes_report_figures_and_logs_them(stage_inputs):
    import mlflow

    evaluate.main()
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    assert metrics["test_images"] == TEST_IMAGES
    assert set(metrics["age"]) >= {
        "mae",
        "cs5",
        "exact_accuracy",
        "bin_accuracy",
        "mean_baseline_mae",
        "mean_baseline_cs5",
        "mode_baseline_exact",
        "majority_bin_baseline",
        "range_coverage",
        "range_mean_width",
    }
    assert metrics["age"]["range_level"] == 0.9
    predictions = pd.read_csv("metrics/predictions.csv")
    assert len(predictions) == TEST_IMAGES
    inside = predictions["age_range_low"].le(predictions["age_true"]) & predictions["age_true"].le(
        predictions["age_range_high"]
    )
    assert metrics["age"]["range_coverage"] == pytest.approx(inside.mean(), abs=1e-6)
    width = predictions["age_range_high"] - predictions["age_range_low"]
    assert metrics["age"]["range_mean_width"] == pytest.approx(width.mean(), abs=1e-3)
    by_bin = metrics["age_range_by_bin"]
    edges = load_params()["evaluate"]["age_bins"]
    assert list(by_bin) == bin_labels(edges)
    assert "age range coverage" in Path("metrics/report.md").read_text()
    assert predictions["gender_confidence"].between(0.5, 1).all()

    figures = Path("metrics/figures")
    assert sorted(p.name for p in figures.iterdir()) == sorted(FIGURES)
    for name, size in FIGURES.items():
        assert png_size(figures / name) == size, name

    report = Path("metrics/report.md").read_text()
    assert f"Test split: {TEST_IMAGES} images" in report
    assert (
        f"| Gender accuracy | {metrics['gender']['accuracy']:.2%} "
        f"| {metrics['gender']['majority_baseline']:.2%}" in report
    )
    worst = predictions.assign(error=(predictions.age_pred - predictions.age_true).abs()).nlargest(
        1, "error"
    )
    assert f"`{worst.full_path.iloc[0]}`" in report.split("## Largest age errors")[1]
    for name in FIGURES:
        assert f"(figures/{name})" in report

    run = mlflow.search_runs(
        experiment_names=[os.environ["MLFLOW_EXPERIMENT_NAME"]],
        filter_string="tags.stage = 'evaluate'",
        output_format="list",
    )[0]
    client = mlflow.MlflowClient()
    logged = {entry.path for entry in client.list_artifacts(run.info.run_id)}
    assert {"predictions.csv", "report.md", "figures"} <= logged
    assert {
        Path(entry.path).name for entry in client.list_artifacts(run.info.run_id, "figures")
    } == set(FIGURES)
    assert run.data.metrics["age.mae"] == pytest.approx(metrics["age"]["mae"])

    before = {path: path.read_bytes() for path in [Path("metrics/report.md"), *figures.iterdir()]}
    evaluate.main()
    for path, content in before.items():
        assert path.read_bytes() == content, f"{path} changed on a re-run"


def test_predictions_table_columns():
    test = split_table(["90/1_1980-01-01_2000.jpg", "90/2_1950-05-05_2010.jpg"])
    outputs = {"gender": np.array([[0.2, 0.8], [0.9, 0.1]]), "age": np.zeros((2, 101))}
    outputs["age"][0, 20], outputs["age"][1, 61] = 1, 1
    outputs["age_range"] = np.array([[12.0, 28.0], [53.0, 69.0]])
    table = evaluate.predictions_table(test, outputs, [0, 10, 20, 30, 40, 50, 60])
    assert list(table.columns) == [
        "full_path",
        "gender_true",
        "gender_pred",
        "gender_confidence",
        "age_true",
        "age_pred",
        "age_range_low",
        "age_range_high",
        "age_bin_true",
        "age_bin_pred",
    ]
    assert table.to_dict("records")[1] == {
        "full_path": "90/2_1950-05-05_2010.jpg",
        "gender_true": "male",
        "gender_pred": "female",
        "gender_confidence": 0.9,
        "age_true": 60,
        "age_pred": 61.0,
        "age_range_low": 53.0,
        "age_range_high": 69.0,
        "age_bin_true": "60+",
        "age_bin_pred": "60+",
    }
