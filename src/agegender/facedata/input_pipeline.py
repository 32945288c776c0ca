"""The tf.data input pipeline: split table -> batches of (image, one-hot labels)."""

from pathlib import Path

import tensorflow as tf

from agegender.contracts.labels import TASKS, label_indices


def image_dataset(
    table,
    image_dir,
    input_size,
    batch_size,
    shuffle_seed=None,
    flip=False,
    cache=False,
    gender_weights=None,
):
    """Decode in parallel but in a fixed order, so a seed gives the same batches every run.
    `cache` keeps the decoded images in memory after the first epoch; `flip` mirrors every image;
    `gender_weights` (one per class) adds per-sample loss weights."""
    paths = [str(Path(image_dir) / path) for path in table["full_path"]]
    labels = label_indices(table)
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))

    def load(path, label):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        image = tf.image.resize(image, (input_size, input_size))
        if flip:
            image = tf.image.flip_left_right(image)
        one_hot = {task: tf.one_hot(label[task], classes) for task, classes in TASKS.items()}
        if gender_weights is None:
            return image, one_hot
        weights = {
            "gender": tf.gather(tf.constant(gender_weights, tf.float32), label["gender"]),
            "age": tf.constant(1.0),
        }
        return image, one_hot, weights

    def shuffled(dataset):
        if shuffle_seed is None:
            return dataset
        return dataset.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)

    if cache:  # decode once, then shuffle the decoded images held in memory
        dataset = shuffled(
            dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).cache()
        )
    else:  # shuffle the paths, a small buffer, then decode
        dataset = shuffled(dataset).map(
            load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
