"""The whole pipeline as a user runs it: `dvc repro`, a re-run, an experiment, MLflow runs.

Runs in a temporary git copy of the repository with a tiny configuration (a few hundred
faces, 32 px, one epoch) so that it takes a minute or two on two CPU cores.
"""
import json
import os
import shutil
import subprocess
import tarfile

import pytest
import yaml
from conftest import REPO

pytestmark = pytest.mark.slow

TINY = {
    "filter": {"limit": 300},
    "crop": {"size": 32},
    "train": {"input_size": 32, "epochs": 1, "trainable_layers": 0, "head_units": [16, 16], "batch_size": 32},
}
STAGES = ("download_data", "download_weights", "filter", "crop", "split", "train", "evaluate")


def run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def set_params(repo, changes):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in changes.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def repo(tmp_path):
    """A fresh git repository holding the project's tracked and new files, as a clone would."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    target = tmp_path / "repo"
    for name in listed:
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    run(["git", "init", "-q"], target, env)
    return target, env


def commit(repo, env, message):
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", message], repo, env)


def mlflow_runs(repo):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["agegender"], output_format="list")


def children_by_parent(runs):
    parents = {run.info.run_id: run for run in runs if "mlflow.parentRunId" not in run.data.tags}
    children = {parent: [] for parent in parents}
    for run in runs:
        if "mlflow.parentRunId" in run.data.tags:
            children[run.data.tags["mlflow.parentRunId"]].append(run.data.tags["stage"])
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
