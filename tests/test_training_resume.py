"""The train stage killed with SIGKILL and run again ends with the figures of an uninterrupted
run (CPU, to 1e-6): at the default train and model params, where early stopping's best weights
and the plateau schedule's counters and learning rate decide the result, and during fine-tuning,
which resumes without training the heads again.

The working directory is the bundled sample through the real pipeline (`dvc repro features`),
limited to a few faces so that the file takes a minute or two on two cores."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, fresh_repository, run, set_params

from agegender.contracts.params import FACE_BACKBONES
from agegender.nets.training import saved_state

pytestmark = pytest.mark.slow

LIMIT = 100  # faces kept by the filter; with these, the rate is halved after the best epoch
TRAIN = [sys.executable, "-m", "agegender.stages.train"]
BACKUP = "data/train_backup"
OUTPUTS = ("metrics/train.json", "metrics/train_history.csv", "models/model.keras")
# dlib's face network alone (the fused default refuses fine-tuning; its features are cached
# again) with two head epochs and three fine-tuning ones on chips; the pipeline test fine-tunes
# VGG16.
FINETUNE = {
    "model": {"backbone": "dlib_resnet"},
    "train": {"head_units": [16, 16], "epochs": 2, "finetune_layers": 3, "finetune_epochs": 3},
}


@pytest.fixture(scope="module")
def sample_features(tmp_path_factory):
    """A copy of the repository with the sample's first LIMIT faces run up to the features stage
    at the default params, as `dvc repro` runs it."""
    root, env = fresh_repository(tmp_path_factory.mktemp("resume") / "repo")
    set_params(root, {"filter": {"limit": LIMIT}})
    run(["dvc", "repro", "features"], root, env)
    return root, env


@pytest.fixture
def workdir(sample_features, tmp_path):
    source, env = sample_features
    target = tmp_path / "repo"
    shutil.copytree(source, target, symlinks=True)
    return target, env


def train(repo, env):
    """The stage to its end; returns its output, which shows every epoch it trained."""
    return run(TRAIN, repo, env)


def kill_after(repo, env, phase, epochs):
    """Start the stage and SIGKILL it as soon as `phase`'s saved state holds `epochs` finished
    epochs (the kill lands in the next epoch); returns the epochs saved at the kill."""
    process = subprocess.Popen(
        TRAIN, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while (
        saved_epochs(repo, phase) < epochs
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.002)
    assert process.poll() is None, "training ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    for output in OUTPUTS:
        assert not (repo / output).exists()
    return saved_epochs(repo, phase)


def saved_epochs(repo, phase):
    try:
        state = saved_state(repo / BACKUP, phase)
    except (OSError, ValueError):  # not there yet
        return 0
    return state["epoch"] if state else 0


def results(repo):
    """The stage's figures and the saved model's answers on the test split's inputs."""
    from agegender.nets.model import load_model

    params = yaml.safe_load((repo / "params.yaml").read_text())
    chips = params["model"]["backbone"] in FACE_BACKBONES  # aligned 150 px face chips
    size = 150 if chips else params["train"]["input_size"]
    inputs = np.random.default_rng(0).uniform(0, 255, (16, size, size, 3)).astype(np.float32)
    answers = load_model(repo / "models/model.keras").predict(inputs, verbose=0)
    figures = json.loads((repo / "metrics/train.json").read_text())
    history = pd.read_csv(repo / "metrics/train_history.csv")
    for output in OUTPUTS:
        os.remove(repo / output)
    return figures, history, {task: np.asarray(values) for task, values in answers.items()}


def assert_same(resumed, uninterrupted):
    (figures, history, answers), (figures_0, history_0, answers_0) = resumed, uninterrupted
    assert figures.keys() == figures_0.keys()
    for name, value in figures_0.items():
        if not name.endswith("seconds"):
            assert figures[name] == pytest.approx(value, abs=1e-6), name
    pd.testing.assert_frame_equal(history, history_0, check_exact=False, rtol=0, atol=1e-6)
    for task, values in answers_0.items():
        np.testing.assert_allclose(answers[task], values, rtol=0, atol=1e-6, err_msg=task)


def trained_epochs(output):
    """The epochs a run trained, as Keras prints them: (epoch, of epochs) from 1."""
    return [tuple(map(int, found)) for found in re.findall(r"^Epoch (\d+)/(\d+)$", output, re.M)]


def test_killed_twice_at_the_default_params_ends_as_an_uninterrupted_run(workdir):
    """The kills land where the old resume went wrong: right after the plateau schedule lowered
    the rate (the backup held the rate from before), and after the best epoch (early stopping
    started again and kept the best of the epochs after the resume), whichever comes first."""
    repo, env = workdir
    params = yaml.safe_load((repo / "params.yaml").read_text())
    defaults = yaml.safe_load((REPO / "params.yaml").read_text())
    assert (params["train"], params["model"]) == (defaults["train"], defaults["model"])

    uninterrupted_output = train(repo, env)
    uninterrupted = results(repo)
    rates = [float(rate) for rate in re.findall(r"learning_rate: (\S+)", uninterrupted_output)]
    assert len(trained_epochs(uninterrupted_output)) == len(rates) == uninterrupted[0]["epochs_run"]
    lowered = next(epoch for epoch in range(1, len(rates)) if rates[epoch] < rates[epoch - 1])
    best = uninterrupted[0]["best_epoch"]
    first, second = sorted((lowered, best))
    assert first < second < len(rates)  # with these faces; any other kills must work as well

    assert kill_after(repo, env, "head", first) >= first
    assert kill_after(repo, env, "head", second) >= second  # this run resumed from the first kill
    resumed_output = train(repo, env)
    assert trained_epochs(resumed_output)[0][0] > second
    assert_same(results(repo), uninterrupted)
    assert not (repo / BACKUP).exists()


def test_killed_in_fine_tuning_resumes_fine_tuning(workdir):
    repo, env = workdir
    set_params(repo, FINETUNE)
    run(["dvc", "repro", "features"], repo, env)
    head, tuning = FINETUNE["train"]["epochs"], FINETUNE["train"]["finetune_epochs"]

    uninterrupted_output = train(repo, env)
    uninterrupted = results(repo)
    assert trained_epochs(uninterrupted_output) == [
        (epoch, head) for epoch in range(1, head + 1)
    ] + [(epoch, head + tuning) for epoch in range(head + 1, head + tuning + 1)]

    killed_at = kill_after(repo, env, "finetune", head + 1)
    assert head + 1 <= killed_at < head + tuning
    assert saved_state(repo / BACKUP, "head")["epoch"] == head
    resumed_output = train(repo, env)
    # the heads' phase restored its end and trained no epoch; fine-tuning went on where it was
    assert trained_epochs(resumed_output) == [
        (epoch, head + tuning) for epoch in range(killed_at + 1, head + tuning + 1)
    ]
    assert_same(results(repo), uninterrupted)
