"""Stage evaluate: the test split, reported as the reference design and the peers report."""
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd

from agegender.data import image_dataset
from agegender.errors import exits_cleanly
from agegender.files import write_csv, write_json
from agegender.metrics import age_bin, age_metrics, bin_labels, bin_probabilities, gender_metrics, mean_age_baseline
from agegender.model import load_model
from agegender.params import load_params
from agegender.tracking import stage_run

SPLIT_DIR = Path("data/split")
IMAGE_DIR = Path("data/crops/images")
MODEL = Path("models/model.keras")
METRICS = Path("metrics/evaluate.json")
PREDICTIONS = Path("metrics/predictions.csv")
GENDERS = np.array(["female", "male"])


def predictions_table(test, outputs, edges):
    """One row per test image, the columns DVC's confusion and scatter plots read."""
    labels = np.array(bin_labels(edges))
    expected_age = outputs["age"] @ np.arange(outputs["age"].shape[1])
    return pd.DataFrame({
        "full_path": test["full_path"].to_numpy(),
        "gender_true": GENDERS[test["gender"].to_numpy()],
        "gender_pred": GENDERS[outputs["gender"].argmax(axis=1)],
        "age_true": test["age"].to_numpy(),
        "age_pred": np.round(expected_age, 2),
        "age_bin_true": labels[age_bin(test["age"].to_numpy(), edges)],
        "age_bin_pred": labels[bin_probabilities(outputs["age"], edges).argmax(axis=1)],
    })


@exits_cleanly
def main():
    params = load_params()
    section = params["evaluate"]
    edges = section["age_bins"]
    train = pd.read_csv(SPLIT_DIR / "train.csv", keep_default_na=False, na_values=[""])
    test = pd.read_csv(SPLIT_DIR / "test.csv", keep_default_na=False, na_values=[""])
    model = load_model(MODEL)
    outputs = model.predict(image_dataset(test, IMAGE_DIR, model.input_shape[1], section["batch_size"]), verbose=0)
    outputs = {task: np.asarray(values, dtype=np.float64) for task, values in outputs.items()}
    age = age_metrics(test["age"], outputs["age"], edges, section["cs_years"])
    age["mean_baseline_mae"] = mean_age_baseline(test["age"], train["age"].mean())
    metrics = {
        "test_images": len(test),
        "gender": gender_metrics(test["gender"], outputs["gender"], train["gender"].mean()),
        "age": age,
    }
    metrics = {key: {k: round(v, 6) for k, v in value.items()} if isinstance(value, dict) else value for key, value in metrics.items()}
    write_json(METRICS, metrics)
    write_csv(PREDICTIONS, predictions_table(test, outputs, edges))
    with stage_run("evaluate", section, params["mlflow"]["experiment"]) as run:
        run.log_metrics(metrics)
        run.log_artifact(PREDICTIONS)
    print(f"evaluate: gender accuracy {metrics['gender']['accuracy']:.4f} (majority {metrics['gender']['majority_baseline']:.4f}), "
          f"age MAE {age['mae']:.2f} (mean baseline {age['mean_baseline_mae']:.2f}), exact {age['exact_accuracy']:.4f}")


if __name__ == "__main__":
    main()
