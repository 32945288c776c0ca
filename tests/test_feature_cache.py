"""agegender.nets.feature_cache: the feature cache, gender weights and the
batches that read the cache."""

import tracemalloc

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from agegender.contracts.errors import PipelineError  # noqa: E402
from agegender.nets.feature_cache import (  # noqa: E402
    FeatureBatches,
    RowBatches,
    adapt_in_chunks,
    age_sample_weights,
    chunks,
    gender_class_weights,
    gender_sample_weights,
    keep_rows,
    load_features,
    read_manifest,
    save_features,
    write_features,
    write_manifest,
)


def test_features_round_trip_as_float16(tmp_path):
    array = np.random.default_rng(0).uniform(0, 50, (7, 2, 2, 3)).astype(np.float32)
    save_features(tmp_path, "train", array)
    assert np.load(tmp_path / "train.npy").dtype == np.float16  # half the disk, a plain .npy
    loaded = load_features(tmp_path, "train")
    assert loaded.dtype == np.float16 and loaded.shape == array.shape and len(loaded) == 7
    np.testing.assert_allclose(loaded[:], array, rtol=1e-3)
    assert not np.array_equal(loaded[:].astype(np.float32), array)  # really rounded to float16
    assert [p.name for p in tmp_path.iterdir()] == ["train.npy"]  # no temporary left behind


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_values_beyond_float16_are_stored_exactly(tmp_path):
    array = np.array([[1.5, 70000.0, 123456.789], [0.1, -1e6, 3.0]], dtype=np.float32)
    save_features(tmp_path, "val", array)
    assert np.load(tmp_path / "val.npy").dtype == np.float32
    np.testing.assert_array_equal(load_features(tmp_path, "val")[:], array)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_late_overflow_widens_the_rows_already_written(tmp_path):
    array = np.random.default_rng(1).uniform(-9, 9, (50, 4)).astype(np.float32)
    array[37, 2] = 1e6  # in the fourth batch of ten
    write_features(tmp_path, "train", (array[i : i + 10] for i in range(0, 50, 10)), 50, (4,))
    stored = np.load(tmp_path / "train.npy")
    assert stored.dtype == np.float32
    np.testing.assert_array_equal(stored[30:], array[30:])  # exact from the widening batch on
    np.testing.assert_array_equal(stored[:30], array[:30].astype(np.float16))  # as written
    assert [p.name for p in tmp_path.iterdir()] == ["train.npy"]


def test_an_interrupted_or_short_cache_leaves_no_file(tmp_path):
    def failing():
        yield np.ones((4, 3), np.float32)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_features(tmp_path, "train", failing(), 8, (3,))
    with pytest.raises(PipelineError, match="4 rows written of the 8"):
        write_features(tmp_path, "train", [np.ones((4, 3))], 8, (3,))
    with pytest.raises(PipelineError, match="does not fit"):
        write_features(tmp_path, "train", [np.ones((9, 3))], 8, (3,))
    assert list(tmp_path.iterdir()) == []


def test_rows_read_by_index_slice_and_order(tmp_path):
    array = np.arange(60, dtype=np.float32).reshape(20, 3)
    save_features(tmp_path, "val", array, exact=True)
    cached = load_features(tmp_path, "val")
    for key in (np.array([7, 2, 19, 2]), slice(3, 9), slice(None, None, 4), 5, -1, [4, 5, 6]):
        np.testing.assert_array_equal(cached[key], array[key])
    with pytest.raises(IndexError):
        cached[np.array([20])]
    with pytest.raises(PipelineError, match="run `dvc repro features`"):
        load_features(tmp_path, "missing")


def test_writing_and_reading_a_cache_takes_a_batch_of_memory(tmp_path):
    """64 MB through the cache in 1 MB batches: Python's allocations peak near two 8 MB chunks."""
    batch = np.random.default_rng(2).normal(size=(256, 1024)).astype(np.float32)
    tracemalloc.start()
    try:
        write_features(tmp_path, "train", (batch for _ in range(64)), 64 * 256, (1024,), True)
        cached = load_features(tmp_path, "train")
        batches = FeatureBatches(cached, {"age": np.zeros((len(cached), 1))}, None, 256, seed=0)
        total = sum(float(batches[index][0].sum()) for index in range(len(batches)))
        blocks = sum(len(block) for block in chunks(cached))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert blocks == 64 * 256
    assert total == pytest.approx(64 * float(batch.astype(np.float64).sum()), rel=1e-4)
    assert peak < 24e6, f"peak {peak / 1e6:.1f} MB for a 64 MB cache"


def test_rows_without_a_descriptor_are_compacted_away(tmp_path):
    array = np.arange(30, dtype=np.float32).reshape(10, 3)
    save_features(tmp_path, "test.all", array, exact=True)
    keep = np.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=bool)
    keep_rows(tmp_path, "test.all", "test", keep)
    np.testing.assert_array_equal(load_features(tmp_path, "test")[:], array[keep])
    assert [p.name for p in tmp_path.iterdir()] == ["test.npy"]


def test_normalizer_adapted_in_chunks_matches_the_whole_array(tmp_path):
    array = np.random.default_rng(3).normal(2.0, 3.0, (9000, 5)).astype(np.float32)
    save_features(tmp_path, "train", array, exact=True)
    whole, chunked = keras.layers.Normalization(), keras.layers.Normalization()
    whole.adapt(array)
    adapt_in_chunks(chunked, load_features(tmp_path, "train"), rows=4096)  # three chunks
    np.testing.assert_array_equal(chunked.mean, whole.mean)  # the same numbers, not close ones
    np.testing.assert_array_equal(chunked.variance, whole.variance)


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


def test_age_balance_weighs_every_age_the_same_within_the_cap():
    """Ages as sampled at 0; at 1 every age (here 5 children among 200 adults of 30) carries
    the same total weight unless the cap of 10 times the mean binds; in between, in between."""
    ages = np.array([5] * 10 + [30] * 200 + [60] * 40)
    np.testing.assert_array_equal(age_sample_weights(ages, 0), np.ones(len(ages)))
    full = age_sample_weights(ages, 1, cap=100)
    totals = [full[ages == age].sum() for age in (5, 30, 60)]
    np.testing.assert_allclose(totals, [totals[0]] * 3, rtol=1e-5)
    assert full.dtype == np.float32 and np.isclose(full.mean(), 1)
    capped = age_sample_weights(ages, 1, cap=3)
    assert capped.max() <= 3 + 1e-6 and np.isclose(capped.mean(), 1, atol=1e-3)
    half = age_sample_weights(ages, 0.5, cap=100)
    assert 1 < half[0] < full[0] and full[ages == 30][0] < half[ages == 30][0] < 1
    nearby = age_sample_weights(np.array([29, 30, 31, 30, 80]), 1, cap=100)
    assert nearby[0] == nearby[1] == nearby[2] and nearby[4] > nearby[0]


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


def test_validation_batches_come_in_order_without_weights():
    features, labels, _ = cache()
    batches = FeatureBatches(features, labels, None, batch_size=4)
    assert [len(batch) for batch in epoch(batches)] == [2, 2, 2]  # (x, y): no sample weights
    np.testing.assert_array_equal(np.concatenate([x for x, _ in epoch(batches)]), features)


def test_row_batches_stack_a_face_and_its_mirror(tmp_path):
    faces = np.arange(20, dtype=np.float32).reshape(5, 4)
    save_features(tmp_path, "test", faces, exact=True)
    save_features(tmp_path, "test_flipped", -faces, exact=True)
    pairs = RowBatches([load_features(tmp_path, n) for n in ("test", "test_flipped")], 2)
    stacked = np.concatenate([pairs[i] for i in range(len(pairs))])
    assert len(pairs) == 3 and stacked.shape == (5, 2, 4) and stacked.dtype == np.float32
    np.testing.assert_array_equal(stacked[:, 0], faces)
    np.testing.assert_array_equal(stacked[:, 1], -faces)
