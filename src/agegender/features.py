"""The feature cache: outputs of the frozen part of the backbone, computed once per split.

Head training reads them instead of images, so a sweep over head or optimizer params does no
image work at all. Plain NumPy and Keras, so head training also runs under the JAX backend.
"""

import json
from pathlib import Path

import keras
import numpy as np

from agegender.files import replace_atomically, write_json


def save_features(directory, name, array, exact=False):
    """float16 halves the cache; float32 where values would overflow it, or where `exact`
    (face descriptors: predict computes them in float32 and must agree with evaluate)."""
    with np.errstate(over="ignore"):
        small = array.astype(np.float16)
    stored = small if np.isfinite(small).all() and not exact else array.astype(np.float32)
    replace_atomically(
        Path(directory) / f"{name}.npy", lambda tmp: np.save(open(tmp, "wb"), stored)
    )


def load_features(directory, name):
    return np.load(Path(directory) / f"{name}.npy").astype(np.float32)


def kept_rows(table, manifest, split):
    """The rows of a split table that have cached features (faces without landmarks are not)."""
    skipped = set(manifest.get("skipped", {}).get(split, []))
    return table[~table["full_path"].isin(skipped)].reset_index(drop=True)


def write_manifest(directory, manifest):
    write_json(Path(directory) / "features.json", manifest)


def read_manifest(directory):
    return json.loads((Path(directory) / "features.json").read_text())


def gender_class_weights(genders, weighting):
    """`balanced`: each gender weighs as much in the loss as the other, whatever the 3:1 skew."""
    genders = np.asarray(genders)
    if weighting == "none":
        return np.ones(2, dtype=np.float32)
    counts = np.bincount(genders, minlength=2).astype(np.float64)
    return (len(genders) / (2 * np.maximum(counts, 1))).astype(np.float32)


def gender_sample_weights(genders, weighting):
    return gender_class_weights(genders, weighting)[np.asarray(genders)]


class EpochSync(keras.callbacks.Callback):
    """Tells the batches which epoch starts, also the first one after a resume."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.set_epoch(epoch)


class FeatureBatches(keras.utils.PyDataset):
    """Shuffled batches of cached features; with flipped copies, each epoch draws for every
    image either the original or the mirrored one, the cached form of flip augmentation."""

    def __init__(self, features, labels, sample_weights, batch_size, seed, flipped=None, epoch=0):
        super().__init__()
        self.features, self.flipped, self.labels, self.sample_weights = (
            features,
            flipped,
            labels,
            sample_weights,
        )
        self.batch_size, self.seed = batch_size, seed
        self.set_epoch(epoch)

    def __len__(self):
        return -(-len(self.features) // self.batch_size)

    def set_epoch(self, epoch):
        """The order and the mirror draws depend on the epoch alone, so a resumed run sees the
        same batches as an uninterrupted one."""
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        self.order = rng.permutation(len(self.features))
        self.use_flipped = (
            rng.random(len(self.features)) < 0.5 if self.flipped is not None else None
        )

    def on_epoch_end(self):
        self.set_epoch(self.epoch + 1)

    def __getitem__(self, index):
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        x = self.features[rows]
        if self.use_flipped is not None:
            mirrored = self.use_flipped[rows].reshape((-1,) + (1,) * (x.ndim - 1))
            x = np.where(mirrored, self.flipped[rows], x)
        y = {task: values[rows] for task, values in self.labels.items()}
        weights = {task: values[rows] for task, values in self.sample_weights.items()}
        return x, y, weights
