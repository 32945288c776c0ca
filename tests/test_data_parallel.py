"""Data-parallel training under the JAX backend (keras.distribution.DataParallel): which rows each
process feeds, and the train stage on two processes joined by jax.distributed on 127.0.0.1, and
on two devices in one process, reaching what one device reaches."""

import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import commit, fresh_repository, run, set_params

from agegender.nets.data_parallel import local_batches, validation_copies
from agegender.nets.feature_cache import FeatureBatches

ROWS_SHAPE = (3,)


def sharded(process, processes=2, local_replicas=1):
    return {
        "sharded": True,
        "process": process,
        "processes": processes,
        "replicas": processes * local_replicas,
        "local_replicas": local_replicas,
    }


def numbered_batches(rows, batch_size, seed=7):
    """FeatureBatches whose feature rows hold their own index, to see which rows a batch has."""
    features = np.repeat(np.arange(rows, dtype=np.float32)[:, None], ROWS_SHAPE[0], axis=1)
    labels = {"gender": np.arange(rows)}
    weights = {"gender": np.ones(rows, dtype=np.float32)}
    return FeatureBatches(features, labels, weights, batch_size, seed)


def rows_of(batch):
    return batch[0][:, 0].astype(int).tolist()


@pytest.mark.parametrize("rows", [16, 14])
def test_two_processes_feed_halves_of_every_batch(rows):
    batches = numbered_batches(rows, batch_size=8)
    shares = [local_batches(batches, sharded(process)) for process in (0, 1)]
    for epoch in (0, 3):
        batches.set_epoch(epoch)
        for index in range(len(batches)):
            whole = batches[index]
            first, second = (share[index] for share in shares)
            assert rows_of(first) + rows_of(second) == rows_of(whole)
            assert len(rows_of(first)) == len(rows_of(second))
            assert first[1]["gender"].tolist() == rows_of(first)
    assert [len(share) for share in shares] == [len(batches)] * 2


def test_a_batch_that_does_not_split_evenly_loses_its_last_rows():
    """11 rows in batches of 4: the last batch of 3 loses one row; 9 rows: the last batch of one
    row cannot feed two devices and is left out."""
    batches = numbered_batches(11, batch_size=4)
    first, second = (local_batches(batches, sharded(process))[2] for process in (0, 1))
    assert rows_of(first) + rows_of(second) == rows_of(batches[2])[:2]
    assert len(local_batches(numbered_batches(9, batch_size=4), sharded(0))) == 2


def test_unsharded_data_is_handed_back():
    batches = numbered_batches(8, batch_size=4)
    unsharded = {"sharded": False}
    assert local_batches(batches, unsharded) is batches
    assert validation_copies(batches, unsharded) is batches
    assert validation_copies(batches, sharded(0)) is batches  # one device here: one copy


def test_validation_gives_every_local_device_a_whole_copy():
    tf = pytest.importorskip("tensorflow")
    batches = FeatureBatches(
        np.arange(10, dtype=np.float32)[:, None], {"age": np.arange(10)}, None, batch_size=4
    )
    copied = validation_copies(batches, sharded(0, local_replicas=2))
    assert len(copied) == 3
    assert rows_of(copied[2]) == [8, 9, 8, 9]
    assert copied[2][1]["age"].tolist() == [8, 9, 8, 9]
    dataset = tf.data.Dataset.from_tensor_slices((np.arange(6.0), {"age": np.arange(6)})).batch(4)
    last = list(validation_copies(dataset, sharded(0, local_replicas=2)))[-1]
    assert last[0].numpy().tolist() == [4.0, 5.0, 4.0, 5.0]
    assert last[1]["age"].numpy().tolist() == [4, 5, 4, 5]


# The train stage end to end: VGG16 with random weights at 32 px, so the features stage is quick.
SMALL = {
    "filter": {"limit": 400},
    "crop": {"size": 32},
    "model": {"backbone": "vgg16", "weights": "none"},
    "train": {
        "input_size": 32,
        "trainable_layers": 0,
        "head_units": [32, 16],
        "epochs": 4,
        "early_stopping": 0,
        "lr_schedule": "constant",
    },
}
# train.batch_size and train.lr are per replica: one device at 32 and 0.002 trains on the same
# global batches at the same rate as two replicas at 16 and 0.001.
ONE_DEVICE = {"batch_size": 32, "lr": 0.002}
PER_REPLICA_OF_TWO = {"batch_size": 16, "lr": 0.001}
TIMEOUT = 300
TRAIN = [sys.executable, "-m", "agegender.stages.train"]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trained(repo):
    """The figures and the weights of the model the chief wrote."""
    from agegender.nets.model import load_model

    metrics = json.loads((repo / "metrics/train.json").read_text())
    return metrics, load_model(repo / "models/model.keras").get_weights()


def train(repo, env, settings):
    set_params(repo, {"train": settings})
    (repo / "metrics/train.json").unlink(missing_ok=True)
    run(TRAIN, repo, env)
    return trained(repo)


def run_together(command, cwd, envs):
    """One process per environment, all started before any is waited for; none is left
    running, whatever happens."""
    processes = [
        subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for env in envs
    ]
    deadline = time.monotonic() + TIMEOUT
    try:
        outputs = [
            process.communicate(timeout=max(1, deadline - time.monotonic()))[0]
            for process in processes
        ]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-4000:]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """A scratch repository with the small feature cache, and one device's training on it."""
    repo, env = fresh_repository(tmp_path_factory.mktemp("data_parallel") / "repo")
    set_params(repo, SMALL)
    commit(repo, env, "small configuration")
    run(["dvc", "repro", "features"], repo, env)
    train_rows = len((repo / "data/split/train.csv").read_text().splitlines()) - 1
    # every batch, the last one too, must split into two equal halves for the same math
    assert train_rows % 2 == 0, f"{train_rows} training rows: change filter.limit"
    env = {**env, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    return repo, env, train(repo, env, ONE_DEVICE)


def assert_same_training(result, reference):
    """Equal to float rounding: the same global batches in the same order, the same initial
    weights (the seed), the same dropout masks (JAX's partitionable threefry draws a sharded
    mask equal to the whole one); only the order in which the devices' partial sums are added
    differs (about 1e-7 of a value per step)."""
    (metrics, weights), (reference_metrics, reference_weights) = result, reference
    assert metrics["epochs_run"] == reference_metrics["epochs_run"] == SMALL["train"]["epochs"]
    assert metrics == pytest.approx(reference_metrics, rel=1e-5, abs=2e-6)
    assert max(np.abs(a - b).max() for a, b in zip(weights, reference_weights)) < 1e-5


@pytest.mark.slow
def test_two_processes_reach_what_one_reaches(one_device, tmp_path):
    """Two processes of one CPU device each, joined through 127.0.0.1, train as one device on
    their global batches; process 1 writes nothing but a temporary folder it removes. (Two
    processes each training alone at batch 16 would take twice the steps and miss the match.)"""
    repo, env, reference = one_device
    set_params(repo, {"train": PER_REPLICA_OF_TWO})
    (repo / "metrics/train.json").unlink()
    coordinator = f"127.0.0.1:{free_port()}"
    worker_tmp = tmp_path / "worker_tmp"
    worker_tmp.mkdir()
    envs = [
        {
            **env,
            "KERAS_DISTRIBUTION_JOB_ADDRESSES": coordinator,
            "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
            "KERAS_DISTRIBUTION_PROCESS_ID": str(process),
            **({"TMPDIR": str(worker_tmp)} if process else {}),
        }
        for process in (0, 1)
    ]
    run_together(TRAIN, repo, envs)
    assert_same_training(trained(repo), reference)
    assert list(worker_tmp.iterdir()) == []


@pytest.mark.slow
def test_two_devices_in_one_process_reach_what_one_reaches(one_device):
    """One process, two CPU devices (as one machine with two GPUs under JAX): validation feeds
    each device a whole copy of every batch, training half of each."""
    repo, env, reference = one_device
    env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert_same_training(train(repo, env, PER_REPLICA_OF_TWO), reference)
