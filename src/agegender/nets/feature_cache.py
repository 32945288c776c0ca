"""The feature cache: outputs of the frozen part of the backbone, computed once per split.

Head training reads them instead of images, so a sweep over head or optimizer params does no
image work at all. The cache lives on disk and is read through memory maps, batch by batch: at
224 px with VGG16's block 5 training, the wiki train split alone is about 12 GB, so no stage
ever holds a whole split in memory. Plain NumPy and Keras, so head training also runs under the
JAX backend.
"""

import json
import os
from pathlib import Path

import keras
import numpy as np
from numpy.lib import format as npy

from agegender.contracts.errors import PipelineError
from agegender.contracts.files import write_json
from agegender.contracts.labels import AGES

CHUNK_BYTES = 8 << 20  # float32 bytes read at a time by whole-split passes


def feature_path(directory, name):
    return Path(directory) / f"{name}.npy"


def npy_header(dtype, shape):
    return {"descr": npy.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}


class FeatureWriter:
    """A cached array written batch by batch to a `.npy` file with plain writes (no memory map,
    whose dirty pages would count in the writer's resident memory), so writing a cache of any
    size costs one batch of memory. float16 halves the disk; the rows are widened to float32
    (copied in chunks) once a value overflows it, or are float32 from the start where `exact`
    (face descriptors: predict computes them in float32 and must agree with evaluate). The file
    appears under its name only when every row is written (`close`)."""

    def __init__(self, directory, name, rows, shape, exact=False):
        self.path = feature_path(directory, name)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.rows, self.shape, self.filled = rows, tuple(shape), 0
        self.file = self.open(self.tmp, np.float32 if exact else np.float16)

    def open(self, path, dtype):
        self.dtype = np.dtype(dtype)
        file = open(path, "wb")
        npy.write_array_header_2_0(file, npy_header(dtype, (self.rows, *self.shape)))
        return file

    def append(self, batch):
        batch = np.asarray(batch)
        if self.filled + len(batch) > self.rows or batch.shape[1:] != self.shape:
            self.discard()
            raise PipelineError(
                f"{self.path}: a batch of shape {batch.shape} does not fit the split's "
                f"{self.rows} rows of {self.shape}; run `dvc repro -f features`."
            )
        if self.dtype == np.float16:
            with np.errstate(over="ignore"):
                small = batch.astype(np.float16)
            if (np.isinf(small) & np.isfinite(batch)).any():
                self.widen()
            else:
                batch = small
        self.file.write(np.ascontiguousarray(batch, dtype=self.dtype).tobytes())
        self.filled += len(batch)

    def widen(self):
        """float16 rows so far -> a float32 file, a chunk at a time."""
        self.file.close()
        narrow = FeatureFile(self.tmp, rows=self.filled)
        wide_tmp = self.tmp.with_name(self.tmp.name + ".wide")
        self.file = self.open(wide_tmp, np.float32)
        for block in chunks(narrow):
            self.file.write(block.tobytes())
        narrow.close()
        os.replace(wide_tmp, self.tmp)

    def close(self):
        self.file.close()
        if self.filled != self.rows:
            self.discard()
            raise PipelineError(
                f"{self.path}: {self.filled} rows written of the {self.rows} of its split; "
                "run `dvc repro -f features`."
            )
        os.replace(self.tmp, self.path)

    def discard(self):
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def write_features(directory, name, batches, rows, shape, exact=False):
    """Write an iterable of arrays (in row order) as the cached array `name`."""
    writer = FeatureWriter(directory, name, rows, shape, exact)
    try:
        for batch in batches:
            writer.append(batch)
    except BaseException:
        writer.discard()
        raise
    writer.close()


def save_features(directory, name, array, exact=False):
    """A whole array at once (small arrays, tests)."""
    array = np.asarray(array)
    write_features(directory, name, [array], len(array), array.shape[1:], exact)


class FeatureFile:
    """A cached array on disk, read a few rows at a time: `len`, `shape`, `dtype`, and rows by
    an int, a slice or an array of indices, as a new array in the stored dtype. Plain reads,
    not a memory map: pages of a map count in the reader's resident memory and stay there,
    which for a 12 GB cache read in random order is all of it."""

    def __init__(self, path, rows=None):
        self.path = Path(path)
        self.file = open(self.path, "rb")
        version = npy.read_magic(self.file)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran_order, self.dtype = read_header(self.file)
        if fortran_order or not shape:
            raise PipelineError(f"{self.path} is not a feature cache; run `dvc repro -f features`.")
        self.offset = self.file.tell()
        self.shape = (shape[0] if rows is None else rows, *shape[1:])
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self):
        return self.shape[0]

    def read(self, start, count, out=None):
        """Rows start..start+count-1 in one read (into `out` when given)."""
        out = np.empty((count, *self.shape[1:]), self.dtype) if out is None else out
        got = os.preadv(self.file.fileno(), [out], self.offset + start * self.row_bytes)
        if got != out.nbytes:
            raise PipelineError(f"{self.path} is truncated; run `dvc repro -f features`.")
        return out

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self.read(start, max(0, stop - start))
            key = np.arange(start, stop, step)
        if np.ndim(key) == 0:
            row = int(key) + (len(self) if int(key) < 0 else 0)
            return self[np.array([row])][0]
        rows = np.asarray(key, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range for {self.path} of {len(self)} rows")
        if rows.size and (np.diff(rows) == 1).all():
            return self.read(int(rows[0]), len(rows))
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        flat = out.reshape(len(rows), -1)
        for index, row in enumerate(rows):
            self.read(int(row), 1, flat[index])
        return out

    def close(self):
        self.file.close()

    def __del__(self):
        if hasattr(self, "file"):
            self.file.close()


def load_features(directory, name):
    """The cached array, read from disk as rows are asked for (`FeatureFile`)."""
    path = feature_path(directory, name)
    if not path.exists():
        raise PipelineError(f"the feature cache {path} is missing; run `dvc repro features`.")
    return FeatureFile(path)


def chunks(array, rows=None):
    """Consecutive float32 blocks of a cached array (of `rows`, default about 8 MB), for
    whole-split passes in bounded memory."""
    rows = rows or max(1, CHUNK_BYTES // (4 * int(np.prod(array.shape[1:], dtype=np.int64))))
    for start in range(0, len(array), rows):
        yield np.asarray(array[start : start + rows], dtype=np.float32)


def keep_rows(directory, source, name, keep):
    """Cached array `name` made of the rows of `source` where `keep` is true, copied in chunks;
    `source` is deleted."""
    array = load_features(directory, source)

    def kept():
        start = 0
        for block in chunks(array):
            yield block[keep[start : start + len(block)]]
            start += len(block)

    write_features(directory, name, kept(), int(keep.sum()), array.shape[1:], exact=True)
    array.close()
    feature_path(directory, source).unlink()


def running_sum(blocks, shape):
    """The float32 sum over axis 0 of consecutive blocks, added row after row as NumPy adds
    the rows of one array, so chunked and whole-array figures are the same numbers."""
    total = np.zeros(shape, np.float32)
    for block in blocks:
        total = np.concatenate([total[None], block]).sum(axis=0)
    return total


def adapt_in_chunks(normalizer, array, rows=None):
    """`Normalization.adapt` over a cached array a chunk at a time, giving exactly the mean and
    variance that adapting on the whole array in memory gives (NumPy's float32 mean, then the
    mean squared deviation), so streaming the cache changes no trained figure."""
    shape, count = array.shape[1:], np.float32(len(array))
    mean = running_sum(chunks(array, rows), shape) / count
    variance = running_sum(((block - mean) ** 2 for block in chunks(array, rows)), shape) / count
    if not normalizer.built:
        normalizer.build((None, *shape))
    normalizer.adapt_mean.assign(mean)
    normalizer.adapt_variance.assign(variance)
    normalizer.finalize_state()


def kept_rows(table, manifest, split):
    """The rows of a split table that have cached features (faces without landmarks are not)."""
    skipped = set(manifest.get("skipped", {}).get(split, []))
    return table[~table["full_path"].isin(skipped)].reset_index(drop=True)


def write_manifest(directory, manifest):
    write_json(Path(directory) / "features.json", manifest)


def read_manifest(directory):
    return json.loads((Path(directory) / "features.json").read_text())


def gender_class_weights(genders, weighting):
    """`balanced`: each gender weighs as much in the loss as the other, whatever the 3:1 skew."""
    genders = np.asarray(genders)
    if weighting == "none":
        return np.ones(2, dtype=np.float32)
    counts = np.bincount(genders, minlength=2).astype(np.float64)
    return (len(genders) / (2 * np.maximum(counts, 1))).astype(np.float32)


def gender_sample_weights(genders, weighting):
    return gender_class_weights(genders, weighting)[np.asarray(genders)]


def age_sample_weights(ages, balance, window=5, cap=10.0):
    """Weights of the age loss, mean 1. `balance` 0: every face weighs the same (ages as
    sampled); 1: every age weighs the same in total, however few faces it has (wiki has a
    few dozen children among thousands of adults); in between, weights go as the age's face
    count to the power -balance. An age's count is that of the faces within `window` years
    around it, and no face weighs more than `cap` times the mean, so a lone face cannot drive
    the loss."""
    ages = np.clip(np.asarray(ages, dtype=np.int64), 0, len(AGES) - 1)
    if balance == 0 or len(ages) == 0:
        return np.ones(len(ages), dtype=np.float32)
    counts = np.bincount(ages, minlength=len(AGES)).astype(np.float64)
    nearby = np.convolve(counts, np.ones(window), mode="same")
    weights = nearby[ages] ** -float(balance)
    weights /= weights.mean()
    for _ in range(20):  # the cap, renormalised until it holds
        weights = np.minimum(weights, cap)
        weights /= weights.mean()
    return np.minimum(weights, cap).astype(np.float32)


class EpochSync(keras.callbacks.Callback):
    """Tells the batches which epoch starts, also the first one after a resume."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.set_epoch(epoch)


class FeatureBatches(keras.utils.PyDataset):
    """Batches of cached features, read from the memory map a batch at a time. With a seed,
    shuffled, and with flipped copies each epoch draws for every image either the original or
    the mirrored one, the cached form of flip augmentation; without one (validation), in order.
    """

    def __init__(
        self, features, labels, sample_weights, batch_size, seed=None, flipped=None, epoch=0
    ):
        super().__init__()
        self.features, self.flipped, self.labels, self.sample_weights = (
            features,
            flipped,
            labels,
            sample_weights,
        )
        self.batch_size, self.seed = batch_size, seed
        self.set_epoch(epoch)

    def __len__(self):
        return -(-len(self.features) // self.batch_size)

    def set_epoch(self, epoch):
        """The order and the mirror draws depend on the epoch alone, so a resumed run sees the
        same batches as an uninterrupted one."""
        self.epoch = epoch
        if self.seed is None:
            self.order, self.use_flipped = np.arange(len(self.features)), None
            return
        rng = np.random.default_rng([self.seed, epoch])
        self.order = rng.permutation(len(self.features))
        self.use_flipped = (
            rng.random(len(self.features)) < 0.5 if self.flipped is not None else None
        )

    def on_epoch_end(self):
        self.set_epoch(self.epoch + 1)

    def __getitem__(self, index):
        return self.read(self.rows_of(index))

    def rows_of(self, index):
        """The rows of batch `index` in this epoch's order."""
        return self.order[index * self.batch_size : (index + 1) * self.batch_size]

    def read(self, rows):
        """Features, labels and weights of `rows` (a process reads only its share of a batch)."""
        x = np.asarray(self.features[rows], dtype=np.float32)
        if self.use_flipped is not None:
            mirrored = self.use_flipped[rows].reshape((-1,) + (1,) * (x.ndim - 1))
            x = np.where(mirrored, np.asarray(self.flipped[rows], dtype=np.float32), x)
        y = {task: values[rows] for task, values in self.labels.items()}
        if self.sample_weights is None:
            return x, y
        weights = {task: values[rows] for task, values in self.sample_weights.items()}
        return x, y, weights


class RowBatches(keras.utils.PyDataset):
    """The rows of one or more cached arrays, in order, for `predict`: with several, a row of
    each stacked on axis 1 (a test face's descriptor and its mirror image's, as the saved model
    reads them)."""

    def __init__(self, arrays, batch_size):
        super().__init__()
        self.arrays, self.batch_size = arrays, batch_size

    def __len__(self):
        return -(-len(self.arrays[0]) // self.batch_size)

    def __getitem__(self, index):
        rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
        parts = [np.asarray(array[rows], dtype=np.float32) for array in self.arrays]
        return parts[0] if len(parts) == 1 else np.stack(parts, axis=1)
