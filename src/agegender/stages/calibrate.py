"""Stage calibrate: the age range every answer carries, fitted on the validation split.

The trained model answers the validation faces through the same inference path as predict;
split conformal prediction turns their errors into the years by which each answer's own
interval is widened so that the range holds the true age with probability
`evaluate.age_range_level`. The test split is never looked at here:
the evaluate stage measures how often the range holds there."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from agegender.contracts.files import read_csv, write_json
from agegender.contracts.layout import AGE_RANGE, CROP_IMAGES, MODEL, WEIGHTS, split_table
from agegender.contracts.stage import stage
from agegender.facedata.input_pipeline import image_dataset
from agegender.inference.age_range import age_ranges, fit_age_range
from agegender.inference.predictor import Predictor, takes_chips


def validation_outputs(predictor, table, batch_size):
    """The model's outputs on the validation faces, and the faces scored (chip models leave out
    faces without landmarks, as evaluate does on the test split)."""
    if takes_chips(predictor.model):
        outputs = predictor.outputs_of_files([CROP_IMAGES / p for p in table["full_path"]])
        found = ~np.isnan(outputs["gender"]).any(axis=1)
        return {task: values[found] for task, values in outputs.items()}, table[found]
    size = predictor.model.input_shape[1]
    batches = image_dataset(table, CROP_IMAGES, size, batch_size)
    return predictor.outputs_of_batches(batches), table


@stage("calibrate")
def main(params, run):
    section = params["evaluate"]
    level = section["age_range_level"]
    predictor = Predictor.load(MODEL, params, WEIGHTS, section["batch_size"], with_age_range=False)
    outputs, val = validation_outputs(
        predictor, read_csv(split_table("val")), section["batch_size"]
    )
    calibration = fit_age_range(val["age"], outputs["age"], level)
    ranges = age_ranges(outputs["age"], calibration)
    ages = val["age"].to_numpy()
    write_json(AGE_RANGE, calibration)
    run.log_artifact(AGE_RANGE)
    metrics = {
        "level": level,
        "widen_years": round(calibration["widen_years"], 6),
        "val_faces": calibration["faces"],
        "val_coverage": round(float(((ranges[:, 0] <= ages) & (ages <= ranges[:, 1])).mean()), 6),
        "val_mean_width": round(float((ranges[:, 1] - ranges[:, 0]).mean()), 4),
    }
    print(
        f"calibrate: {level:.0%} age range = the answer's central {level:.0%} ages, widened by "
        f"{calibration['widen_years']:+.1f} years, from {len(val)} validation faces "
        f"(mean width {metrics['val_mean_width']:.1f} years); in {AGE_RANGE}"
    )
    return metrics


if __name__ == "__main__":
    main()
