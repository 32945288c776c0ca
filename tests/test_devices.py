"""agegender.devices: auto settings, who writes in a cluster, and the CPU set-up."""

import json

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from agegender import devices  # noqa: E402


@pytest.fixture
def restore_globals():
    """configure() sets process-wide state: put it back so later tests see the defaults."""
    from tensorflow.python.framework import config as tf_config

    determinism = tf_config.is_op_determinism_enabled()
    yield
    keras.mixed_precision.set_global_policy("float32")
    if not determinism:
        tf_config.disable_op_determinism()


@pytest.mark.parametrize(
    "setting, gpus, expected",
    [
        ("auto", [], False),
        ("auto", ["GPU:0"], True),
        (True, [], True),
        (False, ["GPU:0"], False),
    ],
)
def test_resolve(setting, gpus, expected):
    assert devices.resolve(setting, gpus) is expected


@pytest.mark.parametrize(
    "config, chief",
    [
        (None, True),
        (
            {
                "cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                "task": {"type": "worker", "index": 0},
            },
            True,
        ),
        (
            {
                "cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                "task": {"type": "worker", "index": 1},
            },
            False,
        ),
        (
            {
                "cluster": {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"]},
                "task": {"type": "worker", "index": 0},
            },
            False,
        ),
        (
            {
                "cluster": {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"]},
                "task": {"type": "chief", "index": 0},
            },
            True,
        ),
    ],
)
def test_only_the_chief_writes(monkeypatch, config, chief):
    if config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    assert devices.is_chief() is chief


def test_one_worker_is_not_a_cluster(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:2222"]}}))
    assert devices.cluster_workers() == 1
    monkeypatch.delenv("TF_CONFIG")
    assert devices.cluster_workers() == 0


def test_cpu_only_setup(monkeypatch, restore_globals):
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    setup = devices.configure("auto", "auto", True)
    assert {key: setup[key] for key in ("gpus", "replicas", "mixed_precision", "jit_compile")} == {
        "gpus": 0,
        "replicas": 1,
        "mixed_precision": False,
        "jit_compile": False,
    }
    assert keras.mixed_precision.global_policy().name == "float32"
    assert setup["strategy"].num_replicas_in_sync == 1
