"""Images/second of the project's tf.data pipeline vs. a plain Python/Pillow generator.

Same files: the bundled sample's train split (data/split/train.csv, data/crops/images), all
read once beforehand so both sides find them in the OS page cache.

  pillow     : a generator that opens each file with Pillow, converts to RGB, resizes to the
               input size (bilinear, float32 like tf.image.resize), one-hot labels, and stacks
               numpy batches of 64;
  tf.data #1 : `input_pipeline.image_dataset(..., batch 64, cache=True)`, first full pass
               (parallel decode + resize, filling the in-memory cache);
  tf.data #2 : the second full pass over the same dataset object (served from the cache).
Each round times all three in that order (a new dataset object each round); medians of
--repeat rounds are printed.

Run from the repository root with the venv active:

    python bench/input_pipeline.py [--size 64] [--batch 64] [--repeat 3]
"""

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd
from PIL import Image

from agegender.contracts.labels import label_indices
from agegender.facedata.input_pipeline import image_dataset
from agegender.nets.model import TASKS

REPO = Path(__file__).resolve().parents[1]
IMAGE_DIR = Path("data/crops/images")


def pillow_batches(table, size, batch):
    paths = [IMAGE_DIR / path for path in table["full_path"]]
    labels = label_indices(table)
    for start in range(0, len(paths), batch):
        images = [
            np.asarray(
                Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR),
                dtype=np.float32,
            )
            for path in paths[start : start + batch]
        ]
        one_hot = {
            task: np.eye(TASKS[task], dtype=np.float32)[values[start : start + batch]]
            for task, values in labels.items()
        }
        yield np.stack(images), one_hot


def timed_pass(batches):
    started, count = time.perf_counter(), 0
    for images, *_ in batches:
        count += int(images.shape[0])
    return count, time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds of all three; medians reported"
    )
    args = parser.parse_args()

    os.chdir(REPO)
    table = pd.read_csv("data/split/train.csv", keep_default_na=False, na_values=[""])
    for path in table["full_path"]:  # warm the OS page cache for both sides
        (IMAGE_DIR / path).read_bytes()

    runs = {"pillow": [], "first": [], "second": []}
    for _ in range(args.repeat):  # fresh dataset objects each time, medians reported
        runs["pillow"].append(timed_pass(pillow_batches(table, args.size, args.batch)))
        dataset = image_dataset(table, IMAGE_DIR, args.size, args.batch, cache=True)
        runs["first"].append(timed_pass(dataset))
        runs["second"].append(timed_pass(dataset))
    median = {
        key: (values[0][0], float(np.median([seconds for _, seconds in values])))
        for key, values in runs.items()
    }
    pillow, first, second = median["pillow"], median["first"], median["second"]

    rate = {
        name: count / seconds
        for name, (count, seconds) in {"pillow": pillow, "first": first, "second": second}.items()
    }
    print(
        f"{len(table)} images ({args.size} px JPEG crops resized to {args.size} px), "
        f"batch {args.batch}, {os.cpu_count()} CPU cores, median of {args.repeat} rounds"
    )
    print(f"{'method':<44}{'seconds':>9}{'images/s':>11}{'vs pillow':>11}")
    rows = [
        ("plain Pillow generator", pillow, "pillow"),
        ("tf.data image_dataset, pass 1 (decode)", first, "first"),
        ("tf.data image_dataset, pass 2 (cache=True)", second, "second"),
    ]
    for label, (_count, seconds), key in rows:
        print(f"{label:<44}{seconds:>9.3f}{rate[key]:>11.0f}{rate[key] / rate['pillow']:>10.2f}x")


if __name__ == "__main__":
    main()
