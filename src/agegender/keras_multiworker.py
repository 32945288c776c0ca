"""A compatibility shim: Keras 3.15's TensorFlow trainer under MultiWorkerMirroredStrategy.

`model.fit` fails there in two places (keras-team/keras#20585, tensorflow/tensorflow#72388):
the symbolic build reduces a whole data batch across workers, which collective ops refuse,
and per-step metrics, which are scalars, are averaged with `axis=0`. Both are replaced here,
for the pinned Keras version only, and only when training runs on several workers.
"""

import keras
import tensorflow as tf
from keras.src import tree
from keras.src.backend.tensorflow import trainer

PATCHED_VERSION = "3.15.1"


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    """Build from this worker's own first batch: shapes are all that the build needs."""
    if self._distribute_strategy is None:
        return
    if iterator is not None:
        for _, _, batches in iterator:
            batch = next(batches)
            data_batch = tree.map_structure(
                lambda v: (
                    self.distribute_strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues)
                    else v
                ),
                batch,
            )
            break
    with self.distribute_strategy.scope():
        self._symbolic_build(data_batch=data_batch)


_original_reduce_per_replica = trainer.reduce_per_replica


def reduce_per_replica(values, strategy, reduction):
    """Average scalars over all workers without a batch axis; everything else as Keras does."""
    if reduction not in ("auto", "mean") or not trainer._collective_all_reduce_multi_worker(
        strategy
    ):
        return _original_reduce_per_replica(values, strategy, reduction)

    def mean(value):
        if not isinstance(value, tf.distribute.DistributedValues):
            return value
        rank = len(strategy.experimental_local_results(value)[0].shape)
        return strategy.reduce("MEAN", value, axis=0 if rank else None)

    return tree.map_structure(mean, values)


def apply():
    if keras.__version__ != PATCHED_VERSION:
        raise RuntimeError(
            f"the multi-worker shim targets Keras {PATCHED_VERSION}, found {keras.__version__}"
        )
    trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    trainer.reduce_per_replica = reduce_per_replica
