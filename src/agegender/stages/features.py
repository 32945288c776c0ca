"""Stage features: run the frozen part of the backbone once over train (and its mirror
images when augmentation flips) and val, so head training never touches an image.

The backbone's weights are saved beside the features: train rebuilds the network from them,
so the frozen part it saves is exactly the one that made the cache.
"""
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import pandas as pd

from agegender.data import image_dataset
from agegender.errors import exits_cleanly
from agegender.features import save_features, write_manifest
from agegender.files import write_json
from agegender.model import build_networks
from agegender.params import load_params
from agegender.training import base_weights, network_settings
from agegender.tracking import stage_run

SPLIT_DIR = Path("data/split")
IMAGE_DIR = Path("data/crops/images")
OUT_DIR = Path("data/features")
METRICS = Path("metrics/features.json")


@exits_cleanly
def main():
    params = load_params()
    section, seed = params["train"], params["seed"]
    keras.utils.set_random_seed(seed)
    networks = build_networks(**network_settings(params), weights_file=base_weights(params["model"]["weights"]))
    size = section["input_size"]
    versions = [("train", False), ("val", False)] + ([("train_flipped", True)] if section["augment"]["flip"] else [])
    started, images = time.perf_counter(), 0
    for name, flip in versions:
        table = pd.read_csv(SPLIT_DIR / f"{name.removesuffix('_flipped')}.csv", keep_default_na=False, na_values=[""])
        batches = image_dataset(table, IMAGE_DIR, size, 64, flip=flip)
        save_features(OUT_DIR, name, networks.feature_extractor.predict(batches, verbose=0))
        images += len(table)
    seconds = time.perf_counter() - started
    networks.base.save_weights(OUT_DIR / "base.weights.h5")
    shape = list(networks.feature_extractor.output.shape[1:])
    write_manifest(OUT_DIR, {"versions": [name for name, _ in versions], "shape": shape,
                             "backbone": params["model"]["backbone"], "trainable_layers": section["trainable_layers"]})
    metrics = {"images": images, "images_per_second": round(images / seconds, 2), "feature_size": int(pd.Series(shape).prod())}
    write_json(METRICS, metrics)
    with stage_run("features", {**params["model"], "input_size": size, "trainable_layers": section["trainable_layers"],
                                "flip": section["augment"]["flip"], "seed": seed}, params["mlflow"]["experiment"]) as run:
        run.log_metrics(metrics)
    print(f"features: {images} images through the frozen {params['model']['backbone']} -> {shape}, {metrics['images_per_second']} images/s")


if __name__ == "__main__":
    main()
