"""Stage features: run the frozen backbone once over the splits, so head training never
touches an image.

A Keras backbone (VGG16, ...): its frozen part over train (and train's mirror images when
augmentation flips) and val; its weights are saved beside the features, so train rebuilds
exactly the network that made the cache. dlib's face-recognition network (`dlib_resnet`): the
128-D descriptor of every crop of train (and mirrors), val and test, so evaluate reads the
test descriptors from here too; faces whose landmarks can't be found are counted and left out.
"""
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pandas as pd

from agegender.data import image_dataset
from agegender.errors import exits_cleanly
from agegender.features import save_features, write_manifest
from agegender.files import write_json
from agegender.model import build_networks
from agegender.params import load_params
from agegender.training import WEIGHTS_DIR, base_weights, network_settings
from agegender.tracking import stage_run

SPLIT_DIR = Path("data/split")
IMAGE_DIR = Path("data/crops/images")
OUT_DIR = Path("data/features")
METRICS = Path("metrics/features.json")


def read_split(name):
    return pd.read_csv(SPLIT_DIR / f"{name}.csv", keep_default_na=False, na_values=[""])


def keras_features(params, versions):
    """Outputs of the frozen part of a Keras backbone; returns the manifest's extra fields."""
    networks = build_networks(**network_settings(params), weights_file=base_weights(params["model"]["weights"]))
    for name, flip in versions:
        table = read_split(name.removesuffix("_flipped"))
        batches = image_dataset(table, IMAGE_DIR, params["train"]["input_size"], 64, flip=flip)
        save_features(OUT_DIR, name, networks.feature_extractor.predict(batches, verbose=0))
    networks.base.save_weights(OUT_DIR / "base.weights.h5")
    return {"shape": list(networks.feature_extractor.output.shape[1:]), "skipped": {}}


def descriptor_features(params, versions):
    """dlib descriptors of every split's crops, and of the test crops' mirror images, which the
    saved model reads beside them; a face is left out of its split when it or its mirror image
    has no landmarks, so the cached versions of a split stay row-aligned."""
    from agegender.face_descriptor import DESCRIPTOR_SIZE, crop_face_margin, encode_files

    margin, workers = crop_face_margin(params["crop"]), os.cpu_count() or 1
    versions = versions + [("test", False), ("test_flipped", True)]
    tables = {split: read_split(split) for split in ("train", "val", "test")}
    arrays = {}
    for name, flip in versions:
        paths = [IMAGE_DIR / path for path in tables[name.removesuffix("_flipped")]["full_path"]]
        arrays[name] = encode_files(paths, WEIGHTS_DIR, margin, flip=flip, workers=workers)
    skipped = {}
    for split, table in tables.items():
        names = [name for name in arrays if name.removesuffix("_flipped") == split]
        missing = np.logical_or.reduce([np.isnan(arrays[name]).any(axis=1) for name in names])
        skipped[split] = table["full_path"][missing].tolist()
        for name in names:
            save_features(OUT_DIR, name, arrays[name][~missing], exact=True)
    return {"shape": [DESCRIPTOR_SIZE], "skipped": skipped, "face_margin": margin,
            "extra_versions": ["test", "test_flipped"]}


@exits_cleanly
def main():
    params = load_params()
    section, seed, backbone = params["train"], params["seed"], params["model"]["backbone"]
    keras.utils.set_random_seed(seed)
    versions = [("train", False), ("val", False)] + ([("train_flipped", True)] if section["augment"]["flip"] else [])
    started = time.perf_counter()
    made = (descriptor_features if backbone == "dlib_resnet" else keras_features)(params, versions)
    seconds = time.perf_counter() - started
    names = [name for name, _ in versions] + made.pop("extra_versions", [])
    images = sum(len(read_split(name.removesuffix("_flipped"))) for name in names)
    write_manifest(OUT_DIR, {"versions": names, "backbone": backbone, "trainable_layers": section["trainable_layers"],
                             **made})
    metrics = {"images": images, "images_per_second": round(images / seconds, 2),
               "feature_size": int(np.prod(made["shape"])),
               "no_landmarks": {split: len(paths) for split, paths in made["skipped"].items()}}
    write_json(METRICS, metrics)
    logged = {**params["model"], "input_size": section["input_size"], "trainable_layers": section["trainable_layers"],
              "flip": section["augment"]["flip"], "seed": seed}
    with stage_run("features", logged, params["mlflow"]["experiment"]) as run:
        run.log_metrics(metrics)
    print(f"features: {images} images through the frozen {backbone} -> {made['shape']}, "
          f"{metrics['images_per_second']} images/s; no landmarks: {metrics['no_landmarks']}")


if __name__ == "__main__":
    main()
