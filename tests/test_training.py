"""agegender.nets.training: params -> network settings, the weights file,
compiling and callbacks."""

import copy
import inspect
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

keras = pytest.importorskip("keras")

from agegender.contracts.errors import PipelineError  # noqa: E402
from agegender.contracts.params import load_params  # noqa: E402
from agegender.nets import training  # noqa: E402
from agegender.nets.losses import HeadLoss  # noqa: E402
from agegender.nets.model import build_networks  # noqa: E402
from agegender.nets.training import (  # noqa: E402
    ImageRows,
    ReseedEachEpoch,
    TrainingState,
    base_weights,
    compile_for_training,
    network_settings,
    phase_history,
    resume_point,
    saved_state,
    seed_generators,
    training_callbacks,
)


@pytest.fixture(scope="module")
def repo_params():
    return load_params(REPO / "params.yaml")


def edited(params, backbone="vgg16", weights="imagenet", **train):
    params = copy.deepcopy(params)
    params["model"].update(backbone=backbone, weights=weights)
    params["train"].update(train)
    return params


@pytest.mark.parametrize(
    "backbone, size, weights, use_top",
    [
        ("vgg16", 224, "imagenet", True),
        ("vgg16", 224, "my.weights.h5", True),
        (
            "vgg16",
            224,
            "none",
            False,
        ),  # nothing pretrained in fc1: no point keeping a 100M-weight layer
        ("vgg16", 64, "imagenet", False),  # fc1 fits 7x7x512 features only
        ("resnet50", 224, "imagenet", False),
        ("mobilenetv3small", 224, "imagenet", False),
    ],
)
def test_use_top_only_for_vgg16_at_224_with_weights(repo_params, backbone, size, weights, use_top):
    assert (
        network_settings(edited(repo_params, backbone, weights, input_size=size))["use_top"]
        is use_top
    )


def test_settings_map_the_params(repo_params):
    params = edited(
        repo_params,
        "resnet50",
        "none",
        input_size=96,
        trainable_layers=0,
        pooling="avg",
        head_units=[64, 32],
        dropout=0.2,
        augment={"flip": False, "brightness": 0.3},
    )
    params["seed"] = 9
    params["model"]["face_features"] = "pooled"
    settings = network_settings(params)
    assert settings == {
        "input_size": 96,
        "backbone": "resnet50",
        "use_top": False,
        "trainable_layers": 0,
        "pooling": "avg",
        "head_units": [64, 32],
        "dropout": 0.2,
        "flip": False,
        "brightness": 0.3,
        "seed": 9,
        "face_features": "pooled",
        "age_pull": repo_params["train"]["age_pull"],
        "age_correction": repo_params["train"]["age_correction"],
    }
    inspect.signature(build_networks).bind(
        **settings, weights_file=None
    )  # every key is a parameter


def test_no_weights_is_none():
    assert base_weights("none") is None


def test_missing_weights_path_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "vgg.h5"
    with pytest.raises(PipelineError, match=str(missing)):
        base_weights(str(missing))


def test_existing_weights_path_is_returned(tmp_path):
    path = tmp_path / "vgg.h5"
    path.write_bytes(b"h5")
    assert base_weights(str(path)) == path


def test_imagenet_reads_the_download_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "WEIGHTS", tmp_path)
    (tmp_path / "weights.json").write_text(json.dumps({"file": "vgg16_notop.h5"}))
    with pytest.raises(PipelineError, match="vgg16_notop.h5"):
        base_weights("imagenet")
    (tmp_path / "vgg16_notop.h5").write_bytes(b"h5")
    assert base_weights("imagenet") == tmp_path / "vgg16_notop.h5"


@pytest.mark.parametrize("manifest", [None, {"weights": "none", "file": None}])
def test_imagenet_without_downloaded_weights_is_a_pipeline_error(tmp_path, monkeypatch, manifest):
    monkeypatch.setattr(training, "WEIGHTS", tmp_path)
    if manifest is not None:
        (tmp_path / "weights.json").write_text(json.dumps(manifest))
    with pytest.raises(PipelineError, match="download_weights"):
        base_weights("imagenet")


def section(**overrides):
    return {
        "lr_schedule": "constant",
        "label_smoothing": 0.1,
        "age_loss": "mean_variance",
        "loss_weights": {"gender": 1.0, "age": 0.5},
        "early_stopping": 0,
        "plateau_factor": 0.5,
        "plateau_patience": 2,
        **overrides,
    }


@pytest.fixture
def tiny_model():
    inputs = keras.Input((4,))
    return keras.Model(
        inputs,
        {
            task: keras.layers.Dense(classes, activation="softmax", name=task)(inputs)
            for task, classes in (("gender", 2), ("age", 101))
        },
    )


def test_cosine_schedule(tiny_model):
    model = compile_for_training(
        tiny_model,
        section(lr_schedule="cosine"),
        0.01,
        steps_per_epoch=7,
        epochs=3,
        jit_compile=False,
    )
    schedule = model.optimizer._learning_rate
    assert isinstance(schedule, keras.optimizers.schedules.CosineDecay)
    assert (schedule.initial_learning_rate, schedule.decay_steps) == (0.01, 21)
    assert float(schedule(21)) == pytest.approx(0, abs=1e-9)


def test_constant_learning_rate_and_the_losses(tiny_model):
    model = compile_for_training(
        tiny_model, section(), 0.003, steps_per_epoch=7, epochs=3, jit_compile=False
    )
    assert not isinstance(
        model.optimizer._learning_rate, keras.optimizers.schedules.LearningRateSchedule
    )
    assert float(model.optimizer.learning_rate) == pytest.approx(0.003)
    losses = model.loss
    assert isinstance(losses["gender"], HeadLoss) and losses["gender"].kind == "cross_entropy"
    assert losses["age"].kind == "mean_variance" and losses["age"].label_smoothing == 0.1
    x = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
    y = {
        "gender": keras.utils.to_categorical([0, 1, 1, 0, 1, 1], 2),
        "age": keras.utils.to_categorical([3, 30, 50, 70, 90, 100], 101),
    }
    result = model.evaluate(x, y, verbose=0, return_dict=True)
    assert {"gender_accuracy", "age_accuracy"} <= set(result)
    assert result["loss"] == pytest.approx(
        result["gender_loss"] + 0.5 * result["age_loss"], rel=1e-5
    )


def callback_types(callbacks):
    return [type(callback) for callback in callbacks]


def test_callbacks(tmp_path):
    extra = keras.callbacks.Callback()
    plain = training_callbacks(section(), tmp_path, "head", [extra])
    assert callback_types(plain) == [
        ReseedEachEpoch,
        keras.callbacks.CSVLogger,
        keras.callbacks.Callback,
        TrainingState,
    ]
    assert plain[1].filename == str(tmp_path / "head.csv") and plain[1].append
    assert plain[-1].path == tmp_path / "head.state.npz" and plain[-1].stateful == []

    stopping = training_callbacks(
        section(early_stopping=4, lr_schedule="cosine"), tmp_path, "head", []
    )
    early = [c for c in stopping if isinstance(c, keras.callbacks.EarlyStopping)]
    assert len(early) == 1 and early[0].restore_best_weights and early[0].patience == 4
    assert early[0].monitor == "val_loss"
    assert keras.callbacks.ReduceLROnPlateau not in callback_types(stopping)

    plateau = training_callbacks(
        section(lr_schedule="plateau", plateau_factor=0.25, plateau_patience=3),
        tmp_path,
        "finetune",
        [],
    )
    reduce = [c for c in plateau if isinstance(c, keras.callbacks.ReduceLROnPlateau)]
    assert len(reduce) == 1 and (reduce[0].factor, reduce[0].patience) == (0.25, 3)
    assert keras.callbacks.EarlyStopping not in callback_types(plateau)
    # last: it saves what the others did at the end of an epoch, and restores after they reset
    assert isinstance(plateau[-1], TrainingState) and plateau[-1].stateful == reduce
    assert plateau[-1].path == tmp_path / "finetune.state.npz"


def write_state(directory, phase, epoch):
    directory.mkdir(parents=True, exist_ok=True)
    state = {"epoch": epoch, "stopped": False, "callbacks": []}
    np.savez(directory / f"{phase}.state.npz", state=np.array(json.dumps(state)))


def test_a_fresh_phase_forgets_an_old_log(tmp_path):
    (tmp_path / "head.csv").write_text("epoch,loss\n0,1.0\n")
    assert resume_point(tmp_path, "head") == 0
    assert not (tmp_path / "head.csv").exists()


def test_a_resumed_log_keeps_the_complete_rows_of_the_saved_epochs(tmp_path):
    """A kill can land after an epoch's row and before its state, or in the middle of a row."""
    write_state(tmp_path, "head", 2)
    (tmp_path / "head.csv").write_text("epoch,loss\n0,3.0\n1,2.0\n2,1.0\n3,0.")
    assert resume_point(tmp_path, "head") == 2
    assert (tmp_path / "head.csv").read_text() == "epoch,loss\n0,3.0\n1,2.0\n"
    write_state(tmp_path, "finetune", 7)  # numbered on from the head phase's 5 epochs
    (tmp_path / "finetune.csv").write_text("epoch,loss\n5,0.9\n6,0.8\n7,0.7\n")
    assert resume_point(tmp_path, "finetune") == 7
    assert (tmp_path / "finetune.csv").read_text() == "epoch,loss\n5,0.9\n6,0.8\n"


def test_phase_history_numbers_epochs_on(tmp_path):
    (tmp_path / "head.csv").write_text("epoch,loss\n0,3.0\n1,2.0\n")
    (tmp_path / "finetune.csv").write_text("epoch,loss\n2,1.5\n")
    history = phase_history(tmp_path, ["head", "finetune"])
    assert list(history["epoch"]) == [0, 1, 2] and list(history["loss"]) == [3.0, 2.0, 1.5]


# Head-phase-like training where every kept counter matters: the rate halves after one epoch
# without progress and early stopping ends the phase after 6 of 20 epochs, at the best epoch's
# weights.
RESUMABLE = section(
    lr_schedule="plateau",
    plateau_patience=1,
    early_stopping=3,
    label_smoothing=0.0,
    age_loss="dldl",
)


class Killed(Exception):
    pass


class KillIn(keras.callbacks.Callback):
    """Raises in the middle of epoch `epoch`: as if the process died there."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch, self.now = epoch, None

    def on_epoch_begin(self, epoch, logs=None):
        self.now = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.now == self.epoch and batch == 1:
            raise Killed


class CountEpochs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


def tiny_fit(backup, *extra, epochs=20):
    """A fresh process's model and data (same seeds), fitted with the phase's callbacks."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    hidden = keras.layers.Dropout(0.3, seed=1)(keras.layers.Dense(32, activation="relu")(inputs))
    model = keras.Model(
        inputs,
        {
            task: keras.layers.Dense(classes, activation="softmax", name=task)(hidden)
            for task, classes in (("gender", 2), ("age", 101))
        },
    )
    compile_for_training(
        model, RESUMABLE, 0.03, steps_per_epoch=4, epochs=epochs, jit_compile=False
    )
    rng = np.random.default_rng(0)

    def data(count):
        return (
            rng.normal(size=(count, 8)).astype("float32"),
            {
                "gender": keras.utils.to_categorical(rng.integers(0, 2, count), 2),
                "age": keras.utils.to_categorical(rng.integers(0, 101, count), 101),
            },
        )

    train, val = data(64), data(32)
    callbacks = training_callbacks(RESUMABLE, backup, "head", list(extra), seed=1)
    try:
        model.fit(
            *train,
            validation_data=val,
            batch_size=16,
            epochs=epochs,
            shuffle=False,
            callbacks=callbacks,
            verbose=0,
        )
    except Killed:
        pass
    return model


def assert_same_training(model, expected):
    for got, want in zip(model.get_weights(), expected.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert int(model.optimizer.iterations) == int(expected.optimizer.iterations)
    assert float(model.optimizer.learning_rate) == float(expected.optimizer.learning_rate)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    backup = tmp_path_factory.mktemp("uninterrupted")
    return tiny_fit(backup), backup


def test_the_tiny_fit_needs_every_counter(uninterrupted):
    model, backup = uninterrupted
    state = saved_state(backup, "head")
    assert state["stopped"] and state["epoch"] == 6  # early stopping ended it ...
    assert state["callbacks"][0]["best_epoch"] == 2  # ... at the weights of epoch 3 of 6 ...
    assert float(model.optimizer.learning_rate) == pytest.approx(
        0.03 / 8
    )  # ... the rate halved thrice


def test_killed_twice_mid_epoch_a_fit_ends_as_an_uninterrupted_one(uninterrupted, tmp_path):
    """Killed after the best epoch and a halving, then after two more halvings with early
    stopping's patience nearly used: the third run trains the last epoch and stops as the
    uninterrupted one did, with its weights, step, rate and log."""
    expected, expected_backup = uninterrupted
    tiny_fit(tmp_path, KillIn(3))
    assert saved_state(tmp_path, "head")["epoch"] == 3
    tiny_fit(tmp_path, KillIn(5))
    assert saved_state(tmp_path, "head")["epoch"] == 5
    counted = CountEpochs()
    assert_same_training(tiny_fit(tmp_path, counted), expected)
    assert counted.epochs == [5]
    assert (tmp_path / "head.csv").read_text() == (expected_backup / "head.csv").read_text()


def test_a_phase_that_ended_restores_its_end_and_trains_no_epoch(uninterrupted, tmp_path):
    """What lets a kill in fine-tuning skip the head phase: its state is kept after `fit`."""
    expected, expected_backup = uninterrupted
    shutil.copytree(expected_backup, tmp_path, dirs_exist_ok=True)
    counted = CountEpochs()
    assert_same_training(tiny_fit(tmp_path, counted), expected)
    assert counted.epochs == []
    assert (tmp_path / "head.csv").read_text() == (expected_backup / "head.csv").read_text()


def test_the_state_is_one_file_replaced_in_one_step(uninterrupted, tmp_path, monkeypatch):
    """A kill while the state is written leaves the previous epoch's state whole."""
    tiny_fit(tmp_path, KillIn(2))
    before = (tmp_path / "head.state.npz").read_bytes()

    def die_while_writing(file, **arrays):
        file.write(b"half a file")
        raise Killed

    monkeypatch.setattr(np, "savez", die_while_writing)
    tiny_fit(tmp_path)
    assert (tmp_path / "head.state.npz").read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["head.csv", "head.state.npz"]


def test_a_state_of_another_network_is_refused_by_name(uninterrupted, tmp_path):
    _, backup = uninterrupted
    shutil.copytree(backup, tmp_path, dirs_exist_ok=True)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.Adam(), "mse")
    callbacks = training_callbacks(section(), tmp_path, "head", [])
    with pytest.raises(PipelineError, match=f"delete {tmp_path}"):
        model.fit(np.ones((4, 3)), np.ones((4, 2)), epochs=1, callbacks=callbacks, verbose=0)


def test_augmentation_layers_are_reseeded_too():
    nets = build_networks(
        32, trainable_layers=0, head_units=(4, 4), flip=True, brightness=0.1, seed=1
    )
    found = seed_generators(nets.image_model)
    generators = [
        nets.image_model.get_layer(name).generator
        for name in ("augment_flip", "augment_brightness")
    ]
    assert len(found) == 6 and all(any(g is f for f in found) for g in generators)  # and 4 dropouts


def test_image_rows_decode_as_the_input_pipeline(tmp_path):
    from PIL import Image

    from agegender.facedata.input_pipeline import image_dataset

    rng = np.random.default_rng(0)
    for index in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            tmp_path / f"{index}.jpg"
        )
    table = pd.DataFrame(
        {
            "full_path": [f"{index}.jpg" for index in range(5)],
            "gender": [0, 1, 0, 1, 1],
            "age": [10, 20, 30, 40, 50],
        }
    )
    whole = next(iter(image_dataset(table, tmp_path, 32, 5)))[0].numpy()
    rows = np.array([3, 0, 4])
    for in_memory in (True, False):
        images = ImageRows(table, tmp_path, 32, in_memory)
        assert len(images) == 5
        np.testing.assert_array_equal(images[rows], whole[rows])


def loss_history(losses):
    return pd.DataFrame({"epoch": range(len(losses)), "loss": losses, "val_loss": 1.0})


def test_a_finite_history_passes_and_keeps_the_backup(tmp_path):
    training.refuse_diverged(loss_history([2.0, 1.5, 1.2]), 1, tmp_path)
    assert tmp_path.exists()


def test_nan_on_several_replicas_names_the_reports_and_drops_the_backup(tmp_path):
    backup = tmp_path / "train_backup"
    backup.mkdir()
    with pytest.raises(PipelineError, match=r"from epoch 2 on 2 replicas.*#87432, #62915"):
        training.refuse_diverged(loss_history([2.0, np.nan, np.nan]), 2, backup)
    assert not backup.exists()


def test_an_infinite_loss_on_one_device_suggests_a_lower_rate(tmp_path):
    with pytest.raises(PipelineError, match=r"from epoch 1; lower train.lr"):
        training.refuse_diverged(loss_history([np.inf, 1.0]), 1, tmp_path)
