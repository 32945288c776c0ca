"""Stage export: SavedModel and TFLite files that predict what Keras predicts, the pyfunc model
registered in MLflow, and no failed stage when MLflow fails."""

import json
import shutil
import subprocess
import sys
import uuid
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from agegender import serving
from agegender.layout import STAGE_METRICS
from agegender.model import build_networks, load_model
from agegender.serving import float32_model
from agegender.stages import export

SIZE = 32


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """VGG16 at 32 px with small heads, untrained; with the augmentation layers the default
    params put in the model, which turn training on when the model is called without `training`."""
    path = tmp_path_factory.mktemp("export-model") / "model.keras"
    build_networks(
        SIZE, head_units=(8,), trainable_layers=0, flip=True, brightness=0.1
    ).image_model.save(path)
    return path


@pytest.fixture
def exported(project, tiny_model):
    """A scratch project with models/model.keras and its own MLflow experiment."""
    experiment = f"test-export-{uuid.uuid4().hex[:8]}"
    params = project(mlflow={"experiment": experiment})
    (export.MODEL).parent.mkdir(parents=True)
    shutil.copy(tiny_model, export.MODEL)
    return params


def tflite_outputs(path, images):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(model_path=str(path))
    assert interpreter.get_signature_list()["serving_default"] == {
        "inputs": ["image"],
        "outputs": ["age", "gender"],
    }
    return interpreter.get_signature_runner("serving_default")(image=images)


def test_export_writes_saved_model_and_tflite_that_match_keras(exported):
    import mlflow

    export.main()

    assert (export.SAVED_MODEL / "saved_model.pb").is_file()
    assert export.TFLITE.is_file() and export.TFLITE.stat().st_size > 1_000_000
    metrics = json.loads(STAGE_METRICS["export"].read_text())
    assert metrics["check_images"] == export.CHECK_IMAGES
    assert metrics["cast_to_float32"] is False
    for fmt in ("tflite", "saved_model"):
        assert set(metrics["max_abs_diff"][fmt]) == {"gender", "age"}
        assert max(metrics["max_abs_diff"][fmt].values()) < 1e-4
    assert "size_bytes" not in metrics  # they differ run to run: in MLflow, not in git

    # TFLite against Keras, on images the stage did not check
    model = load_model(export.MODEL)
    images = np.random.default_rng(7).uniform(0, 255, (3, SIZE, SIZE, 3)).astype(np.float32)
    expected = model.predict(images, verbose=0)
    lite = tflite_outputs(export.TFLITE, images)
    for task in ("gender", "age"):
        assert lite[task].shape == expected[task].shape
        np.testing.assert_allclose(lite[task], expected[task], atol=1e-4)

    # the SavedModel's serving signature: inference mode (dropout and augmentation off),
    # deterministic
    reloaded = tf.saved_model.load(str(export.SAVED_MODEL))
    serve = reloaded.signatures["serving_default"]
    first, second = serve(image=tf.constant(images)), serve(image=tf.constant(images))
    for task in ("gender", "age"):
        np.testing.assert_array_equal(first[task].numpy(), second[task].numpy())
        np.testing.assert_allclose(first[task].numpy(), expected[task], atol=1e-5)

    # MLflow: the export run with its metrics and the TFLite file, and a registered model version
    name = f"{exported['mlflow']['experiment']}-model"
    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name = '{name}'")
    assert [int(v.version) for v in versions] == [1]
    assert int(client.get_model_version_by_alias(name, "champion").version) == 1
    run = client.get_run(versions[0].run_id)
    assert run.data.tags["stage"] == "export"
    assert run.data.metrics["max_abs_diff.tflite.age"] < 1e-4
    sizes = {key: value for key, value in run.data.metrics.items() if key.startswith("size_bytes.")}
    assert sizes["size_bytes.tflite"] == export.TFLITE.stat().st_size
    # each weight stored once, not twice (as `ExportArchive.track` would)
    assert sizes["size_bytes.saved_model"] < 1.2 * sizes["size_bytes.keras"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "tflite")] == [
        "tflite/model.tflite"
    ]


def test_export_goes_on_when_mlflow_logging_fails(exported, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("registry unavailable")

    monkeypatch.setattr(serving, "log_pyfunc", broken)
    with pytest.warns(UserWarning, match="registry unavailable"):
        export.main()
    assert export.TFLITE.is_file() and STAGE_METRICS["export"].is_file()
    assert "registered as" not in capsys.readouterr().out


def test_export_without_a_model_says_what_to_run(project, capsys):
    project()
    with pytest.raises(SystemExit) as exit_info:
        export.main()
    assert exit_info.value.code == 1
    assert "dvc repro train" in capsys.readouterr().err


def test_float32_model_of_a_mixed_precision_model():
    """A model trained under mixed_float16 computes in float32 after export (TFLite has no float16
    convolutions)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build_networks(SIZE, head_units=(8,), trainable_layers=0, flip=True).image_model
    finally:
        keras.config.set_dtype_policy(previous)
    copy = float32_model(model)
    assert copy is not model
    assert {layer.dtype_policy.name for layer in copy._flatten_layers()} == {"float32"}
    images = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    expected, got = model.predict(images, verbose=0), copy.predict(images, verbose=0)
    for task in ("gender", "age"):
        np.testing.assert_allclose(got[task], expected[task], atol=5e-3)
    assert float32_model(copy) is copy


EXPORT_IN_A_FRESH_PROCESS = """
import sys
import keras
from agegender.stages.export import export_saved_model

keras.utils.set_random_seed(0)
inputs = keras.Input((16,))
x = inputs
for units in (32, 24, 16, 8):
    x = keras.layers.Dense(units, activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
model = keras.Model(inputs, {"gender": keras.layers.Dense(2, name="gender")(x),
                             "age": keras.layers.Dense(101, name="age")(x)})
export_saved_model(model, sys.argv[1])
"""


def test_the_saved_model_is_the_same_bytes_every_time(tmp_path):
    """dvc.lock records the export's hash, so a re-export of the same model must not change it
    (TensorFlow orders a function's variables by memory address and writes a random uuid)."""
    contents = []
    for name in ("first", "second"):
        subprocess.run(
            [sys.executable, "-c", EXPORT_IN_A_FRESH_PROCESS, str(tmp_path / name)],
            check=True,
            capture_output=True,
        )
        files = sorted(p for p in (tmp_path / name).rglob("*") if p.is_file())
        contents.append({p.relative_to(tmp_path / name): p.read_bytes() for p in files})
    assert "saved_model.pb" in {str(path) for path in contents[0]}
    assert contents[0] == contents[1]
