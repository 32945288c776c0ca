"""What each process feeds when the JAX backend trains on several devices (the set-up's
`sharded`, agegender.nets.devices): Keras makes every global batch from the rows each process gives
it (jax.make_array_from_process_local_data), process 0's first, and splits it over the devices,
evenly or not at all.

- Training: every process draws the same batches (FeatureBatches: from the seed and the epoch
  alone) and feeds its own contiguous share of each, so a batch is the same rows in the same
  order under any number of processes, and a resumed run still sees the batches of an
  uninterrupted one.
- Validation: every device evaluates a whole copy of each batch, so the figures are exactly
  those of one device for a split of any size (its mean over copies of a batch is the batch's
  mean); validation is forward passes on a split an eighth the size of train.

Unsharded (TensorFlow, or JAX on one device) both hand the data back unchanged.
"""

import keras
import numpy as np


def local_batches(batches, setup):
    """The training batches this process feeds: its share of each of `batches`."""
    if not setup["sharded"]:
        return batches
    return ProcessShare(batches, setup["process"], setup["processes"], setup["replicas"])


def validation_copies(data, setup):
    """Validation data (a PyDataset or a tf.data.Dataset of batches) as this process feeds it:
    whole, one copy of each batch per local device."""
    copies = setup["local_replicas"] if setup["sharded"] else 1
    if copies == 1:
        return data
    if isinstance(data, keras.utils.PyDataset):
        return BatchCopies(data, copies)
    import tensorflow as tf

    return data.map(
        lambda *batch: keras.tree.map_structure(lambda part: tf.concat([part] * copies, 0), batch)
    )


class ProcessShare(keras.utils.PyDataset):
    """This process's share of every batch of a FeatureBatches: rows [p * n / P, (p + 1) * n / P)
    of a batch of n rows, the only ones it reads from disk or decodes. A batch whose size is not
    a multiple of the devices (the last of an epoch) first loses its last n % devices rows, at
    most devices - 1 rows an epoch and not the same ones each epoch, as the order changes; a
    last batch smaller than that is left out."""

    def __init__(self, batches, process, processes, devices):
        super().__init__()
        self.batches, self.process, self.processes, self.devices = (
            batches,
            process,
            processes,
            devices,
        )

    def __len__(self):
        last = len(self.batches.features) - (len(self.batches) - 1) * self.batches.batch_size
        return len(self.batches) - (last < self.devices)

    def set_epoch(self, epoch):
        self.batches.set_epoch(epoch)

    def on_epoch_end(self):
        self.batches.on_epoch_end()

    def __getitem__(self, index):
        rows = self.batches.rows_of(index)
        share = len(rows) // self.devices * self.devices // self.processes
        return self.batches.read(rows[self.process * share : (self.process + 1) * share])


class BatchCopies(keras.utils.PyDataset):
    """Each batch of a PyDataset, `copies` times over (one per local device)."""

    def __init__(self, batches, copies):
        super().__init__()
        self.batches, self.copies = batches, copies

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return keras.tree.map_structure(
            lambda part: np.concatenate([part] * self.copies), self.batches[index]
        )
