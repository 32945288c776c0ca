"""The whole pipeline as a user runs it: `dvc repro`, a re-run, an experiment, MLflow runs.

Runs in a temporary git copy of the repository with a tiny configuration (a few hundred
faces, 32 px, one epoch) so that it takes a minute or two on two CPU cores.
"""
import json
import tarfile

import pytest
from conftest import commit, run, set_params

pytestmark = pytest.mark.slow

TINY = {
    "filter": {"limit": 300},
    "crop": {"size": 32},
    "train": {"input_size": 32, "epochs": 1, "trainable_layers": 0, "head_units": [16, 16], "batch_size": 32},
}
STAGES = ("download_data", "download_weights", "filter", "crop", "split", "features", "train", "evaluate")


def mlflow_runs(repo):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["agegender"], output_format="list")


def children_by_parent(runs):
    parents = {entry.info.run_id: entry for entry in runs if "mlflow.parentRunId" not in entry.data.tags}
    children = {parent: [] for parent in parents}
    for entry in runs:
        if "mlflow.parentRunId" in entry.data.tags:
            children[entry.data.tags["mlflow.parentRunId"]].append(entry.data.tags["stage"])
    return parents, children


def test_repro_rerun_experiment_and_mlflow(repo):
    repo, env = repo
    set_params(repo, TINY)
    commit(repo, env, "tiny configuration")

    out = run(["dvc", "repro"], repo, env)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo, env))
    files = next(iter(shown.values()))["data"]
    for name in ("filter", "crop", "split", "evaluate"):
        assert f"metrics/{name}.json" in files
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert 0.0 <= evaluation["gender"]["accuracy"] <= 1.0
    assert evaluation["age"]["mae"] > 0
    assert evaluation["test_images"] == json.loads((repo / "metrics/split.json").read_text())["test"]["images"]

    again = run(["dvc", "repro"], repo, env)
    assert "Running stage" not in again
    assert again.count("didn't change, skipping") == len(STAGES)

    commit(repo, env, "baseline run")
    experiment = run(["dvc", "exp", "run", "-S", "train.epochs=2", "-n", "two-epochs"], repo, env)
    ran = [stage for stage in STAGES if f"Running stage '{stage}'" in experiment]
    assert ran == ["train", "evaluate"]
    assert "two-epochs" in run(["dvc", "exp", "show", "--csv"], repo, env)
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], repo, env))
    assert "metrics/train.json" in diff and "metrics/evaluate.json" in diff

    parents, children = children_by_parent(mlflow_runs(repo))
    assert sorted(map(sorted, children.values())) == sorted([sorted(STAGES), ["evaluate", "train"]])
    tagged = [parent for parent in parents.values() if parent.data.tags.get("dvc.exp_name") == "two-epochs"]
    assert len(tagged) == 1 and sorted(children[tagged[0].info.run_id]) == ["evaluate", "train"]


def test_archive_holding_only_the_real_mat_filters_to_38138(repo, shared_data):
    repo, env = repo
    archive = repo.parent / "wiki_crop_meta_only.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(shared_data / "wiki.mat", arcname="wiki_crop/wiki.mat")
    set_params(repo, {"data": {"dataset": "wiki_crop", "url": str(archive)}})
    commit(repo, env, "only the metadata")
    run(["dvc", "repro", "filter"], repo, env)
    metrics = json.loads((repo / "metrics/filter.json").read_text())
    assert (metrics["total"], metrics["kept"], metrics["male"], metrics["female"]) == (62328, 38138, 28601, 9537)
