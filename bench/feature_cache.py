"""Head training on cached features vs. running the frozen backbone every epoch.

Both sides train the same heads (the project's `build_networks`, VGG16 with random weights,
trainable_layers=0, so the whole backbone is frozen) on the same images of the bundled sample
(data/split/train.csv + data/crops/images, the first --images rows), same batch size, same
loss and optimizer (`compile_for_training` with params.yaml's train section, constant lr):

  cached : `feature_extractor.predict` once (the one-off cost is reported), then
           `head_model.fit` on `FeatureBatches` of those features (the train stage's way);
  images : `image_model.fit` on `image_dataset(...)` (decoded images held in memory with
           cache=True, so decoding is not what is measured), the frozen base runs every epoch.

Each side gets 1 untimed warm-up epoch, then --epochs timed ones. No flip/brightness.
Run from the repository root with the venv active:

    python bench/feature_cache.py [--images 1024] [--size 64] [--batch 32] [--epochs 2]
"""

import argparse
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore", message=".*shuffle=True.*")

import keras
import numpy as np
import pandas as pd
import yaml

from agegender.contracts.labels import label_indices
from agegender.facedata.input_pipeline import image_dataset
from agegender.nets.feature_cache import FeatureBatches
from agegender.nets.model import TASKS, build_networks
from agegender.nets.training import compile_for_training

REPO = Path(__file__).resolve().parents[1]


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.started)


def timed_fit(model, data, epochs):
    timer = EpochTimer()
    model.fit(data, epochs=1 + epochs, callbacks=[timer], verbose=0)
    return timer.seconds[1:]  # the first epoch (tracing, warm-up) is not counted


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    os.chdir(REPO)
    section = {
        **yaml.safe_load(Path("params.yaml").read_text())["train"],
        "lr_schedule": "constant",
    }
    table = pd.read_csv("data/split/train.csv", keep_default_na=False, na_values=[""]).head(
        args.images
    )
    one_hot = {
        task: keras.utils.to_categorical(v, TASKS[task]).astype(np.float32)
        for task, v in label_indices(table).items()
    }
    keras.utils.set_random_seed(0)
    net = build_networks(
        args.size,
        backbone="vgg16",
        weights_file=None,
        trainable_layers=0,
        head_units=section["head_units"],
        dropout=section["dropout"],
        seed=0,
    )

    started = time.perf_counter()
    features = net.feature_extractor.predict(
        image_dataset(table, "data/crops/images", args.size, 64), verbose=0
    )
    cache_seconds = time.perf_counter() - started

    # the train stage always passes weights
    ones = {task: np.ones(len(table), dtype=np.float32) for task in TASKS}
    batches = FeatureBatches(features, one_hot, ones, args.batch, seed=0)
    compile_for_training(
        net.head_model, section, section["lr"], len(batches), args.epochs + 1, False
    )
    cached = timed_fit(net.head_model, batches, args.epochs)

    images = image_dataset(
        table, "data/crops/images", args.size, args.batch, shuffle_seed=0, cache=True
    )
    compile_for_training(
        net.image_model, section, section["lr"], len(images), args.epochs + 1, False
    )
    uncached = timed_fit(net.image_model, images, args.epochs)

    per_cached, per_images = float(np.mean(cached)), float(np.mean(uncached))
    print(
        f"{len(table)} images, {args.size} px, VGG16 (random weights) frozen, batch {args.batch}, "
        f"features {tuple(features.shape[1:])}, {args.epochs} timed epochs after 1 warm-up"
    )
    print(f"{'method':<40}{'s/epoch':>10}{'images/s':>12}")
    rows = [
        ("cached features (head_model.fit)", per_cached),
        ("frozen base every epoch (image_model)", per_images),
        ("one-off feature cache (predict)", cache_seconds),
    ]
    for label, seconds in rows:
        print(f"{label:<40}{seconds:>10.3f}{len(table) / seconds:>12.0f}")
    break_even = cache_seconds / max(per_images - per_cached, 1e-9)
    print(
        f"speed-up per epoch: {per_images / per_cached:.1f}x; "
        f"the cache pays for itself after {break_even:.2f} epochs"
    )


if __name__ == "__main__":
    main()
