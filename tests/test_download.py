"""The download stage end to end on tiny archives, served over HTTP on loopback."""
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import REPO

from agegender import datasets
from agegender.errors import PipelineError
from agegender.fetch import md5_of
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
    download_data(params)
    assert Path("data/raw/wiki_crop/wiki.mat").read_bytes() == b"MATLAB"
    assert Path("data/downloads/wiki_crop.tar.gz").read_bytes() == body
    metrics = json.loads(Path("metrics/download.json").read_text())
    assert metrics == {"dataset": "wiki_crop", "archives": 1, "bytes": len(body), "files": 2}
    download_data(params)  # a re-run uses the cache
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
    params = project(model={"weights": "imagenet"})
    name = datasets.weights_source("vgg16", params["train"]["input_size"])["file"]
    Path("data/downloads").mkdir(parents=True)
    Path("data/downloads", name).write_bytes(b"not the weights")
    with pytest.raises(PipelineError, match="md5"):
        download_weights(params)


def test_imagenet_weights_over_http(project, server, monkeypatch):
    params = project(model={"weights": "imagenet"}, train={"input_size": 224})
    source = datasets.WEIGHTS["vgg16"]["top"]
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
    download_weights(project(model={"weights": "none"}))
    assert [p.name for p in Path("data/weights").iterdir()] == ["weights.json"]
    info = json.loads(Path("data/weights/weights.json").read_text())
    assert info == {"backbone": "vgg16", "weights": "none", "file": None, "md5": None}


def test_cli_offline_prints_one_paragraph(project, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    project(data={"dataset": "wiki_crop", "url": f"http://127.0.0.1:{closed_port}/wiki_crop.tar"})
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-m", "agegender.stages.download", "data"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert "by hand" in result.stderr and "Traceback" not in result.stderr
