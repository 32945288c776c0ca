"""The predict CLI on a real photo (Grace Hopper, shipped with matplotlib) with a tiny untrained
model."""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import yaml
from PIL import Image

from agegender.images import load_rgb, resize_whole
from agegender.inference import find_faces, predict_faces
from agegender.metrics import bin_labels
from agegender.predict import main

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
REPO = Path(__file__).resolve().parents[1]
BINS = [0, 10, 20, 30, 40, 50, 60]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny model (VGG16 at 32 px, untrained) and a params.yaml cropping at 32 px."""
    from agegender.model import build_networks

    root = tmp_path_factory.mktemp("predict")
    model = root / "model.keras"
    build_networks(32, head_units=(8,), trainable_layers=0).image_model.save(model)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["crop"]["size"] = 32
    params["train"]["input_size"] = 32
    params["evaluate"]["age_bins"] = BINS
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def predict(setup, capsys, *args):
    status = main(
        [
            *map(str, args),
            "--model",
            str(setup / "model.keras"),
            "--params",
            str(setup / "params.yaml"),
        ]
    )
    out, err = capsys.readouterr()
    return status, out, err


def check_face(record, width, height):
    x1, y1, x2, y2 = record["box"]
    assert all(isinstance(v, int) for v in record["box"])
    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    # the face of the 512x600 portrait lies around x 180-350, y 110-330
    assert 150 < (x1 + x2) / 2 < 380 and 100 < (y1 + y2) / 2 < 340
    assert 60 < x2 - x1 < 300 and 60 < y2 - y1 < 300
    assert 0.9 <= record["confidence"] <= 1
    assert record["gender"] in ("male", "female") and 0.5 <= record["gender_prob"] <= 1
    assert 0 <= record["age"] <= 100 and record["age"] == round(record["age"], 1)
    assert record["age_bin"] in bin_labels(BINS) and 0 <= record["age_bin_prob"] <= 1


@pytest.fixture
def folder(tmp_path):
    """Grace Hopper, a gray image without a face and a corrupt JPEG, plus a non-image file."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(GRACE_HOPPER, photos / "hopper.JPG")
    (photos / "sub").mkdir()
    shutil.copy(GRACE_HOPPER, photos / "sub" / "again.jpeg")
    Image.new("RGB", (200, 160), (128, 128, 128)).save(photos / "gray.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "notes.txt").write_text("not an image")
    return photos


def test_one_face_in_grace_hopper(setup, capsys):
    status, out, err = predict(setup, capsys, GRACE_HOPPER)
    assert status == 0
    lines = out.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["file"] == str(GRACE_HOPPER) and record["face"] == 0
    check_face(record, *Image.open(GRACE_HOPPER).size)


def test_folder_reports_bad_files_and_goes_on(setup, capsys, folder):
    status, out, err = predict(setup, capsys, folder, "--annotate", folder.parent / "annotated")
    assert status == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["file"] for r in records] == [
        str(folder / "hopper.JPG"),
        str(folder / "sub" / "again.jpeg"),
    ]
    check_face(records[0], 512, 600)
    # both faces went through one model call
    assert {**records[0], "file": ""} == {**records[1], "file": ""}
    assert (folder.parent / "annotated" / "hopper.JPG").is_file()
    assert (folder.parent / "annotated" / "sub" / "again.jpeg").is_file()
    problems = [line for line in err.splitlines() if line.startswith(str(folder))]
    assert problems == [f"{folder / 'broken.jpg'}: unreadable", f"{folder / 'gray.png'}: no_face"]
    assert "notes.txt" not in err


def test_csv_has_a_header_and_one_row(setup, capsys):
    status, out, _ = predict(setup, capsys, GRACE_HOPPER, "--format", "csv")
    assert status == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert out.startswith(
        "file,face,x1,y1,x2,y2,confidence,gender,gender_prob,age,age_bin,age_bin_prob\n"
    )
    assert len(rows) == 1 and rows[0]["face"] == "0" and rows[0]["gender"] in ("male", "female")
    assert 0 <= float(rows[0]["age"]) <= 100


def test_annotate_draws_on_a_copy(setup, capsys, tmp_path):
    source = tmp_path / "hopper.png"
    load_rgb(GRACE_HOPPER).save(source)
    status, _, _ = predict(setup, capsys, source, "--annotate", tmp_path / "annotated")
    assert status == 0
    original = np.asarray(Image.open(source).convert("RGB"))
    drawn = np.asarray(Image.open(tmp_path / "annotated" / "hopper.png").convert("RGB"))
    assert drawn.shape == original.shape
    changed = (drawn != original).any(axis=2)
    assert 0.001 < changed.mean() < 0.2  # the box and its label, not the whole photo


def test_nothing_predicted_exits_1(setup, capsys, folder, tmp_path):
    (folder / "hopper.JPG").unlink()
    shutil.rmtree(folder / "sub")
    Image.new("1", (6500, 6500)).save(folder / "huge.png")  # over the decompression-bomb guard
    status, out, err = predict(setup, capsys, folder, tmp_path / "missing.jpg")
    assert status == 1 and out == ""
    for name, reason in [
        ("broken.jpg", "unreadable"),
        ("gray.png", "no_face"),
        ("huge.png", "too_large"),
    ]:
        assert f"{folder / name}: {reason}" in err.splitlines()
    assert f"{tmp_path / 'missing.jpg'}: missing" in err.splitlines()


def test_missing_model_says_to_train(setup, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                str(GRACE_HOPPER),
                "--model",
                str(tmp_path / "none.keras"),
                "--params",
                str(setup / "params.yaml"),
            ]
        )
    assert exit_info.value.code == 1
    assert "dvc repro train" in capsys.readouterr().err


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--batch-size", "0", str(GRACE_HOPPER)])
    assert exit_info.value.code == 2


def test_core_functions_batch_and_resize(setup):
    from agegender.inference import Predictor

    faces = find_faces(load_rgb(GRACE_HOPPER), margin=0.4, size=48)
    assert len(faces) == 1 and faces[0].crop.size == (48, 48)
    model = Predictor.load(setup / "model.keras")
    crops = [faces[0].crop, resize_whole(faces[0].crop, 32), Image.new("RGB", (20, 20))]
    results = predict_faces(model, crops, BINS, batch_size=2)  # two model calls
    assert len(results) == 3 and results[0] == results[1]  # crops are resized to the model's 32 px
    assert all(0 <= r["age"] <= 100 and r["age_bin"] in bin_labels(BINS) for r in results)
    assert predict_faces(model, [], BINS) == []


def test_command_line_entry_point(setup, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "agegender.predict",
            str(GRACE_HOPPER),
            "--model",
            str(setup / "model.keras"),
            "--params",
            str(setup / "params.yaml"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    check_face(json.loads(result.stdout.strip()), 512, 600)
