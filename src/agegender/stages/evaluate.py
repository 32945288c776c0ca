"""Stage evaluate: the test split, reported as the reference design and the peers report,
with figures (PNG) and a one-page report (metrics/report.md); and how often the age ranges,
calibrated on the validation split, hold the true age here."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd

from agegender.contracts.files import read_csv, replace_atomically, write_csv
from agegender.contracts.labels import GENDERS, age_bin, bin_labels
from agegender.contracts.layout import (
    CROP_IMAGES,
    EXTERNAL_REPORT,
    FIGURES,
    HISTORY,
    MODEL,
    PREDICTIONS,
    REPORT,
    WEIGHTS,
    split_table,
)
from agegender.contracts.stage import stage
from agegender.evaluation import plots
from agegender.evaluation.metrics import (
    age_metrics,
    constant_age_baselines,
    gender_metrics,
    mean_age_baseline,
    per_age_bin,
    per_gender,
    rounded,
)
from agegender.evaluation.report import build_report
from agegender.facedata.input_pipeline import image_dataset
from agegender.inference.predictor import (
    AGE_DECIMALS,
    PROBABILITY_DECIMALS,
    Predictor,
    answer_columns,
    pretrained_predictor,
    takes_chips,
)


def predictions_table(test, outputs, edges):
    """One row per test image, the columns DVC's confusion and scatter plots read; the answers
    are predict's (`answer_columns`), to as many decimals."""
    labels = np.array(bin_labels(edges))
    answers = answer_columns(outputs, edges)
    return pd.DataFrame(
        {
            "full_path": test["full_path"].to_numpy(),
            "gender_true": np.array(GENDERS)[test["gender"].to_numpy()],
            "gender_pred": answers["gender"],
            "gender_confidence": np.round(answers["gender_prob"], PROBABILITY_DECIMALS),
            "age_true": test["age"].to_numpy(),
            "age_pred": np.round(answers["age"], AGE_DECIMALS),
            "age_range_low": answers["age_range"][:, 0],
            "age_range_high": answers["age_range"][:, 1],
            "age_bin_true": labels[age_bin(test["age"].to_numpy(), edges)],
            "age_bin_pred": answers["most_likely_age_bin"],
        }
    )


def pretrained_figures(test, outputs, edges, cs_years):
    """The headline figures of Cydral's networks alone on the test chips, as the external sets'
    are named."""
    gender = gender_metrics(test["gender"], outputs["gender"], 0.5)
    age = age_metrics(test["age"], outputs["age"], edges, cs_years)
    return {
        "gender_accuracy": gender["accuracy"],
        "age_mae": age["mae"],
        f"age_cs{cs_years}": age[f"cs{cs_years}"],
    }


def write_figures(predictions, by_bin, history, edges, train_mean_age):
    """The PNG figures, by title; each a pure function of a table."""
    labels = bin_labels(edges)
    return {
        "Gender confusion": plots.confusion_png(
            predictions,
            "gender_true",
            "gender_pred",
            GENDERS,
            FIGURES / "gender_confusion.png",
            "Gender",
        ),
        "Age-bin confusion": plots.confusion_png(
            predictions,
            "age_bin_true",
            "age_bin_pred",
            labels,
            FIGURES / "age_bin_confusion.png",
            "Age bin",
        ),
        "Predicted vs true age": plots.age_scatter_png(predictions, FIGURES / "age_scatter.png"),
        "MAE per age bin": plots.bin_mae_png(
            by_bin,
            FIGURES / "age_bin_mae.png",
            baseline=by_bin["baseline_mae"],
            baseline_label=f"always the training mean age, {train_mean_age:.1f}",
        ),
        "Training curves": plots.training_curves_png(history, FIGURES / "training_curves.png"),
    }


@stage("evaluate")
def main(params, run):
    section = params["evaluate"]
    edges, cs_years = section["age_bins"], section["cs_years"]
    train, test = read_csv(split_table("train")), read_csv(split_table("test"))
    split_size = len(test)
    predictor = Predictor.load(MODEL, params, WEIGHTS, section["batch_size"])
    alone = None
    if takes_chips(predictor.model):  # chips cut as predict cuts them; no landmarks: left out
        outputs = predictor.outputs_of_files([CROP_IMAGES / p for p in test["full_path"]])
        found = ~np.isnan(outputs["gender"]).any(axis=1)
        test = test[found].reset_index(drop=True)
        outputs = {task: values[found] for task, values in outputs.items()}
        pretrained = pretrained_predictor(predictor, WEIGHTS)
        if pretrained is not None:  # Cydral's networks alone on the same chips
            paths = [CROP_IMAGES / p for p in test["full_path"]]
            alone = pretrained_figures(test, pretrained.outputs_of_files(paths), edges, cs_years)
    else:
        size = predictor.model.input_shape[1]
        batches = image_dataset(test, CROP_IMAGES, size, section["batch_size"])
        outputs = predictor.outputs_of_batches(batches)

    age = age_metrics(test["age"], outputs["age"], edges, cs_years, outputs["age_range"])
    age["range_level"] = section["age_range_level"]
    age["mean_baseline_mae"] = mean_age_baseline(test["age"], train["age"].mean())
    age.update(constant_age_baselines(test["age"], train["age"], edges, cs_years))
    by_bin = per_age_bin(
        test["age"], outputs["age"], edges, train["age"].mean(), outputs["age_range"]
    )
    ranges_by_bin = by_bin.set_index("bin")[["range_coverage", "range_mean_width"]]
    metrics = rounded(
        {
            "test_images": len(test),
            "test_skipped_no_landmarks": split_size - len(test),
            "gender": gender_metrics(test["gender"], outputs["gender"], train["gender"].mean()),
            "age": age,
            "age_range_by_bin": ranges_by_bin.to_dict("index"),
            **({"pretrained_alone": alone} if alone else {}),
        }
    )
    predictions = predictions_table(test, outputs, edges)
    by_gender = per_gender(test["gender"], outputs["gender"], GENDERS)
    history = pd.read_csv(HISTORY) if HISTORY.exists() else pd.DataFrame()
    figures = write_figures(predictions, by_bin, history, edges, train["age"].mean())
    links = {title: path.relative_to(REPORT.parent).as_posix() for title, path in figures.items()}
    report = build_report(metrics, predictions, by_bin, by_gender, links, cs_years)
    if EXTERNAL_REPORT.exists():
        report += "\n" + EXTERNAL_REPORT.read_text(encoding="utf8").replace(
            "# External evaluation", "## External evaluation", 1
        )

    write_csv(PREDICTIONS, predictions)
    replace_atomically(REPORT, lambda tmp: tmp.write_text(report, encoding="utf8"))
    run.log_headline_metrics({"test": metrics})
    for path in [PREDICTIONS, REPORT, *figures.values()]:
        run.log_artifact(path, artifact_path="figures" if path.suffix == ".png" else None)
    gender = metrics["gender"]
    print(
        f"evaluate: gender accuracy {gender['accuracy']:.4f} "
        f"(majority {gender['majority_baseline']:.4f}), "
        f"age MAE {age['mae']:.2f} (mean baseline {age['mean_baseline_mae']:.2f}), "
        f"exact {age['exact_accuracy']:.4f}; report in {REPORT}"
    )
    return metrics


if __name__ == "__main__":
    main()
