"""agegender.nets.losses: the age-loss choices behave as their papers describe."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from agegender.nets.losses import HeadLoss  # noqa: E402

AGES = 101


def one_hot(ages, classes=AGES):
    return keras.utils.to_categorical(ages, classes).astype("float32")


def per_sample(loss, y_true, y_pred):
    return np.asarray(loss.call(np.asarray(y_true, "float32"), np.asarray(y_pred, "float32")))


def softmax(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype("float32")


def gaussian(centre, sigma=2.0):
    ages = np.arange(AGES)
    g = np.exp(-((ages - centre) ** 2) / (2 * sigma**2))
    return (g / g.sum()).astype("float32")


@pytest.fixture
def predictions():
    rng = np.random.default_rng(0)
    return one_hot([3, 30, 77, 100]), softmax(rng.normal(size=(4, AGES)) * 3)


def test_cross_entropy_is_keras_categorical_crossentropy(predictions):
    y_true, y_pred = predictions
    expected = np.asarray(keras.losses.categorical_crossentropy(y_true, y_pred))
    np.testing.assert_allclose(
        per_sample(HeadLoss("cross_entropy"), y_true, y_pred), expected, rtol=1e-6
    )
    reduced = float(HeadLoss("cross_entropy")(y_true, y_pred))
    assert reduced == pytest.approx(expected.mean(), rel=1e-6)
    assert reduced > 0


def test_label_smoothing_changes_the_cross_entropy(predictions):
    y_true, y_pred = predictions
    plain = per_sample(HeadLoss("cross_entropy"), y_true, y_pred)
    smoothed = per_sample(HeadLoss("cross_entropy", label_smoothing=0.1), y_true, y_pred)
    assert not np.allclose(plain, smoothed)
    expected = np.asarray(
        keras.losses.categorical_crossentropy(y_true, y_pred, label_smoothing=0.1)
    )
    np.testing.assert_allclose(smoothed, expected, rtol=1e-6)


def test_mean_variance_adds_nothing_for_a_confident_right_answer():
    y_true = one_hot([25, 60])
    y_pred = one_hot([25, 60])  # one-hot at the true age: expected age exact, variance 0
    mv = per_sample(HeadLoss("mean_variance"), y_true, y_pred)
    ce = per_sample(HeadLoss("cross_entropy"), y_true, y_pred)
    np.testing.assert_allclose(mv, ce, rtol=1e-6, atol=1e-7)


def test_mean_variance_grows_when_the_expected_age_is_off():
    y_true = one_hot([40, 40])
    # same probability at the true age (same cross-entropy), the rest near or far from it
    near, far = np.full(AGES, 1e-6, "float32"), np.full(AGES, 1e-6, "float32")
    near[40], near[41] = 0.5, 0.5
    far[40], far[90] = 0.5, 0.5
    y_pred = np.stack([near / near.sum(), far / far.sum()])
    ce = per_sample(HeadLoss("cross_entropy"), y_true, y_pred)
    mv = per_sample(HeadLoss("mean_variance"), y_true, y_pred)
    assert ce[0] == pytest.approx(ce[1], rel=1e-4)
    assert mv[1] > mv[0] + 10
    assert (mv > ce).all()


def test_dldl_is_least_near_a_gaussian_at_the_true_age():
    y_true = one_hot([50] * 5)
    y_pred = np.stack([gaussian(50), gaussian(52), gaussian(56), gaussian(65), gaussian(90)])
    losses = per_sample(HeadLoss("dldl"), y_true, y_pred)
    assert losses[0] == pytest.approx(0, abs=1e-3)  # KL 0 and expected age exact
    assert (np.diff(losses) > 0).all(), losses
    sharper = per_sample(HeadLoss("dldl"), one_hot([50]), np.clip(one_hot([50]), 1e-7, 1))
    assert sharper[0] > losses[0] + 0.5  # a one-hot is farther from the label distribution


def test_losses_differ_by_kind(predictions):
    y_true, y_pred = predictions
    values = {
        kind: per_sample(HeadLoss(kind), y_true, y_pred)
        for kind in ("cross_entropy", "mean_variance", "dldl")
    }
    assert not np.allclose(values["cross_entropy"], values["mean_variance"])
    assert not np.allclose(values["cross_entropy"], values["dldl"])


def test_float16_predictions_are_accepted():
    y_true = one_hot([10, 20])
    y_pred = np.stack([gaussian(10), gaussian(20)]).astype("float16")
    loss = HeadLoss("mean_variance").call(y_true, y_pred)
    assert np.isfinite(np.asarray(loss)).all()


@pytest.mark.parametrize("kind", ["cross_entropy", "mean_variance", "dldl"])
def test_config_round_trip(kind, predictions):
    loss = HeadLoss(kind, label_smoothing=0.05)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, HeadLoss)
    assert (restored.kind, restored.label_smoothing, restored.name) == (kind, 0.05, kind)
    y_true, y_pred = predictions
    np.testing.assert_allclose(
        per_sample(restored, y_true, y_pred), per_sample(loss, y_true, y_pred)
    )
