"""agegender.contracts.tracking: where the MLflow store is, and one parent run per
pipeline execution."""

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from agegender.contracts import tracking
from agegender.contracts.tracking import flatten, pipeline_key, repo_root, stage_run, tracking_uri


@pytest.fixture
def no_env(monkeypatch):
    for name in ("DVC_ROOT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_repo_root_is_cwd_by_default(no_env, tmp_path):
    no_env.chdir(tmp_path)
    assert repo_root() == tmp_path.resolve()


def test_repo_root_from_dvc_root(no_env, tmp_path):
    no_env.setenv("DVC_ROOT", str(tmp_path / "repo"))
    no_env.chdir(tmp_path)
    assert repo_root() == (tmp_path / "repo").resolve()


@pytest.mark.parametrize("inside", [".dvc/tmp/exps/tmpabc", ".dvc/tmp/exps/tmpabc/src/agegender"])
def test_repo_root_from_a_dvc_temp_experiment(no_env, tmp_path, inside):
    root = tmp_path / "project"
    (root / inside).mkdir(parents=True)
    no_env.chdir(root / inside)
    assert repo_root() == root.resolve()


def test_tracking_uri_default_is_absolute_sqlite_at_the_root(no_env, tmp_path):
    root = tmp_path / "project"
    (root / ".dvc/tmp/exps/tmpabc").mkdir(parents=True)
    no_env.chdir(root / ".dvc/tmp/exps/tmpabc")
    uri = tracking_uri()
    assert uri == f"sqlite:///{root.resolve() / 'mlflow.db'}"
    assert Path(uri.removeprefix("sqlite:///")).is_absolute()


def test_tracking_uri_from_environment(no_env):
    no_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"


def test_flatten():
    assert flatten({"a": 1, "b": {"c": 2, "d": {"e": [1, 2]}}}) == {
        "a": 1,
        "b.c": 2,
        "b.d.e": [1, 2],
    }


def test_pipeline_key_is_the_dvc_ancestor(tmp_path):
    """Two stages started by one `dvc repro` share the key; a stage run by hand gets its own."""
    fake_dvc = tmp_path / "bin" / "dvc"
    fake_dvc.parent.mkdir()
    key = "from agegender.contracts.tracking import pipeline_key; print(pipeline_key())"
    stage = f"{sys.executable} -c '{key}'"
    fake_dvc.write_text(f"#!/bin/sh\necho $$\n{stage}\n{stage}\ntrue\n")
    fake_dvc.chmod(0o755)
    lines = subprocess.run(
        [str(fake_dvc), "repro"], capture_output=True, text=True, check=True
    ).stdout.split()
    dvc_pid, first, second = lines
    assert first == second
    assert first.startswith(f":{dvc_pid}-")
    assert pipeline_key() != first


def test_pipeline_key_tells_queued_experiments_apart(monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "first")
    first = pipeline_key()
    monkeypatch.setenv("DVC_EXP_NAME", "second")
    assert pipeline_key() != first and pipeline_key().startswith("second:")


def test_pipeline_key_survives_a_clock_adjustment(monkeypatch):
    """NTP moving the wall clock moves Linux's boot time by as much; the key must not follow,
    or the stages after the adjustment start a second parent run (seen in CI: a queued
    experiment's train stage under one parent, its evaluate and export under another)."""
    import psutil

    before = pipeline_key()
    shifted = psutil.boot_time() + 1.0
    monkeypatch.setattr(psutil, "boot_time", lambda: shifted)
    if sys.platform.startswith("linux"):
        monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: shifted)
    assert pipeline_key() == before


@pytest.fixture
def mlflow_env(no_env, tmp_path, tracking_uri):
    """The session's MLflow store, a fresh experiment per test."""
    no_env.chdir(tmp_path)
    no_env.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    return f"test-{uuid.uuid4().hex[:8]}"


def runs_of(experiment):
    import mlflow

    client = mlflow.tracking.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id])


def test_stages_of_one_execution_hang_under_one_parent(mlflow_env):
    experiment = mlflow_env
    with stage_run("filter", {"min_face_score": 1.0, "limit": 0}, experiment) as run:
        assert run.active
        run.log_metrics({"kept": 5, "removed": {"no_face": 3}, "ok": True, "note": "text"})
    with stage_run("crop", {"size": 64, "augment": {"flip": True}}, experiment):
        pass

    runs = runs_of(experiment)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.data.tags[tracking.PIPELINE_KEY_TAG] == pipeline_key()
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}

    by_stage = {r.data.tags["stage"]: r for r in children}
    assert set(by_stage) == {"filter", "crop"}
    commit = tracking.git_commit()
    for run in children:
        assert run.data.tags["git.commit"] == commit
        assert run.info.status == "FINISHED"
    assert by_stage["filter"].data.params == {"min_face_score": "1.0", "limit": "0"}
    assert by_stage["crop"].data.params == {"size": "64", "augment.flip": "True"}
    assert by_stage["filter"].data.metrics == {"kept": 5.0, "removed.no_face": 3.0}
    assert by_stage["filter"].info.run_name == "filter"


def test_failed_stage_is_marked_failed_with_its_error_on_it_and_its_parent(mlflow_env):
    with pytest.raises(RuntimeError, match="boom"):
        with stage_run("train", {"lr": 0.001}, mlflow_env):
            raise RuntimeError("boom")
    (child,) = [r for r in runs_of(mlflow_env) if "stage" in r.data.tags]
    (parent,) = [r for r in runs_of(mlflow_env) if "stage" not in r.data.tags]
    assert child.info.status == "FAILED" and parent.info.status == "FAILED"
    assert child.data.tags["error"] == parent.data.tags["error"] == "RuntimeError: boom"


def test_the_parent_run_carries_the_headline_params_and_figures(mlflow_env):
    headline = {"model.backbone": "dlib_resnet", "train.lr": 0.001}
    with stage_run("evaluate", {"evaluate.cs_years": 5}, mlflow_env, headline) as run:
        run.log_headline_metrics({"test": {"gender": {"accuracy": 0.97}, "images": 290}})
    (parent,) = [r for r in runs_of(mlflow_env) if "stage" not in r.data.tags]
    assert parent.data.params == {"model.backbone": "dlib_resnet", "train.lr": "0.001"}
    assert parent.data.metrics == {"test.gender.accuracy": 0.97, "test.images": 290.0}


def test_headline_params_are_picked_from_the_whole_file():
    params = {
        "data": {"dataset": "sample", "url": ""},
        "train": {"lr": 0.01, "dropout": 0.3},
        "model": {"backbone": "vgg16"},
    }
    picked = tracking.headline_params(params)
    assert picked == {"data.dataset": "sample", "model.backbone": "vgg16", "train.lr": 0.01}


def test_a_stage_run_lasts_as_long_as_its_work(mlflow_env):
    import time

    with stage_run("features", {}, mlflow_env):
        time.sleep(1.0)
    (child,) = [r for r in runs_of(mlflow_env) if "stage" in r.data.tags]
    (parent,) = [r for r in runs_of(mlflow_env) if "stage" not in r.data.tags]
    assert child.info.end_time - child.info.start_time >= 1000
    assert parent.info.end_time >= child.info.end_time  # the parent spans its stages


def test_mlflow_failing_mid_training_costs_no_stage(mlflow_env):
    """A real MLflow error during fit: the stage's run is deleted under it (as a user cleaning
    the runs table would), so every per-epoch log fails; the callback warns once and goes on."""
    import mlflow

    with stage_run("train", {}, mlflow_env) as run:
        mlflow.MlflowClient().delete_run(mlflow.active_run().info.run_id)
        with pytest.raises(mlflow.exceptions.MlflowException):
            mlflow.log_metric("loss", 1.0)  # MLflow itself does fail here
        callback = run.keras_callback()
        with pytest.warns(UserWarning, match="MLflow logging failed in stage 'train'"):
            for epoch in range(3):
                callback.on_epoch_end(epoch, {"loss": 1.0 / (epoch + 1)})
        run.log_metrics({"best_epoch": 2})
        run.log_headline_metrics({"x": 1})
        assert run.call(mlflow.log_param, "a", 1) is None


def test_experiment_name_from_dvc_exp_environment(mlflow_env, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", mlflow_env)
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-lark")
    with stage_run("split", {"seed": 1}, "ignored-experiment"):
        pass
    runs = runs_of(mlflow_env)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.run_name == "pipeline bushy-lark"
    assert all(r.data.tags["dvc.exp_name"] == "bushy-lark" for r in runs)


def test_unusable_store_warns_and_runs_the_body(no_env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    no_env.chdir(tmp_path)
    no_env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlflow.db")
    ran = []
    with pytest.warns(UserWarning, match="MLflow tracking skipped for stage 'filter'"):
        with stage_run("filter", {"limit": 0}) as run:
            ran.append(run.active)
            run.log_metrics({"kept": 1})  # no-ops, no error
            run.log_artifact(tmp_path / "a-file")
    assert ran == [False]
    assert blocker.read_text() == "not a directory"
