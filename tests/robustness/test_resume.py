"""Training killed with SIGKILL mid-run restarts from its last finished epoch and ends where an
uninterrupted run ends (CPU, fixed seed)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import commit, run, set_params

pytestmark = pytest.mark.slow

SMALL = {
    "filter": {"limit": 400},
    "model": {"backbone": "vgg16"},
    "crop": {"size": 32},
    "train": {
        "input_size": 32,
        "epochs": 40,
        "early_stopping": 0,
        "trainable_layers": 0,
        "head_units": [32, 16],
        "batch_size": 16,
        "lr_schedule": "constant",
    },
}
TRAIN = [sys.executable, "-m", "agegender.stages.train"]


def finished_epochs(repo):
    log = repo / "data/train_backup/head.csv"
    return max(0, len(log.read_text().splitlines()) - 1) if log.exists() else 0


def test_killed_training_resumes_to_the_same_result(repo):
    repo, env = repo
    set_params(repo, SMALL)
    commit(repo, env, "small configuration")
    run(["dvc", "repro", "features"], repo, env)

    run(TRAIN, repo, env)
    uninterrupted = json.loads((repo / "metrics/train.json").read_text())
    for output in ("metrics/train.json", "metrics/train_history.csv", "models/model.keras"):
        os.remove(repo / output)

    process = subprocess.Popen(
        TRAIN, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while finished_epochs(repo) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "training ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_after = finished_epochs(repo)
    assert 3 <= killed_after < SMALL["train"]["epochs"]
    assert not (repo / "metrics/train.json").exists()

    run(TRAIN, repo, env)
    resumed = json.loads((repo / "metrics/train.json").read_text())
    assert resumed["epochs_run"] == uninterrupted["epochs_run"] == SMALL["train"]["epochs"]
    for name in ("val_loss", "val_gender_accuracy", "val_age_loss", "loss"):
        assert resumed[name] == pytest.approx(uninterrupted[name], abs=1e-4), name
    assert not (repo / "data/train_backup").exists()

    run(TRAIN, repo, env)  # and without a kill, the same inputs give the same figures to 1e-6
    repeated = json.loads((repo / "metrics/train.json").read_text())
    for name, value in uninterrupted.items():
        if not name.endswith("seconds"):
            assert repeated[name] == pytest.approx(value, abs=1e-6), name
