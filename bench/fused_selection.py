"""Choosing the fused model's design and age settings on validation only (issue 21).

For each `model.backbone` x `train.age_correction` x `train.age_pull` x `train.age_balance` of
the grid, `dvc exp run train` trains the model, then its answers on the val split's crops are
scored: the MAE, the MAE averaged over the decades of true age val holds (every age weighs the
same, as a user's faces are not wiki's mix) and the gender accuracy. The age choice is the
lowest decade-averaged val MAE; test and UTKFace are not read here. The workspace is restored
at the end (params.yaml, dvc.lock, metrics and the model: `dvc checkout`).

    python bench/fused_selection.py [--pulls 0 0.001 0.01 0.1 1] [--balances 0 0.5 1]
        [--backbones dlib_resnet+cydral_age dlib_resnet+cydral_age+cydral_gender]
        [--corrections none heads]
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def val_figures():
    """(val MAE, decade-averaged val MAE, val gender accuracy) of the model in the workspace."""
    from agegender.contracts.files import read_csv
    from agegender.contracts.labels import expected_age
    from agegender.contracts.layout import CROP_IMAGES, split_table
    from agegender.inference.predictor import Predictor

    val = read_csv(split_table("val"))
    outputs = Predictor.load().outputs_of_files([CROP_IMAGES / p for p in val["full_path"]])
    usable = ~np.isnan(outputs["age"]).any(axis=1)
    error = np.abs(expected_age(outputs["age"][usable]) - val["age"].to_numpy()[usable])
    decades = np.minimum(val["age"].to_numpy()[usable] // 10, 7)
    by_decade = [error[decades == d].mean() for d in np.unique(decades)]
    gender = outputs["gender"][usable].argmax(1) == val["gender"].to_numpy()[usable]
    return float(error.mean()), float(np.mean(by_decade)), float(gender.mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pulls", type=float, nargs="+", default=[0, 0.001, 0.01, 0.1, 1])
    parser.add_argument("--balances", type=float, nargs="+", default=[0, 0.5, 1])
    parser.add_argument("--backbones", nargs="+", default=[None], help="default: params.yaml's")
    parser.add_argument("--corrections", nargs="+", default=[None], help="default: params.yaml's")
    args = parser.parse_args()
    os.chdir(REPO)
    rows = []
    try:
        grid = itertools.product(args.backbones, args.corrections, args.pulls, args.balances)
        for backbone, correction, pull, balance in grid:
            command = ["dvc", "exp", "run", "train", "-S", f"train.age_pull={pull}"]
            command += ["-S", f"train.age_balance={balance}"]
            command += ["-S", f"model.backbone={backbone}"] if backbone else []
            command += ["-S", f"train.age_correction={correction}"] if correction else []
            subprocess.run(command, check=True, capture_output=True)
            train = json.loads(Path("metrics/train.json").read_text())
            mae, decade_mae, gender = val_figures()
            name = f"{backbone or '(params.yaml)'}, correction {correction or '(params.yaml)'}"
            rows.append((name, pull, balance, mae, decade_mae, gender, train["epochs_run"]))
            print(f"{name}, pull {pull} balance {balance}: val MAE {mae:.3f}, by decade "
                  f"{decade_mae:.3f}, gender {gender:.3f}", file=sys.stderr)  # fmt: skip
    finally:
        subprocess.run(["git", "checkout", "params.yaml", "dvc.lock", "metrics/"], check=True)
        subprocess.run(["dvc", "checkout", "-q"], check=False)
    print(
        "| backbone, age_correction | age_pull | age_balance | val MAE | val MAE by decade "
        "| val gender | epochs |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    best = min(rows, key=lambda row: row[4])
    for row in rows:
        mark = " (lowest by decade)" if row is best else ""
        print(f"| {row[0]} | {row[1]}{mark} | {row[2]} | {row[3]:.3f} | {row[4]:.3f} | "
              f"{row[5]:.3f} | {row[6]} |")  # fmt: skip


if __name__ == "__main__":
    main()
