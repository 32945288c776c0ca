"""agegender.training: params -> network settings, the weights file, compiling and callbacks."""

import copy
import inspect
import json

import numpy as np
import pytest
from conftest import REPO

keras = pytest.importorskip("keras")

from agegender import training  # noqa: E402
from agegender.errors import PipelineError  # noqa: E402
from agegender.losses import HeadLoss  # noqa: E402
from agegender.model import build_networks  # noqa: E402
from agegender.params import load_params  # noqa: E402
from agegender.training import (  # noqa: E402
    ReseedEachEpoch,
    base_weights,
    compile_for_training,
    network_settings,
    phase_history,
    resume_point,
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
    monkeypatch.setattr(training, "WEIGHTS_DIR", tmp_path)
    (tmp_path / "weights.json").write_text(json.dumps({"file": "vgg16_notop.h5"}))
    with pytest.raises(PipelineError, match="vgg16_notop.h5"):
        base_weights("imagenet")
    (tmp_path / "vgg16_notop.h5").write_bytes(b"h5")
    assert base_weights("imagenet") == tmp_path / "vgg16_notop.h5"


@pytest.mark.parametrize("manifest", [None, {"weights": "none", "file": None}])
def test_imagenet_without_downloaded_weights_is_a_pipeline_error(tmp_path, monkeypatch, manifest):
    monkeypatch.setattr(training, "WEIGHTS_DIR", tmp_path)
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
        keras.callbacks.BackupAndRestore,
        ReseedEachEpoch,
        keras.callbacks.CSVLogger,
        keras.callbacks.Callback,
    ]
    assert plain[2].filename == str(tmp_path / "head.csv") and plain[2].append

    stopping = training_callbacks(
        section(early_stopping=4, lr_schedule="cosine"), tmp_path, "head", []
    )
    early = [c for c in stopping if isinstance(c, keras.callbacks.EarlyStopping)]
    assert len(early) == 1 and early[0].restore_best_weights and early[0].patience == 4
    assert early[0].monitor == "val_loss"
    assert keras.callbacks.ReduceLROnPlateau not in callback_types(stopping)

    plateau = training_callbacks(section(lr_schedule="plateau"), tmp_path, "head", [])
    assert keras.callbacks.ReduceLROnPlateau in callback_types(plateau)
    assert keras.callbacks.EarlyStopping not in callback_types(plateau)


def test_a_fresh_phase_forgets_an_old_log_and_a_resumed_one_is_cut_to_its_checkpoint(tmp_path):
    (tmp_path / "head.csv").write_text("epoch,loss\n0,1.0\n")
    assert resume_point(tmp_path, "head") == 0
    assert not (tmp_path / "head.csv").exists()
    (tmp_path / "head").mkdir()
    (tmp_path / "head" / "training_metadata.json").write_text('{"epoch": 2, "batch": 0}')
    (tmp_path / "head.csv").write_text(
        "epoch,loss\n0,3.0\n1,2.0\n2,1.0\n"
    )  # killed after logging epoch 2
    assert resume_point(tmp_path, "head") == 2
    assert (tmp_path / "head.csv").read_text() == "epoch,loss\n0,3.0\n1,2.0\n"


def test_phase_history_numbers_epochs_on(tmp_path):
    (tmp_path / "head.csv").write_text("epoch,loss\n0,3.0\n1,2.0\n")
    (tmp_path / "finetune.csv").write_text("epoch,loss\n2,1.5\n")
    history = phase_history(tmp_path, ["head", "finetune"])
    assert list(history["epoch"]) == [0, 1, 2] and list(history["loss"]) == [3.0, 2.0, 1.5]
