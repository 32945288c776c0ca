"""How every stage runs, in one place: read and check params.yaml, open the stage's MLflow run
before any work (so its duration is real and a failure leaves a FAILED run with the error),
log exactly the params dvc.yaml lists for the stage, write the stage's metrics file, and turn
an expected failure into one paragraph on stderr.

    @stage("filter")
    def main(params, run):
        ...
        return metrics        # written to layout.STAGE_METRICS["filter"] and logged

Timings and sizes go to `run.log_metrics` only: they differ on every machine, so they stay
out of the git-tracked metrics files that `dvc metrics diff` compares.
"""

import functools
from pathlib import Path

import yaml

from agegender.contracts import layout
from agegender.contracts.errors import PipelineError, exits_cleanly
from agegender.contracts.files import write_json
from agegender.contracts.params import load_params
from agegender.contracts.tracking import StageRun, flatten, headline_params, stage_run


def listed_params(params, stage, dvc_file=layout.DVC_FILE):
    """The params of `stage` as dvc.yaml lists them, flat (`train.lr`), so MLflow logs
    exactly what DVC tracks for the stage."""
    try:
        spec = yaml.safe_load(Path(dvc_file).read_text(encoding="utf8"))["stages"][stage]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as error:
        raise PipelineError(
            f"{dvc_file} has no stage '{stage}' to read its params from ({error}); "
            "run the stage from the repository root, as dvc does."
        ) from None
    keys = []
    for entry in spec.get("params", []):
        keys += entry.get(str(layout.PARAMS), []) if isinstance(entry, dict) else [entry]
    listed = {}
    for key in keys:
        value = params
        for part in key.split("."):
            value = value[part]
        listed.update(flatten({key: value}))
    return listed


def stage(name, tracked=lambda: True):
    """Decorate a stage's `work(params, run)`, which returns the metrics of the stage (or
    None when it writes no metrics file); `tracked` says whether this process logs to MLflow
    (not a training worker other than the chief)."""

    def decorate(work):
        @exits_cleanly
        @functools.wraps(work)
        def main():
            params = load_params()
            experiment = params["mlflow"]["experiment"]
            if not tracked():
                return work(params, StageRun(None, name))
            logged = listed_params(params, name)
            with stage_run(name, logged, experiment, headline_params(params)) as run:
                metrics = work(params, run)
                if metrics is not None:
                    write_json(layout.STAGE_METRICS[name], metrics)
                    run.log_metrics(metrics)
            return metrics

        return main

    return decorate
