"""Bad input through the stages as a user meets it: every bad file is counted under its
reason, every bad input file fails with one paragraph, outputs are whole or absent, the same
inputs give byte-identical outputs, and an unreachable MLflow costs only a warning."""

import errno
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from agegender.contracts.files import write_csv, write_json
from agegender.facedata.imdbwiki import apply_filter, read_mat
from agegender.stages import crop, split
from agegender.stages import filter as filter_stage


@pytest.fixture
def raw(project, sample_dir, tmp_path):
    """data/raw/wiki_crop with 40 real faces and their real wiki.mat."""
    params = project(filter={"limit": 40}, crop={"workers": 1})
    (tmp_path / "data/raw").mkdir(parents=True)
    shutil.copytree(sample_dir, tmp_path / "data/raw/wiki_crop")
    return project, params, tmp_path


def jpeg_bytes(image, **options):
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


BAD_FILES = {
    "missing": None,
    "zero_byte": b"",
    "truncated": "truncated",
    "tiny": jpeg_bytes(Image.new("RGB", (1, 1)), format="JPEG"),
    "png_named_jpg": jpeg_bytes(Image.new("RGB", (64, 64), (90, 60, 30)), format="PNG"),
    "grayscale": jpeg_bytes(Image.new("L", (64, 64), 120), format="JPEG"),
    "cmyk": jpeg_bytes(Image.new("CMYK", (64, 64), (0, 50, 100, 0)), format="JPEG"),
    "palette": jpeg_bytes(Image.new("P", (64, 64), 3), format="PNG"),
}
EXPECTED = {
    "missing": "missing",
    "zero_byte": "unreadable",
    "truncated": "unreadable",
    "tiny": "too_small",
    "png_named_jpg": None,
    "grayscale": None,
    "cmyk": None,
    "palette": None,
}


def test_crop_counts_each_bad_file_under_its_reason(raw):
    _, params, root = raw
    records, _ = apply_filter(read_mat(root / "data/raw/wiki_crop/wiki.mat"), params["filter"])
    for content, path in zip(BAD_FILES.values(), records["full_path"]):
        target = root / "data/raw/wiki_crop" / path
        if content is None:
            target.unlink()
        elif content == "truncated":
            target.write_bytes(target.read_bytes()[:200])
        else:
            target.write_bytes(content)
    write_csv(root / "data/filtered/records.csv", records)
    crop.main()
    metrics = json.loads((root / "metrics/crop.json").read_text())
    assert metrics["skipped"] == {"missing": 1, "unreadable": 2, "too_small": 1}
    assert metrics["written"] == 40 - 4
    index = pd.read_csv(root / "data/crops/index.csv")
    for (kind, _), path in zip(BAD_FILES.items(), records["full_path"]):
        assert (path in set(index["full_path"])) == (EXPECTED[kind] is None), kind
    for path in index["full_path"]:
        with Image.open(root / "data/crops/images" / path) as face:
            assert face.mode == "RGB" and face.size == (params["crop"]["size"],) * 2


def test_filter_counts_bad_dates_and_scores(raw):
    _, params, root = raw
    mat = root / "data/raw/wiki_crop/wiki.mat"
    import scipy.io

    wiki = scipy.io.loadmat(mat)["wiki"]
    fields = {name: wiki[name][0, 0] for name in wiki.dtype.names}
    fields["dob"] = fields["dob"].astype(float)
    fields["dob"][0, :3] = [np.nan, np.inf, 100]  # NaN, inf, before year 1
    fields["photo_taken"] = fields["photo_taken"].astype(float)
    fields["photo_taken"][0, 3] = 2014 + 100  # an age of 100+ years
    fields["face_score"] = fields["face_score"].astype(float)
    fields["face_score"][0, 4] = np.nan
    scipy.io.savemat(mat, {"wiki": fields})
    filter_stage.main()
    removed = json.loads((root / "metrics/filter.json").read_text())["removed"]
    assert removed["invalid_date"] == 3
    assert removed["age_out_of_range"] >= 1
    assert removed["no_face"] == 1


def test_same_inputs_give_byte_identical_filter_and_split(raw):
    project, params, root = raw
    outputs = {}
    for attempt in range(2):
        filter_stage.main()
        records = pd.read_csv(root / "data/filtered/records.csv")
        write_csv(root / "data/crops/index.csv", records)
        split.main()
        outputs[attempt] = [
            (root / name).read_bytes()
            for name in (
                "data/filtered/records.csv",
                "data/split/train.csv",
                "data/split/val.csv",
                "data/split/test.csv",
            )
        ]
    assert outputs[0] == outputs[1]


def test_a_stage_with_mlflow_unreachable_still_writes_its_metrics(raw, monkeypatch, tmp_path):
    _, _, root = raw
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlflow.db")
    with pytest.warns(UserWarning, match="MLflow tracking skipped"):
        filter_stage.main()
    assert json.loads((root / "metrics/filter.json").read_text())["kept"] == 40


def test_a_full_disk_leaves_the_previous_output_whole(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    write_json(target, {"kept": 1})

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(json, "dumps", disk_full)
    with pytest.raises(OSError):
        write_json(target, {"kept": 2})
    assert json.loads(target.read_text()) == {"kept": 1}
    assert [path.name for path in tmp_path.iterdir()] == ["metrics.json"]


def test_a_full_disk_is_reported_as_one_paragraph(tmp_path):
    script = (
        "import errno\n"
        "from agegender.contracts.errors import exits_cleanly\n"
        "@exits_cleanly\n"
        "def main():\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device', 'data/crops/images/x.jpg')\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "data/crops/images/x.jpg" in lines[0] and "Free disk space" in lines[0]
    )
    assert "Traceback" not in result.stderr
