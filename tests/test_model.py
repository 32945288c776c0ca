"""agegender.nets.model: the backbone cut into a frozen feature extractor and a trainable head."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from conftest import REPO  # noqa: E402

from agegender.nets.model import TASKS, build_networks, load_model, set_trainable_tail  # noqa: E402
from agegender.nets.training import compile_for_training  # noqa: E402

SIZE = 64
HEAD = (16, 8)
VGG16_CONVS = [
    f"block{b}_conv{c}" for b, n in zip(range(1, 6), (2, 2, 3, 3, 3)) for c in range(1, n + 1)
]
SECTION = {
    "lr_schedule": "constant",
    "label_smoothing": 0.0,
    "age_loss": "cross_entropy",
    "loss_weights": {"gender": 1.0, "age": 1.0},
}


def images(count, seed=0, size=SIZE):
    return np.random.default_rng(seed).uniform(0, 255, (count, size, size, 3)).astype("float32")


def labels(count, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "gender": keras.utils.to_categorical(rng.integers(0, 2, count), 2).astype("float32"),
        "age": keras.utils.to_categorical(rng.integers(0, 101, count), 101).astype("float32"),
    }


def as_numpy(outputs):
    return {task: np.asarray(value) for task, value in outputs.items()}


@pytest.fixture(scope="module")
def networks():
    """Read-only use: tests that change trainability or weights build their own."""
    return build_networks(SIZE, trainable_layers=3, head_units=HEAD, seed=1)


def trainable_names(model):
    return {weight.path.rsplit("/", 1)[0] for weight in model.trainable_weights}


def test_output_shapes(networks):
    for model in (networks.image_model, networks.head_model):
        assert {task: tuple(output.shape) for task, output in model.output.items()} == {
            "gender": (None, 2),
            "age": (None, 101),
        }
    predicted = as_numpy(networks.image_model.predict(images(3), verbose=0))
    assert predicted["gender"].shape == (3, 2) and predicted["age"].shape == (3, 101)
    for task in TASKS:
        np.testing.assert_allclose(predicted[task].sum(axis=1), 1, atol=1e-5)


def test_head_on_features_equals_the_image_model(networks):
    x = images(4, seed=2)
    whole = as_numpy(networks.image_model(x, training=False))
    split = as_numpy(
        networks.head_model(networks.feature_extractor(x, training=False), training=False)
    )
    for task in TASKS:
        np.testing.assert_allclose(split[task], whole[task], rtol=1e-5, atol=1e-6)


def test_three_trainable_layers_are_block5(networks):
    trainable = [layer.name for layer in networks.base.layers if layer.trainable and layer.weights]
    assert trainable == ["block5_conv1", "block5_conv2", "block5_conv3"]
    convs = [layer.name for layer in networks.base.layers if layer.weights]
    assert convs == VGG16_CONVS
    assert tuple(networks.feature_extractor.output.shape) == (
        None,
        4,
        4,
        512,
    )  # block4_pool at 64 px
    assert tuple(networks.head_model.input.shape) == (None, 4, 4, 512)
    assert not networks.feature_extractor.trainable_weights
    head_layers = {layer.name for layer in networks.head_model.layers}
    assert {"block5_conv1", "block5_conv2", "block5_conv3", "block5_pool", "flatten"} <= head_layers
    assert "block4_conv3" not in head_layers


def test_zero_trainable_layers_freezes_the_whole_base():
    nets = build_networks(SIZE, trainable_layers=0, head_units=HEAD)
    assert tuple(nets.feature_extractor.output.shape) == (
        None,
        2,
        2,
        512,
    )  # block5_pool: the whole base
    assert tuple(nets.feature_extractor.output.shape) == tuple(nets.base.output.shape)
    assert not nets.feature_extractor.trainable_weights
    assert not [layer for layer in nets.base.layers if layer.trainable and layer.weights]
    assert not {layer.name for layer in nets.head_model.layers} & set(VGG16_CONVS)
    assert nets.image_model.trainable_weights  # the heads still train
    assert trainable_names(nets.image_model) == trainable_names(nets.head_model)


def test_fine_tuning_unfreezes_the_tail_in_the_image_model():
    nets = build_networks(SIZE, trainable_layers=3, head_units=HEAD)
    before = trainable_names(nets.image_model)
    assert not before & {"block4_conv2", "block4_conv3"}
    set_trainable_tail(nets.base, 5)
    after = trainable_names(nets.image_model)
    assert after - before == {"block4_conv2", "block4_conv3"}
    assert len(nets.image_model.trainable_weights) == len(nets.head_model.trainable_weights) + 4
    set_trainable_tail(nets.base, 0)
    assert not trainable_names(nets.image_model) & set(VGG16_CONVS)


def test_fine_tuning_keeps_batch_norm_frozen():
    """MobileNetV3Small (no weights, 32 px): the tail's convolutions learn, its BatchNorm layers
    stay frozen and, in a training step too, normalize with their moving statistics."""
    nets = build_networks(32, backbone="mobilenetv3small", head_units=HEAD)
    set_trainable_tail(nets.base, 8)
    norms = [
        layer for layer in nets.base.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    learning = [layer for layer in nets.base.layers if layer.weights and layer not in norms]
    assert norms and not any(layer.trainable for layer in norms)
    assert [layer for layer in nets.base.layers if layer.trainable and layer.weights] == learning[
        -8:
    ]
    assert f"{learning[-1].name}_bn" in [norm.name for norm in norms]  # conv_1, then conv_1_bn

    def states(chosen):
        return [weight.numpy().copy() for layer in chosen for weight in layer.weights]

    x, y = images(4, size=32), labels(4)
    np.testing.assert_allclose(
        np.asarray(nets.base(x, training=True)),
        np.asarray(nets.base(x, training=False)),
        rtol=1e-5,
        atol=1e-6,
    )
    norms_before, learning_before = states(norms), states(learning[-8:])
    compile_for_training(
        nets.image_model, SECTION, 1e-2, steps_per_epoch=1, epochs=1, jit_compile=False
    )
    nets.image_model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    for before, after in zip(norms_before, states(norms)):
        np.testing.assert_array_equal(before, after)  # moving statistics, scale and offset
    assert not np.array_equal(learning_before[-1], states(learning[-8:])[-1])  # conv_1 learnt


def test_training_the_head_changes_the_image_model_and_it_saves(tmp_path):
    nets = build_networks(SIZE, trainable_layers=3, head_units=HEAD, seed=3)
    x = images(8, seed=4)
    features = np.asarray(nets.feature_extractor.predict(x, verbose=0))
    before = as_numpy(nets.image_model(x, training=False))
    frozen_before = nets.base.get_layer("block1_conv1").kernel.numpy().copy()
    shared_before = nets.base.get_layer("block5_conv3").kernel.numpy().copy()
    compile_for_training(
        nets.head_model,
        {**SECTION, "age_loss": "dldl", "lr_schedule": "cosine"},
        1e-2,
        steps_per_epoch=1,
        epochs=1,
        jit_compile=False,
    )
    history = nets.head_model.fit(features, labels(8), batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert {"gender_accuracy", "age_accuracy", "gender_loss", "age_loss"} <= set(history.history)
    assert not np.array_equal(shared_before, nets.base.get_layer("block5_conv3").kernel.numpy())
    np.testing.assert_array_equal(frozen_before, nets.base.get_layer("block1_conv1").kernel.numpy())
    after = as_numpy(nets.image_model.predict(x, verbose=0))
    assert not np.allclose(before["age"], after["age"])
    np.testing.assert_allclose(
        after["age"],
        np.asarray(nets.head_model(features, training=False)["age"]),
        rtol=1e-5,
        atol=1e-6,
    )

    nets.image_model.save(tmp_path / "model.keras")
    loaded = load_model(tmp_path / "model.keras")
    got = as_numpy(loaded.predict(x, verbose=0))
    for task in TASKS:
        np.testing.assert_allclose(got[task], after[task], rtol=1e-5, atol=1e-6)


def test_average_pooling():
    nets = build_networks(SIZE, trainable_layers=0, pooling="avg", head_units=HEAD)
    names = {layer.name for layer in nets.head_model.layers}
    assert "avg_pool" in names and "flatten" not in names
    assert tuple(nets.head_model.get_layer("avg_pool").output.shape) == (None, 512)
    assert as_numpy(nets.image_model.predict(images(2), verbose=0))["age"].shape == (2, 101)


@pytest.mark.parametrize("backbone", ["resnet50", "efficientnetb0", "mobilenetv3small"])
def test_other_backbones_build_frozen_only(backbone):
    nets = build_networks(SIZE, backbone=backbone, trainable_layers=0, head_units=HEAD)
    assert not nets.feature_extractor.trainable_weights
    assert tuple(nets.feature_extractor.output.shape) == tuple(nets.base.output.shape)
    x = images(2)
    whole = as_numpy(nets.image_model(x, training=False))
    split = as_numpy(nets.head_model(nets.feature_extractor(x, training=False), training=False))
    assert whole["gender"].shape == (2, 2) and whole["age"].shape == (2, 101)
    np.testing.assert_allclose(split["age"], whole["age"], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="chain"):
        build_networks(SIZE, backbone=backbone, trainable_layers=1, head_units=HEAD)


def test_vgg16_top_at_224_trains_fc1_on_flattened_features():
    started = time.perf_counter()
    nets = build_networks(224, use_top=True, trainable_layers=1, head_units=HEAD)
    if time.perf_counter() - started > 10:
        pytest.skip("building VGG16 with its 138M-parameter top took over 10 s here")
    assert tuple(nets.feature_extractor.output.shape) == (None, 25088)
    head_layers = [layer.name for layer in nets.head_model.layers]
    assert "fc1" in head_layers and "flatten" not in head_layers
    assert tuple(nets.head_model.get_layer("fc1").output.shape) == (None, 4096)
    assert "fc2" not in [layer.name for layer in nets.base.layers]
    assert [layer.name for layer in nets.base.layers if layer.trainable and layer.weights] == [
        "fc1"
    ]


def test_weights_file_in_keras_legacy_h5_format_is_loaded(tmp_path):
    """The download stage fetches Keras' own .h5 files; the backbone must load such a file."""
    h5py = pytest.importorskip("h5py")
    from keras.src.legacy.saving import legacy_h5_format

    source = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(SIZE, SIZE, 3)
    )
    rng = np.random.default_rng(7)
    for weight in source.weights:
        weight.assign(rng.normal(0, 0.01, weight.shape).astype("float32"))
    with h5py.File(tmp_path / "notop.h5", "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, source)
    nets = build_networks(
        SIZE, backbone="mobilenetv3small", weights_file=tmp_path / "notop.h5", head_units=HEAD
    )
    assert len(nets.base.weights) == len(source.weights)
    for expected, got in zip(source.weights, nets.base.weights):
        np.testing.assert_array_equal(got.numpy(), expected.numpy())


SAVE_IN_A_FRESH_PROCESS = """
import sys
import keras
import numpy as np
from agegender.nets.model import build_networks, save_model

keras.utils.set_random_seed(3)  # as the train stage does
networks = build_networks(64, backbone="dlib_resnet", head_units=(8, 8), seed=3)
networks.normalizer.adapt(np.random.default_rng(0).normal(size=(16, 128)).astype("float32"))
save_model(networks.image_model, sys.argv[1])
"""


def test_a_saved_model_is_the_same_bytes_every_time_and_loads(tmp_path):
    """dvc.lock records models/model.keras's hash: the same training must give the same file
    (Keras writes the save time and memory addresses into it)."""
    for name in ("first.keras", "second.keras"):
        subprocess.run(
            [sys.executable, "-c", SAVE_IN_A_FRESH_PROCESS, str(tmp_path / name)],
            check=True,
            capture_output=True,
        )
    assert (tmp_path / "first.keras").read_bytes() == (tmp_path / "second.keras").read_bytes()
    model = load_model(tmp_path / "first.keras")
    chips = np.random.default_rng(1).uniform(0, 255, (3, 150, 150, 3)).astype("float32")
    outputs = model.predict(chips, verbose=0)
    assert outputs["age"].shape == (3, 101)
    np.testing.assert_allclose(outputs["gender"].sum(axis=1), 1.0, rtol=1e-5)


FINETUNE_UNDER_JAX = """
import sys
import keras
import numpy as np
from agegender.contracts.labels import one_hot
from agegender.nets.model import build_networks, set_trainable_tail
from agegender.contracts.params import load_params
from agegender.nets.training import compile_for_training
import pandas as pd

assert keras.backend.backend() == "jax"
keras.utils.set_random_seed(0)
networks = build_networks(64, backbone="dlib_resnet", weights_file=sys.argv[1], head_units=(8,))
networks.normalizer.adapt(np.random.default_rng(0).normal(0, 0.05, (16, 128)).astype("f4"))
set_trainable_tail(networks.base, 3)
trainable = [layer.name for layer in networks.base.layers if layer.trainable and layer.weights]
before = {w.path: w.numpy().copy() for w in networks.base.weights}
model = networks.finetune_model
compile_for_training(model, load_params()["train"], 1e-4, 1, 1, False)
chips = np.random.default_rng(1).uniform(0, 255, (4, 150, 150, 3)).astype("f4")
labels = one_hot(pd.DataFrame({"gender": [0, 1, 1, 0], "age": [20, 35, 50, 70]}))
history = model.fit(chips, labels, batch_size=4, epochs=1, verbose=0).history
moved = sorted({w.path.split("/")[0] for w in networks.base.weights
                if not np.array_equal(before[w.path], w.numpy())})
print(trainable, moved, history["loss"][0])
"""


def test_the_face_network_fine_tunes_under_jax(face_models):
    """The chip model's training step runs under the JAX backend (as on a GPU machine): the
    last three weighted layers of dlib's network move, nothing else in it does."""
    from agegender.facedata.face_chips import MODEL_FILES

    result = subprocess.run(
        [sys.executable, "-c", FINETUNE_UNDER_JAX, str(face_models / MODEL_FILES["descriptor"][0])],
        env={**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    expected = ["res5_1_conv_a", "res5_1_conv_b", "descriptor"]
    assert line.startswith(f"{expected} {sorted(expected)} "), line
    assert np.isfinite(float(line.rsplit(" ", 1)[1]))


# The fused backbone: dlib's face network for gender, Cydral's age network adapted for age.


@pytest.fixture(scope="module")
def fused(face_models, cydral_models):
    from agegender.facedata.face_chips import MODEL_FILES

    keras.utils.set_random_seed(0)
    return build_networks(
        SIZE,
        backbone="dlib_resnet+cydral_age",
        weights_file=face_models / MODEL_FILES["descriptor"][0],
        age_network_file=cydral_models / "age-v1.onnx",
        age_pull=0.5,
        head_units=HEAD,
    )


@pytest.fixture(scope="module")
def face_chips(sample_dir, face_models):
    from agegender.facedata.face_chips import ChipCutter
    from agegender.facedata.images import load_rgb

    cutter = ChipCutter(face_models, face_margin=0.4)
    faces = [load_rgb(path) for path in sorted((sample_dir / "90").glob("*.jpg"))[:6]]
    return np.stack([cutter.chip(face) for face in faces]).astype("float32")


def test_age_layer_weights_widen_cydrals_last_layer_to_101_classes(cydral_models):
    from agegender.nets.cydral_networks import age_layer_weights, cydral_network

    kernel, bias = age_layer_weights(cydral_models / "age-v1.onnx", 101)
    dense = [layer for layer in cydral_network(cydral_models / "age-v1.onnx").layers]
    original_kernel, original_bias = dense[-2].get_weights()  # the last Dense, then Softmax
    assert kernel.shape == (256, 101) and bias.shape == (101,)
    np.testing.assert_array_equal(kernel[:, :81], original_kernel)
    np.testing.assert_array_equal(bias[:81], original_bias)
    np.testing.assert_array_equal(kernel[:, 81:], np.repeat(original_kernel[:, 80:], 20, axis=1))
    np.testing.assert_allclose(bias[81:], original_bias[80] - 8.0)


def test_the_fused_model_starts_as_cydrals_age_network_and_saves(
    fused, face_chips, cydral_models, tmp_path
):
    """Before training, the fused model's age is Cydral's expected age on the chip it cuts from
    the face network's chip, averaged with its mirror's (class 0.25 years counts as 0, and the
    20 classes past 80 start e^8 times less likely); the saved model answers the same."""
    from agegender.contracts.labels import AGES
    from agegender.nets.cydral_networks import AGE_VALUES, cydral_network
    from agegender.nets.model import age_chip

    chips_in = keras.Input((150, 150, 3))
    cutter = keras.Model(chips_in, age_chip(chips_in))
    cydral = cydral_network(cydral_models / "age-v1.onnx")
    age_chips = np.asarray(cutter(face_chips))
    expected = np.mean(
        [np.asarray(cydral(x)) @ AGE_VALUES for x in (age_chips, age_chips[:, :, ::-1])], axis=0
    )
    fused.normalizer.adapt(np.asarray(fused.feature_extractor(face_chips)))
    answers = as_numpy(fused.image_model(face_chips))
    assert answers["age"].shape == (6, 101) and answers["gender"].shape == (6, 2)
    np.testing.assert_allclose(answers["age"] @ AGES, expected, atol=0.26)
    fused.image_model.save(tmp_path / "fused.keras")
    loaded = as_numpy(load_model(tmp_path / "fused.keras")(face_chips))
    for task in TASKS:
        np.testing.assert_allclose(loaded[task], answers[task], atol=1e-5)


def test_with_cydral_gender_the_gender_head_reads_both_networks(
    face_models, cydral_models, face_chips
):
    """dlib_resnet+cydral_age+cydral_gender caches the face descriptor, then Cydral's gender
    network's 16 features on its 32 px chip, then the age network's 256; the gender head reads
    the first two, the age layer the last."""
    from agegender.facedata.face_chips import MODEL_FILES
    from agegender.nets.cydral_networks import cydral_network
    from agegender.nets.model import age_chip

    both = build_networks(
        SIZE,
        backbone="dlib_resnet+cydral_age+cydral_gender",
        weights_file=face_models / MODEL_FILES["descriptor"][0],
        age_network_file=cydral_models / "age-v1.onnx",
        gender_network_file=cydral_models / "gender-v1.onnx",
        head_units=HEAD,
    )
    features = np.asarray(both.feature_extractor(face_chips))
    assert features.shape == (6, 128 + 16 + 256)
    chips_in = keras.Input((150, 150, 3))
    gender_chips = keras.Model(chips_in, age_chip(chips_in, "gender"))(face_chips)
    gender_network = cydral_network(cydral_models / "gender-v1.onnx", output="features")
    np.testing.assert_allclose(features[:, 128:144], gender_network(gender_chips), atol=1e-4)
    assert both.head_model.get_layer("gender_dense1").kernel.shape == (144, HEAD[0])
    assert both.head_model.get_layer("age").kernel.shape == (256, 101)


def test_the_age_correction_starts_at_zero_reads_every_feature_and_trains(
    fused, face_models, cydral_models, face_chips, tmp_path
):
    """With age_correction heads, a head on all 128 + 256 standardised features adds its logits
    to Cydral's adapted layer: at the start it adds nothing (the model answers as without it),
    one training step moves it, and the saved model answers as the one in memory (called as
    predict calls it: after a training step, a plain call may run the heads' dropout)."""
    from agegender.facedata.face_chips import MODEL_FILES

    keras.utils.set_random_seed(0)
    corrected = build_networks(
        SIZE,
        backbone="dlib_resnet+cydral_age",
        weights_file=face_models / MODEL_FILES["descriptor"][0],
        age_network_file=cydral_models / "age-v1.onnx",
        age_pull=0.5,
        age_correction="heads",
        head_units=HEAD,
    )
    features = np.asarray(corrected.feature_extractor(face_chips))
    for networks in (fused, corrected):
        networks.normalizer.adapt(features)
    assert corrected.head_model.get_layer("age_dense1").kernel.shape == (128 + 256, HEAD[0])
    before = as_numpy(corrected.image_model(face_chips))["age"]
    np.testing.assert_allclose(before, as_numpy(fused.image_model(face_chips))["age"], atol=1e-6)

    correction = corrected.head_model.get_layer("age_correction")
    compile_for_training(
        corrected.head_model, SECTION, 1e-2, steps_per_epoch=1, epochs=1, jit_compile=False
    )
    targets = {
        "gender": np.eye(2, dtype="float32")[[0, 1] * 3],
        "age": np.eye(101, dtype="float32")[[5, 90] * 3],
    }
    corrected.head_model.train_on_batch(features, targets)
    assert np.abs(np.asarray(correction.kernel)).max() > 0
    after = as_numpy(corrected.image_model(face_chips, training=False))["age"]
    assert np.abs(after - before).max() > 1e-4
    corrected.image_model.save(tmp_path / "corrected.keras")
    loaded = load_model(tmp_path / "corrected.keras")(face_chips, training=False)
    loaded = as_numpy(loaded)["age"]
    np.testing.assert_allclose(loaded, after, atol=1e-5)


def test_the_cut_age_chip_is_the_one_dlib_cuts(face_chips, sample_dir, face_models):
    """The 64 px chip at padding 0.2 taken from the 150 px chip at padding 0.25 lands on dlib's
    own to within the blur of a second resampling (a shift of one pixel costs 3 times more)."""
    from agegender.facedata.face_chips import ChipCutter
    from agegender.facedata.images import load_rgb
    from agegender.nets.model import age_chip

    cutter = ChipCutter(face_models, face_margin=0.4)
    faces = [load_rgb(path) for path in sorted((sample_dir / "90").glob("*.jpg"))[:6]]
    dlib_chips = np.stack([cutter.chip(face, 64, 0.2) for face in faces]).astype("float32")
    chips_in = keras.Input((150, 150, 3))
    ours = np.asarray(keras.Model(chips_in, age_chip(chips_in))(face_chips))
    assert ours.shape == dlib_chips.shape
    assert np.abs(ours - dlib_chips).mean() < 4.0
    assert np.abs(np.roll(ours, 1, axis=2) - dlib_chips).mean() > 5.0


def test_the_pull_toward_the_start_is_a_training_loss_only(cydral_models):
    """AnchoredDense adds pull * (squared distance to its start) to the training loss, and
    nothing when it only answers; at the start the distance is zero."""
    from agegender.nets.model import AnchoredDense

    rng = np.random.default_rng(0)
    kernel, bias = rng.normal(0, 0.1, (8, 5)), rng.normal(0, 0.1, 5)
    features, targets = rng.normal(0, 1, (16, 8)), np.eye(5)[rng.integers(0, 5, 16)]
    losses = {}
    for pull in (0.0, 3.0):
        inputs = keras.Input((8,))
        layer = AnchoredDense(5, pull)
        model = keras.Model(inputs, layer(inputs))
        layer.start_from(kernel, bias)
        layer.kernel.assign(kernel + 0.1)  # moved by 0.1 in each of 40 weights
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="categorical_crossentropy")
        losses[pull] = float(model.train_on_batch(features, targets))
        np.testing.assert_allclose(
            model.evaluate(features, targets, verbose=0), losses[0.0], rtol=1e-5
        )
    np.testing.assert_allclose(losses[3.0] - losses[0.0], 3.0 * 40 * 0.01, rtol=1e-4)
