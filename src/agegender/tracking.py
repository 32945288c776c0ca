"""MLflow tracking for every stage: one parent run per pipeline execution, one child per stage.

DVC starts each stage as its own process, so the stages of one execution find their common
parent run through a key derived from the nearest `dvc` ancestor process.
"""
import contextlib
import os
import subprocess
import warnings
from pathlib import Path

import psutil

PIPELINE_KEY_TAG = "agegender.pipeline_key"


def repo_root():
    """The repository the user works in, also for `dvc exp run --temp/--queue` copies."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    cwd = Path.cwd().resolve()
    marker = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"
    text = str(cwd)
    return Path(text.split(marker)[0]) if marker in text else cwd


def tracking_uri():
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def pipeline_key():
    """Same for every stage that one `dvc repro`/`dvc exp run` process starts; a queue worker
    that runs several experiments in turn tells them apart by the experiment's name."""
    process = psutil.Process()
    owner = process
    for ancestor in process.parents():
        try:
            command = " ".join(ancestor.cmdline())
        except psutil.Error:
            continue
        if "dvc" in Path(command.split(" ")[0]).name or " -m dvc" in command or "/dvc " in command:
            owner = ancestor
            break
    return f"{os.environ.get('DVC_EXP_NAME', '')}:{owner.pid}-{owner.create_time():.0f}"


def git_commit():
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return result.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(params, prefix=""):
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class StageRun:
    """What a stage logs; every call is a no-op when tracking is unavailable."""

    def __init__(self, mlflow_module=None):
        self.mlflow = mlflow_module

    @property
    def active(self):
        return self.mlflow is not None

    def log_metrics(self, metrics, step=None):
        if self.active:
            numeric = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.mlflow.log_metrics(numeric, step=step)

    def log_artifact(self, path, artifact_path=None):
        if self.active and Path(path).exists():
            self.mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def keras_callback(self):
        """Per-epoch training figures as MLflow metrics with the epoch as step."""
        import keras

        run = self

        class EpochMetrics(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                run.log_metrics(logs or {}, step=epoch)

        return EpochMetrics()


def _find_or_start_parent(mlflow, experiment_id, key, tags):
    found = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{PIPELINE_KEY_TAG}` = '{key}'",
        output_format="list",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    exp_name = tags.get("dvc.exp_name")
    run_name = f"pipeline {exp_name}" if exp_name else f"pipeline {tags['git.commit'][:8]}"
    client = mlflow.tracking.MlflowClient()
    parent = client.create_run(experiment_id, tags={**tags, PIPELINE_KEY_TAG: key}, run_name=run_name)
    client.set_terminated(parent.info.run_id)
    return parent.info.run_id


def _start_child_run(mlflow, stage, params, experiment):
    mlflow.set_tracking_uri(tracking_uri())
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment
    if mlflow.get_experiment_by_name(name) is None:  # artifacts at the root, not in a --temp copy
        mlflow.create_experiment(name, artifact_location=(repo_root() / "mlruns").as_uri())
    experiment = mlflow.set_experiment(name)
    tags = {"git.commit": git_commit()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    parent_id = _find_or_start_parent(mlflow, experiment.experiment_id, pipeline_key(), tags)
    mlflow.start_run(run_name=stage, parent_run_id=parent_id, tags={**tags, "stage": stage})
    try:
        mlflow.log_params(flatten(params))
    except Exception:
        mlflow.end_run(status="FAILED")
        raise


@contextlib.contextmanager
def stage_run(stage, params, experiment="agegender"):
    """Log `params` (this stage's section) under a child run of the pipeline's parent run.
    Tracking never costs the user a pipeline run: when MLflow fails, the stage goes on."""
    import mlflow

    try:
        _start_child_run(mlflow, stage, params, experiment)
        tracker = StageRun(mlflow)
    except Exception as error:
        warnings.warn(f"MLflow tracking skipped for stage '{stage}' ({tracking_uri()}): {error}")
        tracker = StageRun(None)
    if not tracker.active:
        yield tracker
        return
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        with contextlib.suppress(Exception):
            mlflow.end_run(status=status)
