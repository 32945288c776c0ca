"""agegender.facedata.imdbwiki and the filter stage: the .mat as a table, and the cleaning rules."""

import json
import math
import subprocess
import sys
from datetime import date
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import yaml
from conftest import REPO

from agegender.contracts.errors import PipelineError
from agegender.facedata.imdbwiki import age_at_photo, apply_filter, birth_date, box_of, read_mat

FILTER = yaml.safe_load((REPO / "params.yaml").read_text())["filter"]


def cell(values):
    array = np.empty((1, len(values)), dtype=object)
    array[0, :] = list(values)
    return array


def write_mat(path, records, struct="wiki", drop=()):
    """A MATLAB v5 file in the IMDB-WIKI layout: a 1x1 struct of 1xN fields."""
    fields = {
        "dob": np.array([[r["dob"] for r in records]], dtype=float),
        "photo_taken": np.array([[r["photo_taken"] for r in records]], dtype=float),
        "full_path": cell([r["full_path"] for r in records]),
        "gender": np.array([[r["gender"] for r in records]], dtype=float),
        "name": cell([r.get("name", "") for r in records]),
        "face_location": cell(
            [np.array([r.get("box", (1, 1, 100, 100))], dtype=float) for r in records]
        ),
        "face_score": np.array([[r["face_score"] for r in records]], dtype=float),
        "second_face_score": np.array([[r.get("second", np.nan) for r in records]], dtype=float),
    }
    for field in drop:
        del fields[field]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {struct: fields})
    return path


# 1981-05-05 and 1948-07-03 as MATLAB datenums
DOB_1981_05_05, DOB_1948_07_03 = 723671, 711677
RECORDS = [
    {
        "dob": DOB_1981_05_05,
        "photo_taken": 2009,
        "full_path": "17/a.jpg",
        "gender": 1,
        "name": "Ann",
        "face_score": 4.3,
        "box": (111, 11, 252, 152),
    },
    {
        "dob": DOB_1948_07_03,
        "photo_taken": 2008,
        "full_path": "12/b.jpg",
        "gender": 0,
        "name": "Bo",
        "face_score": 2.0,
    },
    {
        "dob": DOB_1948_07_03,
        "photo_taken": 2008,
        "full_path": "12/c.jpg",
        "gender": 0,
        "name": "",
        "face_score": -np.inf,
    },
]


def test_birth_date_from_matlab_datenum():
    assert birth_date(DOB_1981_05_05) == date(1981, 5, 5)
    assert birth_date(DOB_1948_07_03) == date(1948, 7, 3)
    assert birth_date(367.0) == date(1, 1, 1)


@pytest.mark.parametrize("datenum", [366, 0, -5, np.nan, np.inf, 1e12])
def test_birth_date_out_of_range_is_none(datenum):
    assert birth_date(datenum) is None


def test_age_mid_year_rule():
    assert age_at_photo(date(1980, 6, 30), 2000) == 20
    assert age_at_photo(date(1980, 7, 1), 2000) == 19
    assert age_at_photo(date(1980, 12, 31), 2000.0) == 19
    assert math.isnan(age_at_photo(None, 2000))
    assert math.isnan(age_at_photo(date(1980, 1, 1), np.nan))


def test_box_of_converts_matlab_to_zero_based():
    assert box_of([1, 1, 634, 440]) == (0, 0, 634, 440)
    assert box_of(np.array([[111.5, 20, 252.5, 161]])) == (110.5, 19, 252.5, 161)
    assert all(math.isnan(v) for v in box_of([1, 2, 3]))


def test_read_mat_table(tmp_path):
    table = read_mat(write_mat(tmp_path / "wiki.mat", RECORDS))
    assert list(table["full_path"]) == ["17/a.jpg", "12/b.jpg", "12/c.jpg"]
    assert list(table["dob"]) == ["1981-05-05", "1948-07-03", "1948-07-03"]
    assert list(table["age"]) == [28, 59, 59]
    assert table.loc[0, ["x1", "y1", "x2", "y2"]].tolist() == [110, 10, 252, 152]
    assert list(table["identity"]) == ["name:Ann", "name:Bo", "path:12/c.jpg"]
    assert table.loc[2, "face_score"] == -np.inf


def test_read_mat_identity_from_celeb_id(tmp_path):
    path = write_mat(tmp_path / "imdb.mat", RECORDS[:2], struct="imdb")
    mat = scipy.io.loadmat(path)
    struct = {name: mat["imdb"][name][0, 0] for name in mat["imdb"].dtype.names}
    struct["celeb_id"] = np.array([[7, 9]])
    scipy.io.savemat(path, {"imdb": struct})
    assert list(read_mat(path)["identity"]) == ["celeb:7", "celeb:9"]


def test_read_mat_with_a_single_record(tmp_path):
    table = read_mat(write_mat(tmp_path / "wiki.mat", RECORDS[:1]))
    assert len(table) == 1
    assert table.loc[0, "full_path"] == "17/a.jpg"


def test_read_mat_missing_field_is_named(tmp_path):
    path = write_mat(tmp_path / "wiki.mat", RECORDS, drop=("face_score",))
    with pytest.raises(PipelineError, match="lacks the field\\(s\\) face_score"):
        read_mat(path)


def test_read_mat_missing_file(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        read_mat(tmp_path / "wiki.mat")


def test_read_mat_not_a_mat_file(tmp_path):
    path = tmp_path / "wiki.mat"
    path.write_bytes(b"<html>404 not found</html>" * 10)
    with pytest.raises(PipelineError, match="not a readable MATLAB .mat file"):
        read_mat(path)


def test_read_mat_two_structs(tmp_path):
    path = tmp_path / "wiki.mat"
    scipy.io.savemat(path, {"a": np.ones(3), "b": np.zeros(3)})
    with pytest.raises(PipelineError, match="should hold one struct"):
        read_mat(path)


def test_read_mat_v73_is_named(tmp_path):
    path = tmp_path / "wiki.mat"
    with h5py.File(path, "w", userblock_size=512) as f:
        f["wiki/dob"] = np.arange(3.0)
    header = (
        b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 "
        b"HDF5 schema 1.00 ."
    ).ljust(116)
    # subsystem offset, version 0x0200, endian indicator: how scipy spots v7.3
    with open(path, "r+b") as f:
        f.write(header + b"\0" * 8 + b"\x00\x02IM")
    with pytest.raises(NotImplementedError):
        scipy.io.loadmat(path)
    with pytest.raises(PipelineError, match="v7.3"):
        read_mat(path)


def table_of(rows):
    base = {
        "full_path": "x.jpg",
        "gender": 1.0,
        "age": 30.0,
        "face_score": 3.0,
        "second_face_score": np.nan,
    }
    return pd.DataFrame([{**base, **row, "full_path": f"{i}.jpg"} for i, row in enumerate(rows)])


def test_apply_filter_rules_and_counts():
    table = table_of(
        [
            {},  # kept
            {"face_score": -np.inf},  # no_face
            {"face_score": 0.99},  # no_face
            {"second_face_score": 0.5},  # second_face
            {"gender": np.nan},  # unknown_gender
            {"age": 101},  # age_out_of_range
            {"age": -1},  # age_out_of_range
            {"age": np.nan},  # invalid_date
            {"gender": 0.0, "age": 0, "face_score": 1.0},  # kept (bounds included)
            {"age": 100},  # kept
        ]
    )
    kept, removed = apply_filter(table, FILTER)
    assert removed == {
        "no_face": 2,
        "second_face": 1,
        "unknown_gender": 1,
        "invalid_date": 1,
        "age_out_of_range": 2,
    }
    assert list(kept["full_path"]) == ["0.jpg", "8.jpg", "9.jpg"]
    assert kept["gender"].dtype.kind == "i" and kept["age"].dtype.kind == "i"
    assert list(kept.index) == [0, 1, 2]


def test_apply_filter_weak_second_face_kept_with_a_threshold():
    table = table_of([{"second_face_score": 0.5}, {"second_face_score": 2.5}, {}])
    kept, removed = apply_filter(table, {**FILTER, "max_second_face_score": 1.0})
    assert list(kept["full_path"]) == ["0.jpg", "2.jpg"]
    assert removed["second_face"] == 1


def test_apply_filter_age_range():
    table = table_of([{"age": 17}, {"age": 18}, {"age": 65}, {"age": 66}])
    kept, removed = apply_filter(table, {**FILTER, "min_age": 18, "max_age": 65})
    assert list(kept["age"]) == [18, 65]
    assert removed["age_out_of_range"] == 2


def test_unknown_gender_is_always_dropped():
    table = table_of([{"gender": np.nan}, {}])
    kept, removed = apply_filter(table, FILTER)
    assert len(kept) == 1
    assert removed["unknown_gender"] == 1


def test_apply_filter_limit():
    table = table_of([{}, {"face_score": -np.inf}, {}, {}, {}])
    kept, removed = apply_filter(table, {**FILTER, "limit": 2})
    assert list(kept["full_path"]) == ["0.jpg", "2.jpg"]
    assert removed == {
        "no_face": 1,
        "second_face": 0,
        "unknown_gender": 0,
        "invalid_date": 0,
        "age_out_of_range": 0,
        "limit": 2,
    }
    kept, removed = apply_filter(table, {**FILTER, "limit": 10})
    assert len(kept) == 4 and "limit" not in removed


def test_real_wiki_mat_keeps_38138(shared_data):
    table = read_mat(shared_data / "wiki.mat")
    assert len(table) == 62_328
    kept, removed = apply_filter(table, FILTER)
    assert len(kept) == 38_138
    assert (kept["gender"] == 1).sum() == 28_601
    assert (kept["gender"] == 0).sum() == 9_537
    assert kept["age"].between(0, 100).all()
    assert sum(removed.values()) == 62_328 - 38_138
    first = table.iloc[0]
    assert (first["full_path"], first["dob"], first["age"]) == (
        "17/10000217_1981-05-05_2009.jpg",
        "1981-05-05",
        28,
    )


def test_bundled_sample_mat_keeps_all(sample_dir):
    table = read_mat(sample_dir / "wiki.mat")
    kept, removed = apply_filter(table, FILTER)
    assert len(table) == len(kept) == 2_913
    assert sum(removed.values()) == 0
    # every record's file is in the archive, and its name carries the dob and photo year
    row = kept.iloc[0]
    assert (sample_dir / row["full_path"]).is_file()
    _, dob, year = Path(row["full_path"]).stem.split("_")
    assert (row["dob"], int(row["photo_taken"])) == (dob, int(year))


def run_stage(module):
    return subprocess.run(
        [sys.executable, "-m", module], capture_output=True, text=True, timeout=120
    )


def test_stage_empty_result_exits_with_one_paragraph(project):
    project(filter={"min_face_score": 1e9})
    write_mat(Path("data/raw/wiki_crop/wiki.mat"), RECORDS)
    result = run_stage("agegender.stages.filter")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    assert "rule 'no_face' removed 3 of 3" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert not Path("data/filtered/records.csv").exists()
    assert not Path("metrics/filter.json").exists()


def test_stage_missing_mat_exits_with_one_paragraph(project):
    project()
    result = run_stage("agegender.stages.filter")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "data/raw/wiki_crop/wiki.mat not found" in result.stderr


def test_stage_writes_records_and_metrics(project, sample_dir):
    from agegender.stages import filter as filter_stage

    project(filter={"limit": 100})
    Path("data/raw/wiki_crop").mkdir(parents=True)
    Path("data/raw/wiki_crop/wiki.mat").symlink_to(sample_dir / "wiki.mat")
    filter_stage.main()
    records = pd.read_csv("data/filtered/records.csv", keep_default_na=False, na_values=[""])
    assert len(records) == 100
    assert {"full_path", "gender", "age", "identity", "x1", "y2"} <= set(records.columns)
    metrics = json.loads(Path("metrics/filter.json").read_text())
    assert metrics["total"] == 2_913 and metrics["kept"] == 100
    assert metrics["removed"]["limit"] == 2_813
    assert metrics["male"] + metrics["female"] == 100
