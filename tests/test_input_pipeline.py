"""agegender.facedata.input_pipeline: the tf.data pipeline from a split table to batches
of images and labels."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytest.importorskip("tensorflow")

from agegender.contracts.labels import label_indices  # noqa: E402
from agegender.facedata.input_pipeline import image_dataset  # noqa: E402

SIZE = 32


@pytest.fixture
def crops(tmp_path):
    """Five flat-colour crops of various sizes, in folders as the crop stage writes them."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30), (200, 200, 200)]
    sizes = [(64, 64), (80, 60), (32, 32), (64, 64), (100, 100)]
    paths = []
    for index, (colour, size) in enumerate(zip(colours, sizes)):
        path = f"9{index}/{index}.jpg"
        (tmp_path / path).parent.mkdir()
        Image.new("RGB", size, colour).save(tmp_path / path, quality=100)
        paths.append(path)
    table = pd.DataFrame(
        {"full_path": paths, "gender": [1, 0, 1, 0, 1], "age": [20, 35, 0, 100, 120]}
    )
    return tmp_path, table, colours


@pytest.fixture
def halves(tmp_path):
    """Crops black on the left and white on the right, so a mirror image is easy to tell."""
    pixels = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    pixels[:, SIZE // 2 :] = 255
    paths = []
    for index in range(3):
        Image.fromarray(pixels).save(tmp_path / f"{index}.png")
        paths.append(f"{index}.png")
    return tmp_path, pd.DataFrame({"full_path": paths, "gender": [0, 1, 1], "age": [10, 20, 30]})


def batches(dataset):
    return [
        tuple(
            {k: v.numpy() for k, v in part.items()} if isinstance(part, dict) else part.numpy()
            for part in batch
        )
        for batch in dataset
    ]


def ages(dataset):
    return np.concatenate([batch[1]["age"].argmax(axis=1) for batch in batches(dataset)]).tolist()


def test_labels_are_clipped_to_the_age_classes():
    table = pd.DataFrame({"gender": [0, 1], "age": [-3, 140]})
    assert label_indices(table)["age"].tolist() == [0, 100]


def test_image_dataset_batches(crops):
    image_dir, table, colours = crops
    got = batches(image_dataset(table, image_dir, 64, batch_size=2))
    assert [len(batch) for batch in got] == [2, 2, 2]  # (images, labels): no weights asked for
    assert [images.shape for images, _ in got] == [(2, 64, 64, 3), (2, 64, 64, 3), (1, 64, 64, 3)]
    images = np.concatenate([b[0] for b in got])
    gender = np.concatenate([b[1]["gender"] for b in got])
    age = np.concatenate([b[1]["age"] for b in got])
    assert images.dtype == np.float32
    # 0..255, RGB, in table order
    assert np.abs(images.mean(axis=(1, 2)) - np.array(colours)).max() < 3
    assert gender.shape == (5, 2) and age.shape == (5, 101)
    assert gender.argmax(axis=1).tolist() == [1, 0, 1, 0, 1]
    assert age.argmax(axis=1).tolist() == [20, 35, 0, 100, 100]  # 120 clipped to the last class
    assert (age.sum(axis=1) == 1).all()


def test_image_dataset_order(crops):
    image_dir, table, _ = crops
    plain = image_dataset(table.iloc[:4], image_dir, SIZE, batch_size=3)
    assert ages(plain) == ages(plain) == [20, 35, 0, 100]
    first, second = (
        image_dataset(table, image_dir, SIZE, batch_size=2, shuffle_seed=5) for _ in range(2)
    )
    first_epochs, second_epochs = [ages(first), ages(first)], [ages(second), ages(second)]
    assert first_epochs == second_epochs  # same seed, same order, epoch by epoch
    assert sorted(first_epochs[0]) == [0, 20, 35, 100, 100]
    orders = {
        tuple(ages(image_dataset(table, image_dir, SIZE, batch_size=2, shuffle_seed=seed)))
        for seed in range(6)
    }
    assert len(orders) > 1  # the seed matters


def test_flip_mirrors_every_image(halves):
    image_dir, table = halves
    plain = np.concatenate(
        [b[0] for b in batches(image_dataset(table, image_dir, SIZE, batch_size=2))]
    )
    flipped = np.concatenate(
        [b[0] for b in batches(image_dataset(table, image_dir, SIZE, batch_size=2, flip=True))]
    )
    assert plain[:, :, 0].max() == 0 and plain[:, :, -1].min() == 255  # black left, white right
    np.testing.assert_array_equal(flipped, plain[:, :, ::-1])


def test_cache_keeps_the_decoded_images(crops):
    image_dir, table, _ = crops
    dataset = image_dataset(table, image_dir, SIZE, batch_size=2, cache=True)
    first = batches(dataset)
    for path in table["full_path"]:
        (image_dir / path).unlink()  # a second pass must not read the files again
    second = batches(dataset)
    assert len(first) == len(second) == 3
    for (images_a, labels_a), (images_b, labels_b) in zip(first, second):
        np.testing.assert_array_equal(images_a, images_b)
        np.testing.assert_array_equal(labels_a["age"], labels_b["age"])


def test_gender_weights_per_sample(crops):
    image_dir, table, _ = crops
    got = batches(image_dataset(table, image_dir, SIZE, batch_size=2, gender_weights=[2.0, 0.5]))
    assert all(len(batch) == 3 for batch in got)
    gender = np.concatenate([batch[1]["gender"].argmax(axis=1) for batch in got])
    weights = {
        task: np.concatenate([batch[2][task] for batch in got]) for task in ("gender", "age")
    }
    assert gender.tolist() == [1, 0, 1, 0, 1]
    np.testing.assert_array_equal(weights["gender"], [0.5, 2.0, 0.5, 2.0, 0.5])
    np.testing.assert_array_equal(weights["age"], np.ones(5))


def test_gender_weights_with_cache_and_shuffle_stay_with_their_rows(crops):
    image_dir, table, _ = crops
    dataset = image_dataset(
        table, image_dir, SIZE, batch_size=2, shuffle_seed=1, cache=True, gender_weights=[2.0, 0.5]
    )
    for _ in range(2):
        for _images, labels, weights in batches(dataset):
            np.testing.assert_array_equal(
                weights["gender"], np.where(labels["gender"].argmax(axis=1) == 0, 2.0, 0.5)
            )
