"""How the age range is made, chosen on the validation split alone: three split-conformal
scores, each calibrated on one random half of the validation faces and measured on the other
half (200 random halvings, seed 0), at the level of params.yaml (evaluate.age_range_level).

  fixed         : expected age +/- q                      (q: quantile of |age - expected|)
  scaled        : expected age +/- q * spread             (spread: sd of the age distribution)
  distribution  : the distribution's central interval, widened by q years on each side
                  (conformalized quantile regression; what agegender.inference.age_range does)

Prints the coverage overall and per bin of true age and the mean width: the narrowest range
whose coverage holds evenly across bins is the one to keep. Run from the repository root after
`dvc repro` (the model of models/model.keras, without its calibration):

    python bench/age_range.py [--halvings 200]
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from agegender.contracts.files import read_csv
from agegender.contracts.labels import AGES, age_bin, bin_labels, expected_age
from agegender.contracts.layout import CROP_IMAGES, MODEL, WEIGHTS, split_table
from agegender.contracts.params import load_params
from agegender.inference.age_range import distribution_interval
from agegender.inference.predictor import Predictor

EDGES = [0, 20, 30, 40, 50, 60]


def conformal_quantile(scores, level):
    rank = int(np.ceil((len(scores) + 1) * level))
    return np.sort(scores)[min(rank, len(scores)) - 1]


def ranges_of(method, ages, probs, calibrate, apply, level):
    """(low, high) for the faces `apply`, calibrated on the faces `calibrate`."""
    centre = expected_age(probs)
    spread = np.sqrt((probs * (AGES[None, :] - centre[:, None]) ** 2).sum(axis=1))
    spread = np.maximum(spread, 1.0)
    low, high = distribution_interval(probs, level)
    if method == "fixed":
        q = conformal_quantile(np.abs(ages - centre)[calibrate], level)
        return centre[apply] - q, centre[apply] + q
    if method == "scaled":
        q = conformal_quantile((np.abs(ages - centre) / spread)[calibrate], level)
        return centre[apply] - q * spread[apply], centre[apply] + q * spread[apply]
    q = conformal_quantile(np.maximum(low - ages, ages - high)[calibrate], level)
    return low[apply] - q, high[apply] + q


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--halvings", type=int, default=200)
    args = parser.parse_args()
    params = load_params()
    level = params["evaluate"]["age_range_level"]
    predictor = Predictor.load(MODEL, params, WEIGHTS, with_age_range=False)
    val = read_csv(split_table("val"))
    outputs = predictor.outputs_of_files([CROP_IMAGES / path for path in val["full_path"]])
    found = ~np.isnan(outputs["gender"]).any(axis=1)
    ages, probs = val["age"].to_numpy(float)[found], outputs["age"][found]
    bins = age_bin(ages, EDGES)
    rng = np.random.default_rng(0)
    print(f"{len(ages)} validation faces, level {level}, {args.halvings} halvings")
    labels = bin_labels(EDGES)
    print(f"{'method':<13} {'coverage':>8} {'width':>6}  " + " ".join(f"{b:>6}" for b in labels))
    for method in ("fixed", "scaled", "distribution"):
        rows = []
        for _ in range(args.halvings):
            order = rng.permutation(len(ages))
            calibrate, apply = order[: len(ages) // 2], order[len(ages) // 2 :]
            low, high = ranges_of(method, ages, probs, calibrate, apply, level)
            low, high = np.clip(low, 0, 100), np.clip(high, 0, 100)
            inside = (low <= ages[apply]) & (ages[apply] <= high)
            by_bin = [
                inside[bins[apply] == b].mean() if (bins[apply] == b).any() else np.nan
                for b in range(len(EDGES))
            ]
            rows.append([inside.mean(), (high - low).mean(), *by_bin])
        mean = np.nanmean(np.array(rows), axis=0)
        print(
            f"{method:<13} {mean[0]:>8.3f} {mean[1]:>6.1f}  "
            + " ".join(f"{value:>6.3f}" for value in mean[2:])
        )


if __name__ == "__main__":
    main()
