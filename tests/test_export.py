"""Stage export: SavedModel, TFLite and ONNX files that predict what Keras predicts on the first
test faces, the pyfunc model registered in MLflow, and no failed stage when MLflow fails."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
import warnings
from pathlib import Path

import keras
import numpy as np
import onnxruntime
import pandas as pd
import pytest
import tensorflow as tf
from conftest import REPO, install_model, with_age_range

from agegender.contracts.layout import CROP_IMAGES, STAGE_METRICS, WEIGHTS, split_table
from agegender.inference import pyfunc
from agegender.inference.pyfunc import float32_model
from agegender.nets.model import build_networks, load_model
from agegender.stages import export

SIZE = 32
TEST_CROPS = 3  # fewer than CHECK_INPUTS: the check takes the test faces there are
TEST_FACES = 5


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """VGG16 at 32 px with small heads, untrained; with the augmentation layers the default
    params put in the model, which turn training on when the model is called without `training`."""
    path = tmp_path_factory.mktemp("export-model") / "model.keras"
    build_networks(
        SIZE, head_units=(8,), trainable_layers=0, flip=True, brightness=0.1
    ).image_model.save(path)
    return with_age_range(path)


def scratch_project(project, model):
    """A scratch project with models/model.keras and its own MLflow experiment."""
    experiment = f"test-export-{uuid.uuid4().hex[:8]}"
    params = project(mlflow={"experiment": experiment})
    install_model(model, export.MODEL)
    return params


@pytest.fixture
def exported(project, tiny_model, sample_dir):
    """The image model, with the bundled sample's first real face crops as the test split."""
    params = scratch_project(project, tiny_model)
    add_test_crops(sample_dir, TEST_CROPS)
    return params


@pytest.fixture
def chip_project(project, chip_model, face_models, sample_dir):
    """The chip model (dlib's face network inside), real test crops, and the landmark model
    that cuts their chips (the registered model carries it too)."""
    params = scratch_project(project, chip_model)
    add_test_crops(sample_dir, TEST_FACES)
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    WEIGHTS.symlink_to(face_models)
    return params


def add_test_crops(sample_dir, count):
    faces = sorted((sample_dir / "90").glob("*.jpg"))[:count]
    names = [f"90/{face.name}" for face in faces]
    for face, name in zip(faces, names):
        (CROP_IMAGES / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(face, CROP_IMAGES / name)
    split_table("test").parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pd.DataFrame(
        {"full_path": names, "gender": rng.integers(0, 2, count), "age": rng.integers(1, 90, count)}
    ).to_csv(split_table("test"), index=False)


def onnx_session(path, input_name):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape[0]) for i in session.get_inputs()] == [(input_name, "batch")]
    assert [o.name for o in session.get_outputs()] == ["gender", "age"]
    return session


def onnx_outputs(session, inputs):
    return dict(zip(["gender", "age"], session.run(["gender", "age"], {"image": inputs})))


def tflite_outputs(path, images):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(model_path=str(path))
    assert interpreter.get_signature_list()["serving_default"] == {
        "inputs": ["image"],
        "outputs": ["age", "gender"],
    }
    return interpreter.get_signature_runner("serving_default")(image=images)


def test_export_writes_saved_model_tflite_and_onnx_that_match_keras(exported):
    import mlflow

    export.main()

    assert (export.SAVED_MODEL / "saved_model.pb").is_file()
    assert export.TFLITE.is_file() and export.TFLITE.stat().st_size > 1_000_000
    assert export.ONNX.is_file() and export.ONNX.stat().st_size > 1_000_000
    metrics = json.loads(STAGE_METRICS["export"].read_text())
    assert metrics["check_inputs"] == "test crops"
    assert metrics["check_count"] == TEST_CROPS
    assert metrics["cast_to_float32"] is False
    for fmt in ("onnx", "tflite", "saved_model"):
        assert set(metrics["max_abs_diff"][fmt]) == {"gender", "age"}
        assert max(metrics["max_abs_diff"][fmt].values()) < 1e-4
    assert "size_bytes" not in metrics  # they differ run to run: in MLflow, not in git

    # ONNX in onnxruntime against Keras, on the test crops and on a batch of another size
    model = load_model(export.MODEL)
    session = onnx_session(export.ONNX, "image")
    crops, _ = export.check_inputs(model, 0.4)
    assert crops.shape == (TEST_CROPS, SIZE, SIZE, 3) and crops.std() > 10  # decoded faces
    for inputs in (crops, crops[:1]):
        expected, got = model.predict(inputs, verbose=0), onnx_outputs(session, inputs)
        for task in ("gender", "age"):
            assert got[task].shape == expected[task].shape
            np.testing.assert_allclose(got[task], expected[task], atol=1e-4)

    # TFLite against Keras, on images the stage did not check
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
    assert sizes["size_bytes.onnx"] == export.ONNX.stat().st_size
    # each weight stored once, not twice (as `ExportArchive.track` would)
    assert sizes["size_bytes.saved_model"] < 1.2 * sizes["size_bytes.keras"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "tflite")] == [
        "tflite/model.tflite"
    ]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "onnx")] == ["onnx/model.onnx"]


def test_a_chip_model_is_exported_whole_and_checked_on_real_test_chips(chip_project):
    export.main()

    metrics = json.loads(STAGE_METRICS["export"].read_text())
    assert metrics["check_inputs"] == "test chips"
    assert metrics["check_count"] == TEST_FACES
    for fmt in ("onnx", "tflite", "saved_model"):
        assert max(metrics["max_abs_diff"][fmt].values()) < 1e-4
    model = load_model(export.MODEL)
    chips, _ = export.check_inputs(model, 0.4)
    assert chips.shape == (TEST_FACES, 150, 150, 3) and chips.std() > 10  # real faces

    # the ONNX file alone answers for chips as Keras does: the face network is inside
    session = onnx_session(export.ONNX, "chip")
    expected = model.predict(chips, verbose=0)
    got = dict(zip(["gender", "age"], session.run(["gender", "age"], {"chip": chips})))
    for task in ("gender", "age"):
        np.testing.assert_allclose(got[task], expected[task], atol=1e-4)
    # a face and its mirror image are averaged inside: the mirrored chips get the same answer
    mirrored = session.run(["gender", "age"], {"chip": np.ascontiguousarray(chips[:, :, ::-1])})
    np.testing.assert_allclose(mirrored[1], got["age"], atol=1e-5)
    assert np.abs(got["age"] - got["age"][::-1]).max() > 1e-4  # and faces differ


def test_the_readmes_onnx_example_runs_on_a_real_photo(chip_project, capsys):
    """The README's ONNX block as written (dlib cuts the chip, onnxruntime alone answers), on
    Grace Hopper's photo as `face.jpg`."""
    import matplotlib

    export.main()
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    shutil.copy(photo, "face.jpg")
    readme = (REPO / "README.md").read_text()
    example = readme.split("    import dlib, numpy as np, onnxruntime\n", 1)[1]
    example = "import dlib, numpy as np, onnxruntime\n" + example.split("\n\n", 1)[0]
    capsys.readouterr()
    exec(textwrap.dedent(example.replace("\n    ", "\n")), {})
    gender, age = capsys.readouterr().out.split()
    assert gender in ("female", "male") and 0 <= float(age) <= 100


def test_an_export_that_disagrees_with_keras_fails_the_stage(chip_project, monkeypatch, capsys):
    predict = export.onnx_predict

    def off(*args):
        outputs = predict(*args)
        return {**outputs, "age": outputs["age"] + 0.01}

    monkeypatch.setattr(export, "onnx_predict", off)
    with pytest.raises(SystemExit) as exit_info:
        export.main()
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "disagree with Keras by up to 0.01" in error and str(export.ONNX) in error
    assert not STAGE_METRICS["export"].exists()


def test_export_goes_on_when_mlflow_logging_fails(exported, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("registry unavailable")

    monkeypatch.setattr(pyfunc, "log_pyfunc", broken)
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
from agegender.inference.exporters import export_saved_model

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


ONNX_IN_A_FRESH_PROCESS = """
import sys
from agegender.nets.model import load_model
from agegender.inference.exporters import export_onnx

model = load_model(sys.argv[1])
for copy in sys.argv[2:]:
    export_onnx(model, copy)
"""


def test_the_onnx_file_is_the_same_bytes_every_time(tmp_path, chip_model):
    """tf2onnx names what it makes from a counter that runs on within a process, and picks one
    of equal weights (the heads' own, read for the face and for its mirror) by the order of a
    set of strings, which changes with each process's hash seed."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONHASHSEED"}
    copies = [tmp_path / f"{run}-{index}.onnx" for run in ("first", "second") for index in (1, 2)]
    for run in (copies[:2], copies[2:]):
        subprocess.run(
            [sys.executable, "-c", ONNX_IN_A_FRESH_PROCESS, str(chip_model), *map(str, run)],
            check=True,
            capture_output=True,
            env=env,
        )
    contents = {path.read_bytes() for path in copies}
    assert len(contents) == 1 and len(next(iter(contents))) > 10_000
