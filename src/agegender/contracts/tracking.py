"""MLflow tracking for every stage: one parent run per pipeline execution, one child per stage.

DVC starts each stage as its own process, so the stages of one execution find their common
parent run through a key derived from the nearest `dvc` ancestor process.
"""

import contextlib
import os
import re
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
    that runs several experiments in turn tells them apart by the experiment's name.

    The ancestor's start is counted from boot: Linux recomputes the boot time from the wall
    clock on every read, so psutil's start time moves whenever NTP adjusts the clock, and a
    later stage would start a second parent run."""
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
    return f"{os.environ.get('DVC_EXP_NAME', '')}:{owner.pid}-{start_since_boot(owner)}"


def start_since_boot(process):
    """The process's start in clock ticks since boot (Linux), which no clock change moves;
    where there is no /proc, the start time the system recorded."""
    try:
        stat = Path(f"/proc/{process.pid}/stat").read_text()
    except OSError:
        return f"{process.create_time():.0f}"
    return stat.rsplit(")", 1)[1].split()[19]


def git_commit():
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
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


HEADLINE_PARAMS = (
    "data.dataset",
    "model.backbone",
    "model.weights",
    "train.input_size",
    "train.epochs",
    "train.lr",
    "train.age_loss",
    "seed",
)


def headline_params(params):
    """The params that tell executions apart in the MLflow runs table, from the whole file."""
    flat = flatten(params)
    return {key: flat[key] for key in HEADLINE_PARAMS if key in flat}


class StageRun:
    """What a stage logs. Every call is a no-op when tracking is unavailable, and an MLflow
    error in any of them (the store gone mid-run, a deleted run) becomes one warning: tracking
    never costs the user a pipeline run."""

    def __init__(self, mlflow_module=None, stage="", parent_id=None):
        self.mlflow, self.stage, self.parent_id = mlflow_module, stage, parent_id
        self.warned = False

    @property
    def active(self):
        return self.mlflow is not None

    def _safely(self, call):
        """`call()`'s result, or None when tracking is off or MLflow failed."""
        if not self.active:
            return None
        try:
            return call()
        except Exception as error:
            if not self.warned:
                warnings.warn(
                    f"MLflow logging failed in stage '{self.stage}' and is skipped; "
                    f"the stage goes on ({tracking_uri()}): {error}",
                    stacklevel=2,
                )
                self.warned = True
            return None

    def log_metrics(self, metrics, step=None):
        """Numbers only, nested keys flattened (`age.mae`); figures and timings alike."""
        self._safely(lambda: self.mlflow.log_metrics(numeric(metrics), step=step))

    def log_artifact(self, path, artifact_path=None):
        if Path(path).exists():
            self._safely(lambda: self.mlflow.log_artifact(str(path), artifact_path=artifact_path))

    def log_headline_metrics(self, metrics):
        """Figures that belong on the execution's parent run, so runs compare at a glance."""
        if self.parent_id is None:
            return

        def log_all():
            client = self.mlflow.MlflowClient()
            for key, value in numeric(metrics).items():
                client.log_metric(self.parent_id, key, value)

        self._safely(log_all)

    def call(self, function, *args, **kwargs):
        """Any other MLflow work (registering a model): its result, or None if it failed."""
        return self._safely(lambda: function(*args, **kwargs))

    def keras_callback(self):
        """Per-epoch training figures as MLflow metrics with the epoch as step."""
        import keras

        run = self

        class EpochMetrics(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                run.log_metrics(logs or {}, step=epoch)

        return EpochMetrics()


def numeric(metrics):
    """The numbers of a nested dict under names MLflow accepts (`60+` becomes `60_`)."""
    return {
        re.sub(r"[^\w\-. :/]", "_", key): float(value)
        for key, value in flatten(metrics).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _find_or_start_parent(mlflow, experiment_id, key, tags, headline):
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
    parent = client.create_run(
        experiment_id, tags={**tags, PIPELINE_KEY_TAG: key}, run_name=run_name
    )
    for name, value in headline.items():
        client.log_param(parent.info.run_id, name, value)
    client.set_terminated(parent.info.run_id)
    return parent.info.run_id


def _start_child_run(mlflow, stage, params, experiment, headline):
    mlflow.set_tracking_uri(tracking_uri())
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment
    if mlflow.get_experiment_by_name(name) is None:  # artifacts at the root, not in a --temp copy
        mlflow.create_experiment(name, artifact_location=(repo_root() / "mlruns").as_uri())
    experiment = mlflow.set_experiment(name)
    tags = {"git.commit": git_commit()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    parent_id = _find_or_start_parent(
        mlflow, experiment.experiment_id, pipeline_key(), tags, headline
    )
    mlflow.start_run(run_name=stage, parent_run_id=parent_id, tags={**tags, "stage": stage})
    try:
        mlflow.log_params(flatten(params))
    except Exception:
        mlflow.end_run(status="FAILED")
        raise
    return parent_id


def _close(mlflow, parent_id, error):
    """End the stage's run; the parent run ends with it, so it spans the execution's stages,
    and a failure is written on both."""
    client = mlflow.tracking.MlflowClient()
    if error is None:
        mlflow.end_run(status="FINISHED")
        client.set_terminated(parent_id, status="FINISHED")
        return
    message = f"{type(error).__name__}: {error}"[:5000]
    mlflow.set_tag("error", message)
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    mlflow.end_run(status=status)
    client.set_tag(parent_id, "error", message)
    client.set_terminated(parent_id, status=status)


@contextlib.contextmanager
def stage_run(stage, params, experiment="agegender", headline=None):
    """A child run of the execution's parent run, open while the stage works, logging
    `params` (flat); `headline` params go on the parent when this stage creates it.
    When MLflow is unusable the stage goes on untracked, with one warning."""
    import mlflow

    try:
        parent_id = _start_child_run(mlflow, stage, params, experiment, headline or {})
        tracker = StageRun(mlflow, stage, parent_id)
    except Exception as error:
        warnings.warn(
            f"MLflow tracking skipped for stage '{stage}' ({tracking_uri()}): {error}",
            stacklevel=2,
        )
        tracker = StageRun(None, stage)
    if not tracker.active:
        yield tracker
        return
    try:
        yield tracker
    except BaseException as error:
        with contextlib.suppress(Exception):
            _close(mlflow, parent_id, error)
        raise
    with contextlib.suppress(Exception):
        _close(mlflow, parent_id, None)
