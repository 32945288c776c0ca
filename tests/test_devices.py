"""agegender.nets.devices: auto settings, who writes, and the CPU set-up under both backends."""

import json
import os
import subprocess
import sys

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from agegender.contracts.errors import PipelineError  # noqa: E402
from agegender.nets import devices  # noqa: E402

PLAIN_KEYS = ("gpus", "replicas", "mixed_precision", "jit_compile", "chief", "processes", "sharded")


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


@pytest.mark.parametrize("process_id, chief", [(None, True), ("0", True), ("1", False)])
def test_only_process_zero_writes(monkeypatch, process_id, chief):
    if process_id is None:
        monkeypatch.delenv(devices.PROCESS_ID, raising=False)
    else:
        monkeypatch.setenv(devices.PROCESS_ID, process_id)
    assert devices.is_chief() is chief


@pytest.mark.parametrize(
    "variable, value",
    [
        ("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}})),
        (devices.PROCESSES, "2"),
    ],
)
def test_several_processes_need_jax(monkeypatch, restore_globals, variable, value):
    """Under TensorFlow, a cluster would otherwise train alone on every machine."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(PipelineError, match="KERAS_BACKEND=jax"):
        devices.configure("auto", "auto", True)


def test_one_worker_is_not_a_cluster(monkeypatch, restore_globals):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:2222"]}}))
    assert devices.configure("auto", "auto", True)["processes"] == 1


def test_cpu_only_setup(monkeypatch, restore_globals):
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    setup = devices.configure("auto", "auto", True)
    assert {key: setup[key] for key in PLAIN_KEYS} == {
        "gpus": 0,
        "replicas": 1,
        "mixed_precision": False,
        "jit_compile": False,
        "chief": True,
        "processes": 1,
        "sharded": False,
    }
    assert keras.mixed_precision.global_policy().name == "float32"
    assert setup["strategy"].num_replicas_in_sync == 1


def test_cpu_setup_under_jax():
    """The same set-up under KERAS_BACKEND=jax, in a process of its own (the backend is chosen
    at import): XLA on (JAX's way to run a step), and TensorFlow not even imported."""
    pytest.importorskip("jax")
    script = (
        "import json; from agegender.nets import devices; "
        "setup = devices.configure('auto', 'auto', True); "
        f"print(json.dumps({{key: setup[key] for key in {PLAIN_KEYS!r}}})); "
        "import sys; print('tensorflow' in sys.modules)"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    for variable in ("TF_CONFIG", devices.PROCESSES, devices.PROCESS_ID, "XLA_FLAGS"):
        env.pop(variable, None)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    *_, printed, tensorflow_imported = result.stdout.splitlines()
    assert tensorflow_imported == "False"
    assert json.loads(printed) == {
        "gpus": 0,
        "replicas": 1,
        "mixed_precision": False,
        "jit_compile": True,
        "chief": True,
        "processes": 1,
        "sharded": False,
    }
