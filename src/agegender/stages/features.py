"""Stage features: run the frozen backbone once over the splits, so head training never
touches an image.

The frozen part of the backbone over train (and train's mirror images when augmentation
flips) and val, in batches of `features.batch_size`; its weights are saved beside the features,
so train rebuilds exactly the network that made the cache. For dlib's face-recognition network
(`dlib_resnet`, rebuilt in Keras from dlib's own file) the network reads aligned face chips,
cut from each crop's 5-point landmarks in a thread while the network (on every core) runs;
faces whose landmarks can't be found are counted and left out.
"""

import os
import shutil
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from agegender.contracts.files import read_csv
from agegender.contracts.layout import CROP_IMAGES, FEATURES, WEIGHTS, split_table
from agegender.contracts.params import FACE_BACKBONES
from agegender.contracts.stage import stage
from agegender.facedata.input_pipeline import image_dataset
from agegender.nets.cydral_networks import network_files
from agegender.nets.feature_cache import keep_rows, write_features, write_manifest
from agegender.nets.model import build_networks
from agegender.nets.training import base_weights, network_settings


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


def chip_features(network, chip_chunks, batch_size, mirrored, missing):
    """Per chunk of (chips, usable), the network's features of the chips and, when `mirrored`
    is a list, of their mirror images (appended to it); rows without landmarks are NaN and
    marked in `missing`."""
    start = 0
    for chips, usable in chip_chunks:
        missing[start : start + len(chips)] |= ~usable
        start += len(chips)
        mirror = [] if mirrored is None else [(chips[:, :, ::-1], mirrored)]
        for images, out in [(chips, None), *mirror]:
            rows = np.concatenate(
                [
                    np.asarray(network.predict_on_batch(images[first : first + batch_size]))
                    for first in range(0, len(images), batch_size)
                ]
            ).astype(np.float32)
            rows[~usable] = np.nan
            if out is None:
                yield rows
            else:
                out.append(rows)


def face_features(params, versions):
    """Features of dlib's face network (in Keras; fused: and of Cydral's age network, side by
    side) for the aligned chip of every train and val crop, and of train's mirrored chips; a face
    without landmarks is left out of its split, so the cached versions of a split stay
    row-aligned. Each version streams to disk with its NaN rows, then is compacted to the faces
    kept, in chunks."""
    from agegender.facedata.face_chips import (
        MODEL_FILES,
        check_model_files,
        chip_batches,
        crop_face_margin,
    )

    check_model_files(WEIGHTS)
    cydral = network_files(WEIGHTS, params["model"]["backbone"])
    for path in filter(None, cydral.values()):
        # train rebuilds Cydral's networks from the cache's own copies
        FEATURES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, FEATURES / path.name)
    networks = build_networks(
        **network_settings(params), weights_file=WEIGHTS / MODEL_FILES["descriptor"][0], **cydral
    )
    network, shape = networks.feature_extractor, tuple(networks.feature_extractor.output.shape[1:])
    margin = crop_face_margin(params["crop"])
    tables = {split: read_split(split) for split in ("train", "val")}
    missing = {split: np.zeros(len(table), dtype=bool) for split, table in tables.items()}
    for split, table in tables.items():
        flip = f"{split}_flipped" in dict(versions)
        paths = [CROP_IMAGES / path for path in table["full_path"]]
        chunks = chip_batches(paths, WEIGHTS, margin, chunk=256)
        mirrored = [] if flip else None
        rows = chip_features(
            network, chunks, params["features"]["batch_size"], mirrored, missing[split]
        )
        write_features(FEATURES, f"{split}.all", rows, len(table), shape, exact=True)
        if flip:
            write_features(FEATURES, f"{split}_flipped.all", mirrored, len(table), shape, True)
    for name, _ in versions:
        split = name.removesuffix("_flipped")
        keep_rows(FEATURES, f"{name}.all", name, ~missing[split])
    networks.base.save_weights(FEATURES / "base.weights.h5")
    return {
        "shape": list(shape),
        "skipped": {
            split: table["full_path"][missing[split]].tolist() for split, table in tables.items()
        },
        "face_margin": margin,
    }


@stage("features")
def main(params, run):
    section, seed, backbone = params["train"], params["seed"], params["model"]["backbone"]
    keras.utils.set_random_seed(seed)
    versions = [("train", False), ("val", False)] + (
        [("train_flipped", True)] if section["augment"]["flip"] else []
    )
    started = time.perf_counter()
    made = (face_features if backbone in FACE_BACKBONES else keras_features)(params, versions)
    seconds = time.perf_counter() - started
    names = [name for name, _ in versions]
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
