"""The tf.data input pipeline: split table -> batches of (image, one-hot labels)."""
from pathlib import Path

import numpy as np
import tensorflow as tf

from agegender.model import TASKS


def labels_of(table):
    return {
        "gender": np.asarray(table["gender"], dtype=np.int32),
        "age": np.clip(np.asarray(table["age"], dtype=np.int32), 0, TASKS["age"] - 1),
    }


def image_dataset(table, image_dir, input_size, batch_size, shuffle_seed=None):
    """Decode in parallel but in a fixed order, so a seed gives the same batches every run."""
    paths = [str(Path(image_dir) / path) for path in table["full_path"]]
    labels = labels_of(table)
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)

    def load(path, label):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        image = tf.image.resize(image, (input_size, input_size))
        one_hot = {task: tf.one_hot(label[task], classes) for task, classes in TASKS.items()}
        return image, one_hot

    return (
        dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
