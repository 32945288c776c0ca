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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from agegender.data import image_dataset
from agegender.features import save_features, write_manifest
from agegender.files import read_csv
from agegender.layout import CROP_IMAGES, FEATURES, WEIGHTS, split_table
from agegender.model import build_networks
from agegender.stage import stage
from agegender.training import base_weights, network_settings


def read_split(name):
    return read_csv(split_table(name))


def keras_features(params, versions):
    """Outputs of the frozen part of a Keras backbone; returns the manifest's extra fields."""
    networks = build_networks(
        **network_settings(params), weights_file=base_weights(params["model"]["weights"])
    )
    for name, flip in versions:
        table = read_split(name.removesuffix("_flipped"))
        batches = image_dataset(
            table,
            CROP_IMAGES,
            params["train"]["input_size"],
            params["features"]["batch_size"],
            flip=flip,
        )
        save_features(FEATURES, name, networks.feature_extractor.predict(batches, verbose=0))
    networks.base.save_weights(FEATURES / "base.weights.h5")
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
        paths = [CROP_IMAGES / path for path in tables[name.removesuffix("_flipped")]["full_path"]]
        arrays[name] = encode_files(paths, WEIGHTS, margin, flip=flip, workers=workers)
    skipped = {}
    for split, table in tables.items():
        names = [name for name in arrays if name.removesuffix("_flipped") == split]
        missing = np.logical_or.reduce([np.isnan(arrays[name]).any(axis=1) for name in names])
        skipped[split] = table["full_path"][missing].tolist()
        for name in names:
            save_features(FEATURES, name, arrays[name][~missing], exact=True)
    return {
        "shape": [DESCRIPTOR_SIZE],
        "skipped": skipped,
        "face_margin": margin,
        "extra_versions": ["test", "test_flipped"],
    }


@stage("features")
def main(params, run):
    section, seed, backbone = params["train"], params["seed"], params["model"]["backbone"]
    keras.utils.set_random_seed(seed)
    versions = [("train", False), ("val", False)] + (
        [("train_flipped", True)] if section["augment"]["flip"] else []
    )
    started = time.perf_counter()
    made = (descriptor_features if backbone == "dlib_resnet" else keras_features)(params, versions)
    seconds = time.perf_counter() - started
    names = [name for name, _ in versions] + made.pop("extra_versions", [])
    images = sum(len(read_split(name.removesuffix("_flipped"))) for name in names)
    write_manifest(
        FEATURES,
        {
            "versions": names,
            "backbone": backbone,
            "trainable_layers": section["trainable_layers"],
            **made,
        },
    )
    speed = round(images / seconds, 2)
    run.log_metrics({"images_per_second": speed, "seconds": round(seconds, 1)})
    metrics = {
        "images": images,
        "feature_size": int(np.prod(made["shape"])),
        "no_landmarks": {split: len(paths) for split, paths in made["skipped"].items()},
    }
    print(
        f"features: {images} images through the frozen {backbone} -> {made['shape']}, "
        f"{speed} images/s; no landmarks: {metrics['no_landmarks']}"
    )
    return metrics


if __name__ == "__main__":
    main()
