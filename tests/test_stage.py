"""agegender.contracts.stage: the one skeleton every stage runs in."""

import json
import uuid
from pathlib import Path

import mlflow
import pytest
import yaml

from agegender.contracts.errors import PipelineError
from agegender.contracts.layout import STAGE_METRICS
from agegender.contracts.stage import listed_params, stage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_params():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_every_stage_logs_what_dvc_yaml_lists(repo_params):
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in stages:
        logged = listed_params(repo_params, name, REPO / "dvc.yaml")
        for entry in stages[name].get("params", []):
            assert any(key == entry or key.startswith(f"{entry}.") for key in logged), (name, entry)
    features = listed_params(repo_params, "features", REPO / "dvc.yaml")
    assert features["model.backbone"] == repo_params["model"]["backbone"]
    assert features["crop.margin"] == repo_params["crop"]["margin"]
    assert "train.lr" not in features and "filter.limit" not in features


def test_a_stage_missing_from_dvc_yaml_is_named(repo_params):
    with pytest.raises(PipelineError, match="no stage 'nonesuch'"):
        listed_params(repo_params, "nonesuch", REPO / "dvc.yaml")


def test_every_stage_with_metrics_has_them_in_dvc_yaml():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, path in STAGE_METRICS.items():
        files = [
            next(iter(entry)) if isinstance(entry, dict) else entry
            for entry in stages[name].get("metrics", [])
        ]
        assert str(path) in files, f"dvc.yaml stage {name} does not list {path} as metrics"


@pytest.fixture
def tracked_project(project, monkeypatch):
    project()
    experiment = f"test-{uuid.uuid4().hex[:8]}"
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["mlflow"]["experiment"] = experiment
    Path("params.yaml").write_text(yaml.safe_dump(params))
    return experiment


def stage_runs(experiment):
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([found.experiment_id]) if "stage" in r.data.tags]


def test_a_stage_writes_its_metrics_and_logs_exactly_its_params(tracked_project):
    @stage("split")
    def main(params, run):
        return {"train": {"images": 8}}

    assert main() == {"train": {"images": 8}}
    assert json.loads(STAGE_METRICS["split"].read_text()) == {"train": {"images": 8}}
    (run,) = stage_runs(tracked_project)
    assert run.info.status == "FINISHED" and run.data.metrics == {"train.images": 8.0}
    assert set(run.data.params) == {
        "seed",
        "split.train",
        "split.val",
        "split.test",
        "split.age_bin_width",
    }


def test_a_failing_stage_exits_with_a_paragraph_and_leaves_a_failed_run(tracked_project, capsys):
    @stage("split")
    def main(params, run):
        raise PipelineError("split test is empty; use more data.")

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: split test is empty; use more data.\n"
    (run,) = stage_runs(tracked_project)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "PipelineError: split test is empty; use more data."
    assert not STAGE_METRICS["split"].exists()
