"""agegender.features: the feature cache, gender weights and the batches that read the cache."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from agegender.features import (  # noqa: E402
    FeatureBatches,
    gender_class_weights,
    gender_sample_weights,
    load_features,
    read_manifest,
    save_features,
    write_manifest,
)


def test_features_round_trip_as_float16(tmp_path):
    array = np.random.default_rng(0).uniform(0, 50, (7, 2, 2, 3)).astype(np.float32)
    save_features(tmp_path, "train", array)
    assert np.load(tmp_path / "train.npy").dtype == np.float16  # half the disk
    loaded = load_features(tmp_path, "train")
    assert loaded.dtype == np.float32 and loaded.shape == array.shape
    np.testing.assert_allclose(loaded, array, rtol=1e-3)
    assert not np.array_equal(loaded, array)  # really rounded to float16
    assert [p.name for p in tmp_path.iterdir()] == ["train.npy"]  # no temporary left behind


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_values_beyond_float16_are_stored_exactly(tmp_path):
    array = np.array([[1.5, 70000.0, 123456.789], [0.1, -1e6, 3.0]], dtype=np.float32)
    save_features(tmp_path, "val", array)
    assert np.load(tmp_path / "val.npy").dtype == np.float32
    np.testing.assert_array_equal(load_features(tmp_path, "val"), array)


def test_manifest_round_trip(tmp_path):
    manifest = {"versions": ["train", "val"], "shape": [4, 4, 512], "backbone": "vgg16"}
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest


def test_balanced_gender_weights_equalise_the_classes():
    genders = np.array([1] * 9 + [0] * 3)
    w = gender_class_weights(genders, "balanced")
    assert w[0] * 3 == pytest.approx(w[1] * 9)
    assert w[0] > 1 > w[1]
    assert (w * [3, 9]).sum() == pytest.approx(12)  # the mean weight stays 1
    np.testing.assert_array_equal(gender_sample_weights(genders, "balanced"), w[genders])


def test_no_gender_weighting_gives_ones():
    genders = np.array([1, 1, 1, 0])
    np.testing.assert_array_equal(gender_class_weights(genders, "none"), [1, 1])
    np.testing.assert_array_equal(gender_sample_weights(genders, "none"), np.ones(4))


def test_balanced_weights_with_one_gender_missing_stay_finite():
    w = gender_class_weights(np.ones(5, dtype=int), "balanced")
    assert np.isfinite(w).all() and w[1] == pytest.approx(0.5)


N, DIM = 11, 3


def cache(n=N):
    """Row i holds the value i everywhere (the flipped copy -i), so a batch row tells its origin."""
    features = np.repeat(np.arange(n, dtype=np.float32)[:, None], DIM, axis=1)
    labels = {
        "gender": keras.utils.to_categorical(np.arange(n) % 2, 2),
        "age": keras.utils.to_categorical(np.arange(n), 101),
    }
    weights = {"gender": np.arange(n, dtype=np.float32) + 100, "age": np.ones(n, dtype=np.float32)}
    return features, labels, weights


def epoch(batches):
    return [batches[i] for i in range(len(batches))]


def rows_of(batch):
    x, y, w = batch
    return y["age"].argmax(axis=1)


def test_every_row_once_per_epoch_in_a_new_order():
    batches = FeatureBatches(*cache(), batch_size=4, seed=7)
    assert len(batches) == 3
    first = np.concatenate([rows_of(b) for b in epoch(batches)])
    assert sorted(first) == list(range(N))
    assert [len(rows_of(b)) for b in epoch(batches)] == [4, 4, 3]
    batches.on_epoch_end()
    second = np.concatenate([rows_of(b) for b in epoch(batches)])
    assert sorted(second) == list(range(N))
    assert first.tolist() != second.tolist()


def two_epochs(batches):
    orders = []
    for _ in range(2):
        orders.append(np.concatenate([rows_of(b) for b in epoch(batches)]).tolist())
        batches.on_epoch_end()
    return orders


def test_same_seed_same_order():
    first, second = (two_epochs(FeatureBatches(*cache(), batch_size=4, seed=3)) for _ in range(2))
    assert first == second
    assert two_epochs(FeatureBatches(*cache(), batch_size=4, seed=4)) != first


def test_batches_keep_x_labels_and_weights_together():
    features, labels, weights = cache()
    for x, y, w in epoch(FeatureBatches(features, labels, weights, batch_size=4, seed=1)):
        rows = y["age"].argmax(axis=1)
        assert set(y) == set(w) == {"gender", "age"}
        np.testing.assert_array_equal(x, features[rows])
        np.testing.assert_array_equal(y["gender"], labels["gender"][rows])
        np.testing.assert_array_equal(w["gender"], rows + 100)
        np.testing.assert_array_equal(w["age"], np.ones(len(rows)))


def test_flipped_rows_come_from_one_copy_or_the_other():
    features, labels, weights = cache(64)
    flipped = -features
    batches = FeatureBatches(features, labels, weights, batch_size=16, seed=2, flipped=flipped)
    seen = []
    for _ in range(2):
        for x, y, _ in epoch(batches):
            rows = y["age"].argmax(axis=1)
            from_original = (x == features[rows]).all(axis=1)
            from_flipped = (x == flipped[rows]).all(axis=1)
            assert (from_original | from_flipped).all()  # whole rows, never a mix of the two
            seen.append(from_flipped[rows != 0])  # row 0 is the same in both
        batches.on_epoch_end()
    seen = np.concatenate(seen)
    assert 0.2 < seen.mean() < 0.8  # both copies occur, about half each


def test_keras_fit_reads_the_sample_weights():
    inputs = keras.Input((DIM,))
    outputs = {
        task: keras.layers.Dense(classes, activation="softmax", name=task)(inputs)
        for task, classes in (("gender", 2), ("age", 101))
    }
    model = keras.Model(inputs, outputs)
    model.compile(
        "adam", loss={"gender": "categorical_crossentropy", "age": "categorical_crossentropy"}
    )
    features, labels, weights = cache()
    weights["gender"] = np.zeros(N, dtype=np.float32)
    history = model.fit(
        FeatureBatches(features, labels, weights, batch_size=4, seed=0), epochs=1, verbose=0
    )
    assert history.history["gender_loss"] == [0.0]
    assert history.history["age_loss"][0] > 0
