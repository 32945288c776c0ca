"""Where training runs, under the Keras backend that KERAS_BACKEND chooses:

- TensorFlow (the default): GPUs with memory growth, op determinism on the CPU, and all the
  GPUs of the machine together under tf.distribute.MirroredStrategy.
- JAX: every device of every process in one keras.distribution.DataParallel mesh (variables
  replicated, each batch split over the devices). Several processes, on one machine or on
  many, join through jax.distributed, set up from Keras's own variables:
  KERAS_DISTRIBUTION_JOB_ADDRESSES (process 0's host:port, where the others find it),
  KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID.

Both return the same set-up, so the model and training code stay plain Keras; the calls of one
backend live here, at the edge.
"""

import contextlib
import json
import os

import keras

from agegender.contracts.errors import PipelineError

ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
PROCESSES = "KERAS_DISTRIBUTION_NUM_PROCESSES"
PROCESS_ID = "KERAS_DISTRIBUTION_PROCESS_ID"


def resolve(setting, gpus):
    """`auto` means on when there is a GPU."""
    return bool(gpus) if setting == "auto" else bool(setting)


def process_count():
    """Processes that train together (KERAS_DISTRIBUTION_NUM_PROCESSES; 1 when unset)."""
    return int(os.environ.get(PROCESSES) or 1)


def process_index():
    return int(os.environ.get(PROCESS_ID) or 0)


def is_chief():
    """Only process 0 writes the model, the metrics and the MLflow run. Read from the
    environment, since the stage asks before any device is set up."""
    return process_index() == 0


def configure(mixed_precision, jit_compile, deterministic):
    """Set up devices before any model is built. The set-up: `replicas` (devices that train
    together; the global batch and the learning rate scale with it), `strategy` (its `scope()`
    builds and compiles), `chief`, `processes` and `process` (this one's index), `sharded`
    (each process feeds its own share of every batch: agegender.nets.data_parallel),
    `local_replicas` and `gpus` (this process's), and the resolved `mixed_precision` and
    `jit_compile`."""
    backend = keras.backend.backend()
    if backend == "jax":
        return configure_jax(mixed_precision, jit_compile)
    if backend == "tensorflow":
        return configure_tensorflow(mixed_precision, jit_compile, deterministic)
    raise PipelineError(f"KERAS_BACKEND={backend}: the train stage runs on tensorflow or jax.")


def set_precision(mixed_precision, gpus):
    use_mixed = resolve(mixed_precision, gpus)
    keras.mixed_precision.set_global_policy("mixed_float16" if use_mixed else "float32")
    return use_mixed


def configure_tensorflow(mixed_precision, jit_compile, deterministic):
    import tensorflow as tf

    refuse_several_processes()
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    use_mixed = set_precision(mixed_precision, gpus)
    if deterministic and not gpus:
        tf.config.experimental.enable_op_determinism()
    strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    return {
        "gpus": len(gpus),
        "replicas": strategy.num_replicas_in_sync,
        "mixed_precision": use_mixed,
        "jit_compile": resolve(jit_compile, gpus),
        "strategy": strategy,
        "chief": True,
        "processes": 1,
        "process": 0,
        "local_replicas": strategy.num_replicas_in_sync,
        "sharded": False,
    }


def refuse_several_processes():
    """Training over several processes needs the JAX backend: Keras 3's TensorFlow trainer
    cannot `fit` under MultiWorkerMirroredStrategy (keras-team/keras#20585). A TF_CONFIG or a
    process count left from such a set-up would otherwise train alone on every machine."""
    cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
    workers = sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))
    if workers > 1 or process_count() > 1:
        raise PipelineError(
            "several processes train together under the JAX backend only: set KERAS_BACKEND=jax "
            f"and {ADDRESSES}, {PROCESSES} and {PROCESS_ID} on each (docs/many-machines.md), "
            "and unset TF_CONFIG."
        )


class OneDevice:
    """The `strategy` of a JAX run on a single device: nothing to distribute."""

    num_replicas_in_sync = 1

    def scope(self):
        return contextlib.nullcontext()


def configure_jax(mixed_precision, jit_compile):
    """`jit_compile: auto` is on under JAX on any device: XLA is how JAX runs a step, and off
    means op by op in Python. The CPU runs are deterministic as they are."""
    import jax

    processes = process_count()
    if processes > 1:
        if not os.environ.get(ADDRESSES) or PROCESS_ID not in os.environ:
            raise PipelineError(
                f"{PROCESSES}={processes} needs {ADDRESSES} (process 0's host:port) and "
                f"{PROCESS_ID} (0 to {processes - 1}) on every process."
            )
        keras.distribution.initialize()
    gpus = [device for device in jax.local_devices() if device.platform == "gpu"]
    if gpus:
        keep_tensorflow_off_the_gpus()
    use_mixed = set_precision(mixed_precision, gpus)
    strategy = OneDevice()
    if jax.device_count() > 1:
        # Each process feeds its own rows (agegender.nets.data_parallel), so Keras must not shard.
        strategy = keras.distribution.DataParallel(auto_shard_dataset=False)
        keras.distribution.set_distribution(strategy)
    return {
        "gpus": len(gpus),
        "replicas": jax.device_count(),
        "mixed_precision": use_mixed,
        "jit_compile": True if jit_compile == "auto" else bool(jit_compile),
        "strategy": strategy,
        "chief": jax.process_index() == 0,
        "processes": jax.process_count(),
        "process": jax.process_index(),
        "local_replicas": jax.local_device_count(),
        "sharded": jax.device_count() > 1,
    }


def keep_tensorflow_off_the_gpus():
    """tf.data, the input pipeline, runs on the CPU; left alone, TensorFlow would also take
    the memory of every GPU that JAX trains on."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
