"""Where training runs: GPUs with memory growth, mixed precision and XLA, several GPUs
mirrored, several machines (TF_CONFIG) with MultiWorkerMirroredStrategy.

TensorFlow-only calls live here, at the edge, so the model code stays plain Keras.
"""

import json
import os

import keras
import tensorflow as tf


def resolve(setting, gpus):
    """`auto` means on when there is a GPU."""
    return bool(gpus) if setting == "auto" else bool(setting)


def cluster_workers():
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    return len(config.get("cluster", {}).get("worker", [])) + len(
        config.get("cluster", {}).get("chief", [])
    )


def configure(mixed_precision, jit_compile, deterministic):
    """Set up devices before any model is built; returns what was chosen and the strategy."""
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    use_mixed = resolve(mixed_precision, gpus)
    keras.mixed_precision.set_global_policy("mixed_float16" if use_mixed else "float32")
    if deterministic and not gpus:
        tf.config.experimental.enable_op_determinism()
    if cluster_workers() > 1:
        from agegender import keras_multiworker

        keras_multiworker.apply()
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif len(gpus) > 1:
        strategy = tf.distribute.MirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    return {
        "gpus": len(gpus),
        "replicas": strategy.num_replicas_in_sync,
        "mixed_precision": use_mixed,
        "jit_compile": resolve(jit_compile, gpus),
        "strategy": strategy,
        "chief": is_chief(),
    }


def is_chief():
    """Only the chief (worker 0 when no chief is named) writes the model and the metrics."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task", {})
    if not task or task.get("type") == "chief":
        return True
    return (
        task.get("type") == "worker"
        and task.get("index") == 0
        and "chief" not in config.get("cluster", {})
    )
