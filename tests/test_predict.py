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
from PIL import Image

from agegender.apps.cli import main as agegender
from agegender.contracts.labels import age_bin, bin_labels
from agegender.facedata.images import load_rgb, resize_whole
from agegender.inference.predictor import Predictor, crop_box, find_faces

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
REPO = Path(__file__).resolve().parents[1]
BINS = [0, 10, 20, 30, 40, 50, 60]


@pytest.fixture(scope="module")
def setup(tiny_image_model):
    return tiny_image_model


def predict(setup, capsys, *args):
    status = agegender(
        [
            "predict",
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
    assert 0 <= record["age"] <= 100
    low, high = record["age_range"]
    assert 0 <= low <= record["age"] <= high <= 100
    assert record["age_bin"] == bin_labels(BINS)[age_bin(record["age"], BINS)]
    assert record["most_likely_age_bin"] in bin_labels(BINS)
    assert 0 < record["most_likely_age_bin_prob"] <= 1


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


def test_folder_reports_bad_files_goes_on_and_exits_1(setup, capsys, folder):
    status, out, err = predict(setup, capsys, folder, "--annotate", folder.parent / "annotated")
    assert status == 1  # broken.jpg could not be read
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
    assert err.splitlines()[-1] == "predict: 1 file(s) could not be read"


def test_batches_of_any_size_answer_alike_and_quiet_names_only_unreadable_files(
    setup, capsys, folder
):
    status, whole, err = predict(setup, capsys, folder, "--quiet")
    assert status == 1 and err.splitlines() == [
        f"{folder / 'broken.jpg'}: unreadable",
        "predict: 1 file(s) could not be read",
    ]
    _, one_by_one, _ = predict(setup, capsys, folder, "--batch-size", "1")
    assert len(whole.splitlines()) == len(one_by_one.splitlines()) == 2
    # a batch of one and a batch of two sum in another order: the last printed digit may move
    for batched, single in zip(whole.splitlines(), one_by_one.splitlines()):
        batched, single = json.loads(batched), json.loads(single)
        assert batched.keys() == single.keys()
        for key, value in batched.items():
            if isinstance(value, float):
                assert value == pytest.approx(single[key], abs=1e-4), key
            else:
                assert value == single[key], key


def test_a_photo_without_a_face_is_not_an_error(setup, capsys, folder):
    status, out, err = predict(setup, capsys, folder / "hopper.JPG", folder / "gray.png")
    assert status == 0 and len(out.splitlines()) == 1
    assert f"{folder / 'gray.png'}: no_face" in err.splitlines()


def test_a_missing_path_exits_1_after_the_others(setup, capsys, tmp_path):
    status, out, err = predict(setup, capsys, tmp_path / "missing.jpg", GRACE_HOPPER)
    assert status == 1 and len(out.splitlines()) == 1
    assert f"{tmp_path / 'missing.jpg'}: missing" in err.splitlines()
    (tmp_path / "empty").mkdir()
    status, out, err = predict(setup, capsys, tmp_path / "empty", GRACE_HOPPER)
    assert status == 1 and f"{tmp_path / 'empty'}: no_images" in err.splitlines()


def test_csv_has_a_header_and_one_row(setup, capsys):
    status, out, _ = predict(setup, capsys, GRACE_HOPPER, "--format", "csv")
    assert status == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert out.startswith(
        "file,face,x1,y1,x2,y2,confidence,gender,gender_prob,age,age_range_low,age_range_high,"
        "age_bin,most_likely_age_bin,most_likely_age_bin_prob\n"
    )
    assert len(rows) == 1 and rows[0]["face"] == "0" and rows[0]["gender"] in ("male", "female")
    assert 0 <= float(rows[0]["age_range_low"]) <= float(rows[0]["age"])
    assert float(rows[0]["age"]) <= float(rows[0]["age_range_high"]) <= 100


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


def test_missing_model_says_to_train_or_pass_model(setup, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        agegender(
            [
                "predict",
                str(GRACE_HOPPER),
                "--model",
                str(tmp_path / "none.keras"),
                "--params",
                str(setup / "params.yaml"),
            ]
        )
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "dvc repro train" in err and "--model" in err and str(tmp_path / "none.keras") in err


def test_missing_params_names_the_option(setup, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: no params.yaml here
    with pytest.raises(SystemExit) as exit_info:
        agegender(["predict", str(GRACE_HOPPER), "--model", str(setup / "model.keras")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: params.yaml not found") and "--params" in err
    assert "run the stage" not in err


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        agegender(["predict", "--batch-size", "0", str(GRACE_HOPPER)])
    assert exit_info.value.code == 2


def test_the_api_batches_resizes_and_takes_any_photo(setup):
    (faces,) = find_faces([load_rgb(GRACE_HOPPER)], margin=0.4, size=48)
    assert len(faces) == 1 and faces[0].crop.size == (48, 48)
    predictor = Predictor.load(setup / "model.keras", setup / "params.yaml", batch_size=2)
    crops = [faces[0].crop, resize_whole(faces[0].crop, 32), Image.new("RGB", (20, 20))]
    results = predictor.answers(crops)  # two model calls
    assert len(results) == 3 and results[0] == results[1]  # crops are resized to the model's 32 px
    assert all(0 <= r["age"] <= 100 and r["age_bin"] in bin_labels(BINS) for r in results)
    assert predictor.answers([]) == []
    (by_path,) = predictor.faces(GRACE_HOPPER)
    (by_array,) = predictor.faces(np.asarray(load_rgb(GRACE_HOPPER)))
    assert by_path == by_array and by_path["face"] == 0
    check_face(by_path, 512, 600)


def test_crops_run_no_detector_and_answer_as_the_api(setup, sample_dir, tmp_path):
    """One line per crop, the face box where the crop's margin puts it, the API's numbers; in a
    fresh process, so that MTCNN is seen not to load."""
    crops = sorted((sample_dir / "90").glob("*.jpg"))[:3]
    code = (
        "import sys\n"
        "from agegender.apps.cli import main\n"
        "status = main(['predict', *sys.argv[1:]])\n"
        "assert 'mtcnn' not in sys.modules\n"
        "assert 'agegender.facedata.face_detector' not in sys.modules\n"
        "sys.exit(status)\n"
    )
    args = ["--crops", "--model", setup / "model.keras", "--params", setup / "params.yaml"]
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, [*args, *crops])],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [record["file"] for record in records] == list(map(str, crops))
    expected = Predictor.load(setup / "model.keras", setup / "params.yaml").crops(crops)
    for record, path, answer in zip(records, crops, expected):
        assert record["face"] == 0 and record["confidence"] is None
        assert record["box"] == list(crop_box(load_rgb(path), 0.4))
        assert {key: record[key] for key in answer} == answer


def test_command_line_entry_point_writes_nothing_on_stderr(setup, tmp_path):
    """As a user runs it: the answer with its age range on stdout, and on stderr nothing at all,
    not even the lines TensorFlow's C++ logs when it loads."""
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "agegender",
            "predict",
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
    assert result.stderr == ""
