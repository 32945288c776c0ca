"""Training on two workers (MultiWorkerMirroredStrategy over TF_CONFIG, on 127.0.0.1) completes
and reaches what one worker reaches, within the noise of a tiny data set."""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import commit, run, set_params

pytestmark = pytest.mark.slow

SMALL = {
    "filter": {"limit": 400},
    "crop": {"size": 32},
    "train": {
        "input_size": 32,
        "epochs": 4,
        "early_stopping": 0,
        "trainable_layers": 0,
        "head_units": [32, 16],
        "batch_size": 16,
        "lr_schedule": "constant",
    },
}


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def worker_env(env, workers, index):
    config = {
        "cluster": {"worker": [f"127.0.0.1:{port}" for port in workers]},
        "task": {"type": "worker", "index": index},
    }
    return {**env, "TF_CONFIG": json.dumps(config)}


def test_two_local_workers_match_one(repo):
    repo, env = repo
    set_params(repo, SMALL)
    commit(repo, env, "small configuration")
    run(["dvc", "repro", "features"], repo, env)
    train = [sys.executable, "-m", "agegender.stages.train"]

    run(train, repo, env)
    single = json.loads((repo / "metrics/train.json").read_text())
    (repo / "metrics/train.json").unlink()

    workers = free_ports(2)
    processes = [
        subprocess.Popen(
            train,
            cwd=repo,
            env=worker_env(env, workers, index),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in (0, 1)
    ]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output
    double = json.loads((repo / "metrics/train.json").read_text())

    assert double["epochs_run"] == single["epochs_run"] == 4
    assert abs(double["val_gender_accuracy"] - single["val_gender_accuracy"]) <= 0.08
    assert double["val_age_loss"] == pytest.approx(single["val_age_loss"], rel=0.1)
    assert os.path.exists(repo / "models/model.keras")
