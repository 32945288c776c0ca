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
from agegender.features import keep_rows, write_features, write_manifest
from agegender.files import read_csv
from agegender.layout import CROP_IMAGES, FEATURES, WEIGHTS, split_table
from agegender.model import build_networks
from agegender.stage import stage
from agegender.training import base_weights, network_settings


def read_split(name):
    return read_csv(split_table(name))


def keras_features(params, versions):
    """Outputs of the frozen part of a Keras backbone, written batch by batch; returns the
    manifest's extra fields."""
    networks = build_networks(
        **network_settings(params), weights_file=base_weights(params["model"]["weights"])
    )
    extractor = networks.feature_extractor
    shape = tuple(extractor.output.shape[1:])
    for name, flip in versions:
        table = read_split(name.removesuffix("_flipped"))
        batches = image_dataset(
            table,
            CROP_IMAGES,
            params["train"]["input_size"],
            params["features"]["batch_size"],
            flip=flip,
        )
        outputs = (extractor.predict_on_batch(images) for images, _ in batches)
        write_features(FEATURES, name, outputs, len(table), shape)
    networks.base.save_weights(FEATURES / "base.weights.h5")
    return {"shape": list(shape), "skipped": {}}


def noting_missing(batches, missing):
    """The batches of descriptors as they come, marking in `missing` the rows without one."""
    start = 0
    for batch in batches:
        missing[start : start + len(batch)] |= np.isnan(batch).any(axis=1)
        start += len(batch)
        yield batch


def descriptor_features(params, versions):
    """dlib descriptors of every split's crops, and of the test crops' mirror images, which the
    saved model reads beside them; a face is left out of its split when it or its mirror image
    has no landmarks, so the cached versions of a split stay row-aligned. Each version streams
    to disk with its NaN rows, then is compacted to the faces kept, in chunks."""
    from agegender.face_descriptor import DESCRIPTOR_SIZE, crop_face_margin, encoded_batches

    margin, workers = crop_face_margin(params["crop"]), os.cpu_count() or 1
    versions = versions + [("test", False), ("test_flipped", True)]
    tables = {split: read_split(split) for split in ("train", "val", "test")}
    missing = {split: np.zeros(len(table), dtype=bool) for split, table in tables.items()}
    for name, flip in versions:
        split = name.removesuffix("_flipped")
        paths = [CROP_IMAGES / path for path in tables[split]["full_path"]]
        batches = encoded_batches(paths, WEIGHTS, margin, flip=flip, workers=workers)
        batches = noting_missing(batches, missing[split])
        write_features(FEATURES, f"{name}.all", batches, len(paths), (DESCRIPTOR_SIZE,), exact=True)
    for name, _ in versions:
        split = name.removesuffix("_flipped")
        keep_rows(FEATURES, f"{name}.all", name, ~missing[split])
    return {
        "shape": [DESCRIPTOR_SIZE],
        "skipped": {
            split: table["full_path"][missing[split]].tolist() for split, table in tables.items()
        },
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
