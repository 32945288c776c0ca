"""The pyfunc model: logged and registered, loaded back, and served by `mlflow models serve`,
on a real photo (Grace Hopper, shipped with matplotlib) with a tiny untrained model."""

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from conftest import install_model, with_age_range
from PIL import Image

from agegender.contracts.labels import bin_labels
from agegender.facedata.images import as_array, load_rgb, reframe_crop
from agegender.inference.pyfunc import (
    OUTPUT_COLUMNS,
    SIGNATURE,
    AgeGenderModel,
    encode_image,
    log_pyfunc,
)
from agegender.nets.model import build_networks, load_model

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
REPO = Path(__file__).resolve().parents[1]
SIZE = 32
BINS = [0, 15, 30, 45, 60]


def b64_file(path):
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tracking_uri):
    """The tiny model logged as a pyfunc model in a fresh experiment of the tests' sqlite store,
    its artifacts under tmp, and registered under a fresh name."""
    import mlflow

    root = tmp_path_factory.mktemp("serving")
    model_path = root / "model.keras"
    build_networks(
        SIZE, head_units=(8,), trainable_layers=0, flip=True, brightness=0.1
    ).image_model.save(model_path)
    with_age_range(model_path)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"]["age_bins"] = BINS
    params["crop"]["size"] = SIZE
    name = f"test-serving-{uuid.uuid4().hex[:8]}"
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.create_experiment(name, artifact_location=(root / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = log_pyfunc(model_path, params, registered_name=name)
    return {
        "uri": f"models:/{name}/{info.registered_model_version}",
        "name": name,
        "model_path": model_path,
        "tracking_uri": tracking_uri,
        "version": info.registered_model_version,
    }


@pytest.fixture(scope="module")
def loaded(registered):
    import mlflow

    mlflow.set_tracking_uri(registered["tracking_uri"])
    return mlflow.pyfunc.load_model(registered["uri"])


def check_rows(result, rows):
    assert list(result.columns) == OUTPUT_COLUMNS
    assert len(result) == rows
    assert set(result["gender"]) <= {"female", "male"}
    assert result["gender_prob"].between(0.5, 1.0).all()
    assert result["age"].between(0, 100).all()
    assert set(result["age_bin"]) <= set(bin_labels(BINS))
    for age, (low, high) in zip(result["age"], result["age_range"]):
        assert 0 <= low <= age <= high <= 100


def test_logged_model_carries_signature_requirements_and_code(registered, loaded):
    import mlflow

    assert int(registered["version"]) == 1
    metadata = loaded.metadata
    assert metadata.signature.to_dict() == SIGNATURE.to_dict()
    local = Path(mlflow.artifacts.download_artifacts(registered["uri"]))
    requirements = (local / "requirements.txt").read_text().split()
    assert {"tensorflow==2.21.0", "keras==3.15.1"} <= set(requirements)
    assert any(line.startswith("pillow") for line in requirements) and any(
        line.startswith("pandas") for line in requirements
    )
    assert (local / "code" / "agegender" / "inference" / "pyfunc.py").is_file()
    assert (local / "artifacts" / "model.keras").is_file()


def test_pyfunc_predicts_a_real_photo(registered, loaded):
    from mlflow.models import infer_signature

    frame = pd.DataFrame(
        {
            "image": [
                b64_file(GRACE_HOPPER),
                encode_image(Image.new("RGB", (50, 70), (200, 150, 120)), "PNG"),
            ]
        }
    )
    result = loaded.predict(frame)
    check_rows(result, 2)
    # the signature is what the inputs and outputs really are
    assert infer_signature(frame, result).to_dict() == SIGNATURE.to_dict()

    # the same figures as the Keras model on the photo framed as a training crop
    model = load_model(registered["model_path"])
    crop = reframe_crop(load_rgb(GRACE_HOPPER), 0.4, 0.4, SIZE)
    outputs = model.predict(as_array(crop)[None].astype(np.float32), verbose=0)
    expected_age = float(outputs["age"][0] @ np.arange(101))
    assert result["age"][0] == pytest.approx(expected_age, abs=1e-4)
    assert result["gender_prob"][0] == pytest.approx(float(outputs["gender"][0].max()), abs=1e-5)
    assert result["gender"][0] == ("female", "male")[int(outputs["gender"][0].argmax())]


def test_pyfunc_is_deterministic_and_takes_data_urls(loaded):
    """Inference mode: the augmentation and dropout layers stay off."""
    text = b64_file(GRACE_HOPPER)
    frame = pd.DataFrame({"image": [text, f"data:image/jpeg;base64,{text}"]})
    first, second = loaded.predict(frame), loaded.predict(frame)
    pd.testing.assert_frame_equal(first, second)
    assert first["age"][0] == first["age"][1]


def test_pyfunc_rejects_what_is_not_an_image(loaded):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="row 1: 'image' is not valid base64"):
        loaded.predict(pd.DataFrame({"image": [b64_file(GRACE_HOPPER), "not base64!"]}))
    with pytest.raises(
        MlflowException, match="row 0: 'image' is not a decodable JPEG or PNG image"
    ):
        loaded.predict(
            pd.DataFrame({"image": [base64.b64encode(b"plain text, no image").decode()]})
        )


def test_python_model_answers_an_empty_frame(loaded):
    python_model = loaded.unwrap_python_model()
    assert isinstance(python_model, AgeGenderModel)
    result = python_model.predict(None, pd.DataFrame({"image": pd.Series([], dtype=str)}))
    assert list(result.columns) == OUTPUT_COLUMNS and len(result) == 0


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(process, url, log, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"mlflow models serve exited with {process.returncode}:\n{log.read_text()[-4000:]}"
            )
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    pytest.fail(
        f"mlflow models serve did not answer /ping within {timeout} s:\n{log.read_text()[-4000:]}"
    )


def stop(process):
    """The server and every worker it started: they share its process group."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
    try:  # workers left behind after the leader exited
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(registered, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registered["tracking_uri"],
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    log = tmp_path / "serve.log"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        registered["uri"],
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        wait_until_up(process, url, log)
        answer = requests.post(
            f"{url}/invocations",
            json={"dataframe_records": [{"image": b64_file(GRACE_HOPPER)}]},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        check_rows(pd.DataFrame(answer.json()["predictions"]), 1)

        refused = requests.post(
            f"{url}/invocations", json={"dataframe_records": [{"image": "not base64!"}]}, timeout=60
        )
        assert refused.status_code == 400
        assert "not valid base64" in refused.json()["message"]
    finally:
        stop(process)


@pytest.mark.slow
def test_served_model_uses_its_own_copy_of_the_package(registered, tmp_path):
    """Loading puts the package copy the model carries (code_paths) first on sys.path, so
    `--env-manager local` serves without an installed agegender."""
    script = (
        "import mlflow, sys; mlflow.pyfunc.load_model(sys.argv[1]); "
        "import agegender; print(agegender.__file__)"
    )
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registered["tracking_uri"],
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    result = subprocess.run(
        [sys.executable, "-c", script, registered["uri"]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.parent.parent.name == "code", path


def test_dlib_model_is_served_on_crops_with_its_landmark_model(
    tmp_path, tracking_uri, sample_dir, face_models, chip_model
):
    """A dlib_resnet model logs dlib's landmark model beside the Keras model (the face network
    is inside it), so the served model takes face crops and answers as the inference core does
    on the same crops."""
    import mlflow

    from agegender.inference.predictor import Predictor

    install_model(chip_model, tmp_path / "model.keras")
    weights = face_models  # links: the logged model must carry the files themselves
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"]["age_bins"] = BINS
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.create_experiment(
        f"test-dlib-{uuid.uuid4().hex[:8]}", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    with mlflow.start_run(experiment_id=experiment):
        info = log_pyfunc(
            tmp_path / "model.keras", params, registered_name=None, face_models_dir=weights
        )
    logged = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    assert sorted(path.name for path in logged.rglob("*.dat")) == [
        "shape_predictor_5_face_landmarks.dat"  # the face network is inside the Keras model
    ]
    served = mlflow.pyfunc.load_model(info.model_uri)
    faces = sorted((sample_dir / "91").glob("*.jpg"))[:3]
    result = served.predict(pd.DataFrame({"image": [b64_file(path) for path in faces]}))
    check_rows(result, 3)
    expected = Predictor.load(tmp_path / "model.keras", params, weights).crops(faces)
    assert result.to_dict("records") == expected
